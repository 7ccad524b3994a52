"""The packages import only leftwards: dsl <- codegen <- autotune <- runtime.

Every module's AST is walked, module-level and local imports alike, with no exceptions list; a
relative import is resolved against its package. An import cycle between packages is impossible
once every edge points left.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ORDER = ("dsl", "codegen", "autotune", "runtime")


def _modules():
    for package in ORDER:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield package, path


def _imported_packages(path: Path) -> list[tuple[int, str]]:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = parts[: len(parts) - node.level + (1 if path.name == "__init__.py" else 0)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
    return [(line, name.split(".")[0]) for line, name in found]


@pytest.mark.parametrize("package,path", list(_modules()), ids=lambda v: str(v).replace(str(ROOT) + "/", ""))
def test_module_imports_only_leftwards(package, path):
    rank = ORDER.index(package)
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {top}" for line, top in _imported_packages(path)
             if top in ORDER and ORDER.index(top) > rank]
    assert not wrong, "imports against dsl <- codegen <- autotune <- runtime:\n" + "\n".join(wrong)


def test_the_walk_sees_local_and_relative_imports(tmp_path):
    # The checker itself: a local import inside a function and a relative import both count.
    module = ROOT / "codegen" / "kernels" / "gemm.py"
    tops = {top for _, top in _imported_packages(module)}
    assert "codegen" in tops and "dsl" in tops
