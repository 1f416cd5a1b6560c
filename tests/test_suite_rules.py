"""Rules of the test suite and the benchmarks themselves, checked with ast:

- a test module (tests/test_*.py) imports no other test module: what two of them share lives
  in a helper or fixture module (tests/helpers.py, sandbox_fixture.py, push_case.py, ...);
- bench/ imports nothing from tests/ (tests may import bench/: the proof harness is there).

Every import counts, function-level and relative ones included.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
TEST_MODULES = sorted((ROOT / "tests").glob("test_*.py"))
BENCH_MODULES = sorted((ROOT / "bench").rglob("*.py"))


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(module: str, tree: ast.Module) -> list[tuple[str, int]]:
    """(module, line) for every import in `module`'s tree; `from a import b` also names a.b
    (b may be a module), relative imports are resolved against `module`'s package."""
    package = module.split(".")[:-1]
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            source = ".".join([*base, *([node.module] if node.module else [])])
            found.append((source, node.lineno))
            found.extend((f"{source}.{alias.name}", node.lineno) for alias in node.names)
    return found


def problems(module: str, tree: ast.Module) -> list[str]:
    """Every broken rule in one module's imports, as readable lines (one per import line)."""
    found: dict[tuple[int, str], str] = {}
    for target, line in imported(module, tree):
        rules = []
        if (module.startswith("tests.test_") and target.startswith("tests.test_")
                and target != module):
            rules.append("a test module never imports another test module")
        if module.split(".")[0] == "bench" and target.split(".")[0] == "tests":
            rules.append("bench/ imports nothing from tests/")
        for rule in rules:
            found.setdefault((line, rule), f"{module}:{line} imports {target}: {rule}")
    return list(found.values())


@pytest.mark.parametrize("path", TEST_MODULES + BENCH_MODULES, ids=module_name)
def test_imports_follow_the_suite_rules(path: pathlib.Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    assert problems(module_name(path), tree) == []


@pytest.mark.parametrize(("module", "source", "broken"), [
    ("tests.test_workers", "from tests.test_pushes import PushCase", "another test module"),
    ("tests.test_tokens", "import tests.test_wechat", "another test module"),
    ("tests.test_tokens", "from tests import test_wechat", "another test module"),
    ("tests.test_tokens", "from . import test_wechat", "another test module"),
    ("tests.test_tokens", "def f():\n    from .test_wechat import ClientCase", "another test"),
    ("bench.killloop", "from tests.proof_helpers import Ledger", "nothing from tests/"),
    ("bench.killloop", "import tests.helpers", "nothing from tests/"),
    ("bench.common", "def f():\n    from tests import helpers", "nothing from tests/"),
])
def test_each_rule_catches_a_bad_import(module: str, source: str, broken: str) -> None:
    found = problems(module, ast.parse(source))
    assert any(broken in line for line in found), found


@pytest.mark.parametrize(("module", "source"), [
    ("tests.test_workers", "from tests.push_case import PushCase, sends"),
    ("tests.test_killloop", "from bench.proof import Ledger"),
    ("tests.push_case", "from tests.sandbox_fixture import WeChatStack"),
    ("bench.killloop", "from bench.proof import AdminClient\nimport wxd.sandbox"),
])
def test_allowed_imports_pass(module: str, source: str) -> None:
    assert problems(module, ast.parse(source)) == []
