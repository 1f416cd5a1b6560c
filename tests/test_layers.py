"""The package rules of the architecture, checked with ast. This test is their source of truth.

    base  <  wechat/  <  store/  <  services  <  HTTP surface  <  top        sandbox/ apart

A module imports only from its own level or lower ones; on top of that:
- base modules (errors, config, metrics, clock, ...) use the standard library only;
- wechat/ (the protocol) never imports aiosqlite or tornado.web;
- store/ (every SQL statement) never imports tornado;
- services never import tornado.web;
- the sandbox imports base and wechat/ only, and only the CLI and the demo import it;
- no function-level import of a wxd module (move the code instead of dodging a cycle).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "wxd"

LEVELS = ("base", "wechat", "store", "service", "http", "top")
BASE = {"wxd", "wxd.errors", "wxd.config", "wxd.aeskey", "wxd.metrics", "wxd.clock", "wxd.logsetup",
        "wxd.sdnotify", "wxd.sdlisten"}
HTTP_SURFACE = {"wxd.webhook", "wxd.oauth_web", "wxd.admin", "wxd.ui"}
TOP = {"wxd.daemon", "wxd.cli", "wxd.cliadmin", "wxd.client", "wxd.demo", "wxd.doctor",
       "wxd.listener", "wxd.__main__"}
MAY_IMPORT_SANDBOX = {"wxd.cli", "wxd.demo"}
FORBIDDEN: dict[str, tuple[str, ...]] = {  # level -> third-party modules it must not import
    "base": ("tornado", "aiosqlite"),
    "wechat": ("aiosqlite", "tornado.web"),
    "store": ("tornado",),
    "service": ("tornado.web",),
    "sandbox": ("aiosqlite",),
}


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def level(module: str) -> str:
    """The level of a wxd module: by its package, else by the lists above, else a service."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ("wechat", "store", "sandbox"):
        return {"wechat": "wechat", "store": "store", "sandbox": "sandbox"}[parts[1]]
    top_module = ".".join(parts[:2])
    if module in BASE:
        return "base"
    if top_module in HTTP_SURFACE:
        return "http"
    if top_module in TOP:
        return "top"
    return "service"


def imports(tree: ast.Module) -> list[tuple[str, int, bool]]:
    """(imported module, line, is_top_level) for every absolute import in the tree."""
    top = {id(node) for node in tree.body}
    type_checking: set[int] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_checking.update(id(child) for child in ast.walk(node))
    found: list[tuple[str, int, bool]] = []
    for node in ast.walk(tree):  # type: ignore[assignment]
        toplevel = id(node) in top or id(node) in type_checking
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno, toplevel) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno, toplevel))
            # `from wxd.store import x` imports the module wxd.store.x when it is one.
            base = ROOT.parent / node.module.replace(".", "/")
            found.extend((f"{node.module}.{alias.name}", node.lineno, toplevel)
                         for alias in node.names
                         if (base / f"{alias.name}.py").exists() or (base / alias.name).is_dir())
    return found


def problems(module: str, tree: ast.Module) -> list[str]:
    """Every broken rule in one module's imports, as readable lines."""
    mine = level(module)
    found: list[str] = []
    for target, line, toplevel in imports(tree):
        where = f"{module}:{line} imports {target}"
        for banned in FORBIDDEN.get(mine, ()):
            if target == banned or target.startswith(banned + "."):
                found.append(f"{where}: {mine} modules never import {banned}")
        if target.split(".")[0] != "wxd" or target == "wxd":
            continue
        if not toplevel:
            found.append(f"{where}: function-level import of a wxd module")
        theirs = level(target)
        if theirs == "sandbox":
            if mine != "sandbox" and module not in MAY_IMPORT_SANDBOX:
                found.append(f"{where}: only the CLI and the demo import the sandbox")
        elif mine == "sandbox":
            if theirs not in ("base", "wechat"):
                found.append(f"{where}: the sandbox imports base and wechat/ only")
        elif LEVELS.index(theirs) > LEVELS.index(mine):
            found.append(f"{where}: {theirs} is above {mine}")
    return found


FILES = sorted(ROOT.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=module_name)
def test_imports_follow_the_package_rules(path: pathlib.Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    assert problems(module_name(path), tree) == []


@pytest.mark.parametrize(("module", "source", "broken"), [
    ("wxd.store.pushes", "from wxd.push_workers import PushWorkers", "service is above store"),
    ("wxd.db", "import tornado.web", "never import tornado"),
    ("wxd.wechat.client", "from wxd.store.db import Database", "store is above wechat"),
    ("wxd.wechat.crypto", "import aiosqlite", "never import aiosqlite"),
    ("wxd.pushes", "from wxd.admin.base import JsonHandler", "http is above service"),
    ("wxd.events", "import tornado.web", "never import tornado.web"),
    ("wxd.webhook", "from wxd.sandbox import FakeWeChat", "only the CLI and the demo"),
    ("wxd.sandbox.state", "from wxd.store import followers", "base and wechat/ only"),
    ("wxd.errors", "import tornado", "never import tornado"),
    ("wxd.linking", "def f():\n    from wxd.store import followers", "function-level"),
])
def test_each_rule_catches_a_bad_import(module: str, source: str, broken: str) -> None:
    found = problems(module, ast.parse(source))
    assert any(broken in line for line in found), found


def test_no_sql_outside_the_store() -> None:
    """Every SQL statement lives in wxd/store/ (the sandbox keeps no database)."""
    keywords = ("SELECT ", "INSERT INTO", "UPDATE ", "DELETE FROM", "CREATE TABLE",
                "CREATE INDEX", "PRAGMA ")
    offenders = []
    for path in FILES:
        if module_name(path).startswith("wxd.store"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                    and any(node.value.lstrip().upper().startswith(k) for k in keywords)):
                offenders.append(f"{module_name(path)}:{node.lineno}")
    assert offenders == []
