"""The import direction of style.md §1, checked with ast: a module imports only lower layers."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "wxd"

LAYERS: dict[str, int] = {
    "wxd": 0, "wxd.errors": 0, "wxd.config": 0, "wxd.metrics": 0, "wxd.sdnotify": 0,
    "wxd.logsetup": 0, "wxd.pacing": 0,
    "wxd.crypto": 1, "wxd.messages": 1, "wxd.templates": 1,
    "wxd.schema": 2, "wxd.db": 2, "wxd.upstream": 2, "wxd.wechat": 2, "wxd.inbox": 2, "wxd.followers": 2,
    "wxd.pushqueue": 2, "wxd.backfillstore": 2,
    "wxd.tokens": 3, "wxd.linking": 3, "wxd.events": 3, "wxd.pushes": 3, "wxd.workers": 3,
    "wxd.backfill": 3, "wxd.stats": 3,
    "wxd.webhook": 4, "wxd.admin": 4,
    "wxd.daemon": 5, "wxd.cli": 5, "wxd.demo": 5, "wxd.__main__": 5, "wxd.client": 5, "wxd.cliadmin": 5,
    "wxd.sandbox": 9,  # side module: see SANDBOX_MAY_IMPORT
}
SANDBOX_MAY_IMPORT = {"wxd", "wxd.errors", "wxd.crypto", "wxd.messages"}
MAY_IMPORT_SANDBOX = {"wxd.cli", "wxd.demo"}
NO_IO_FRAMEWORKS = {"tornado", "aiosqlite"}
# Same-layer imports that are part of the design (a short, explicit list).
SAME_LAYER_OK = {
    ("wxd.config", "wxd.errors"), ("wxd.metrics", "wxd.errors"), ("wxd.db", "wxd.schema"),
    ("wxd.followers", "wxd.schema"),
    ("wxd.__main__", "wxd.cli"), ("wxd.cli", "wxd.daemon"), ("wxd.cli", "wxd.demo"),
    ("wxd.cli", "wxd.client"), ("wxd.cli", "wxd.cliadmin"), ("wxd.cliadmin", "wxd.client"),
    ("wxd.demo", "wxd.daemon"), ("wxd.demo", "wxd.client"),
    ("wxd.crypto", "wxd.messages"), ("wxd.wechat", "wxd.upstream"),
}


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_key(module: str) -> str:
    """The LAYERS key for a module: itself, else its nearest listed package."""
    parts = module.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in LAYERS:
            return candidate
        parts.pop()
    raise KeyError(module)


def imports(path: pathlib.Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, is_top_level) for every import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top = {id(node) for node in tree.body}
    type_checking_blocks: set[int] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_checking_blocks.update(id(child) for child in ast.walk(node))
    found: list[tuple[str, int, bool]] = []
    for node in ast.walk(tree):  # type: ignore[assignment]
        toplevel = id(node) in top or id(node) in type_checking_blocks
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno, toplevel) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno, toplevel))
            # `from wxd import x` imports the module wxd.x when it is one.
            if node.module == "wxd":
                found.extend((f"wxd.{alias.name}", node.lineno, toplevel) for alias in node.names
                             if (ROOT / f"{alias.name}.py").exists()
                             or (ROOT / alias.name).is_dir())
    return found


FILES = sorted(ROOT.rglob("*.py"))


def test_every_module_has_a_layer() -> None:
    for path in FILES:
        layer_key(module_name(path))


@pytest.mark.parametrize("path", FILES, ids=lambda p: module_name(p))
def test_imports_point_down(path: pathlib.Path) -> None:
    me = module_name(path)
    my_key = layer_key(me)
    my_layer = LAYERS[my_key]
    for target, line, toplevel in imports(path):
        where = f"{me}:{line} imports {target}"
        root = target.split(".")[0]
        if my_layer <= 1 and root in NO_IO_FRAMEWORKS:
            pytest.fail(f"{where}: layers 0-1 stay free of tornado/aiosqlite")
        if root != "wxd" or target == "wxd":
            continue
        assert toplevel, f"{where}: function-level import of a wxd module"
        other_key = layer_key(target)
        if other_key == "wxd.sandbox":
            assert my_key == "wxd.sandbox" or me in MAY_IMPORT_SANDBOX, \
                f"{where}: only the CLI and demo may import the sandbox"
            continue
        if my_key == "wxd.sandbox":
            assert other_key in SANDBOX_MAY_IMPORT, f"{where}: the sandbox imports L0/L1 only"
            continue
        if other_key == my_key and my_key in ("wxd.admin",):
            continue  # admin route modules share admin.base
        if (my_key, other_key) in SAME_LAYER_OK:
            continue
        assert LAYERS[other_key] < my_layer, \
            f"{where}: layer {LAYERS[other_key]} is not below layer {my_layer}"
