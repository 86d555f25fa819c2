"""The layout's rules, read from the source: imports point one way (the pass
and the attention stages import nothing of the face), and tests and
benchmarks use no private name of xflex."""

import ast
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[1]
_PACKAGE = _ROOT / "xflex"
# What the leaf packages may import of xflex besides themselves.
_SHARED_LEAF = "xflex.torch_internals"


def _module_name(path: Path) -> str:
    parts = path.relative_to(_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """``(absolute module, imported names, line)`` for every import in ``path``."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found.append((module, [alias.name for alias in node.names], node.lineno))
    return found


@pytest.mark.parametrize("leaf", ["xflex.passes", "xflex.attention"])
def test_leaf_packages_import_nothing_of_the_face(leaf):
    folder = _ROOT.joinpath(*leaf.split("."))
    offending = []
    for path in sorted(folder.rglob("*.py")):
        for module, names, line in _imports(path):
            targets = [module] + [f"{module}.{name}" for name in names] if module == "xflex" else [module]
            for target in targets:
                inside = target == leaf or target.startswith(leaf + ".")
                if target.startswith("xflex") and target != "xflex" and not inside and target != _SHARED_LEAF:
                    offending.append(f"{path.relative_to(_ROOT)}:{line} imports {target}")
    assert not offending, "\n".join(offending)


def test_torch_internals_imports_only_torch():
    modules = {module.split(".")[0] for module, _, _ in _imports(_PACKAGE / "torch_internals.py")}
    assert modules <= {"__future__", "contextlib", "collections", "math", "torch"}, modules


@pytest.mark.parametrize("folder", ["tests", "bench"])
def test_tests_and_benchmarks_use_no_private_xflex_name(folder):
    offending = []
    for path in sorted((_ROOT / folder).rglob("*.py")):
        for module, names, line in _imports(path):
            if not module or not module.startswith("xflex"):
                continue
            private = [part for part in module.split(".") + names if part.startswith("_") and part != "__future__"]
            if private:
                offending.append(f"{path.relative_to(_ROOT)}:{line} imports {module} {names}")
        for node in ast.walk(ast.parse(path.read_text())):
            # xflex.<...>._name attribute chains, e.g. xflex.op._run_flex
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                chain = node.value
                while isinstance(chain, ast.Attribute):
                    chain = chain.value
                if isinstance(chain, ast.Name) and chain.id == "xflex":
                    offending.append(f"{path.relative_to(_ROOT)}:{node.lineno} uses xflex...{node.attr}")
    assert not offending, "\n".join(offending)
