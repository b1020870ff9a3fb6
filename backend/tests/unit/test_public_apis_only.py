"""Our code uses dependencies through their public APIs only, so an upgrade cannot break it from underneath.

Scans every module of `backend/src`: no import of a dependency's `_private` module, no `_private` attribute of
anything but our own objects (`self`, `cls`), no monkeypatching (`setattr`, or assigning into an imported module).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE_ROOT = Path(__file__).resolve().parents[2] / "src"
OUR_PACKAGE = "src"
OWN_OBJECTS = frozenset({"self", "cls"})


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    imported_modules: set[str] = set()
    found: list[str] = []

    def report(node: ast.AST, what: str) -> None:
        found.append(f"{path.relative_to(SOURCE_ROOT.parent)}:{getattr(node, 'lineno', '?')}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                imported_modules.add((alias.asname or alias.name).split(".")[0])
                if alias.name.split(".")[0] != OUR_PACKAGE and any(map(_is_private, alias.name.split("."))):
                    report(node, f"imports private module {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] == OUR_PACKAGE or parts[0] == "__future__":
                continue
            if any(map(_is_private, parts)):
                report(node, f"imports from private module {node.module}")
            for alias in node.names:
                if _is_private(alias.name):
                    report(node, f"imports private name {alias.name} from {node.module}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            owner = node.value
            if not (isinstance(owner, ast.Name) and owner.id in OWN_OBJECTS):
                report(node, f"uses private attribute .{node.attr} of {ast.unparse(owner)}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr":
            report(node, "calls setattr (monkeypatching)")
        elif isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                root = target
                while isinstance(root, ast.Attribute):
                    root = root.value
                if isinstance(target, ast.Attribute) and isinstance(root, ast.Name) and root.id in imported_modules:
                    report(node, f"assigns into imported module: {ast.unparse(target)}")
    return found


MODULES = sorted(SOURCE_ROOT.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=[str(path.relative_to(SOURCE_ROOT)) for path in MODULES])
def test_module_uses_only_public_apis_of_dependencies(path: Path) -> None:
    assert _violations(path) == []


def test_the_scan_catches_each_kind_of_private_use(tmp_path: Path) -> None:
    sample = SOURCE_ROOT / "sample_for_the_scan.py"
    code = (
        "import fastapi.routing\n"
        "from openai._models import FinalRequestOptions\n"
        "from openai import _exceptions\n"
        "client._build_request(options)\n"
        "fastapi.routing.is_v1 = lambda: False\n"
        "setattr(fastapi.routing, 'x', 1)\n"
        "self._ours = 1\n"
    )
    sample.write_text(code)
    try:
        found = _violations(sample)
    finally:
        sample.unlink()
    assert len(found) == 5, found
