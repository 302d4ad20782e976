"""The layers point one way, read from the source: every import statement of every module, lazy ones inside
functions included. cllm_core is pure (no Prefect, no MLflow, nothing above it), tasks never reach up into
flows, and benchmarks and scripts use only the public names of the layers they measure."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
FORBIDDEN = {
    "cllm_core": {"prefect", "prefect_dask", "mlflow", "tasks", "flows", "benchmarks", "scripts", "tests"},
    "tasks": {"flows", "benchmarks", "scripts", "tests"},
    "flows": {"benchmarks", "scripts", "tests"},
    "benchmarks": {"scripts", "tests"},
    "scripts": {"tests"},
}
PROJECT = {"cllm_core", "tasks", "flows", "benchmarks", "scripts"}


def imports(path: Path, root: Path = ROOT) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of every import in the file; a relative import is resolved against its package."""
    found = []
    package = path.relative_to(root).with_suffix("").parts[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            module = ".".join(part for part in (base, node.module or "") if part)
            found.append((node.lineno, module, [alias.name for alias in node.names]))
    return found


def modules(layer: str) -> list[Path]:
    return sorted((ROOT / layer).rglob("*.py"))


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_module_of_a_layer_imports_a_layer_it_must_not(layer):
    assert modules(layer), f"no modules found under {ROOT / layer}"
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {module}" for path in modules(layer)
             for line, module, _ in imports(path) if module.split(".")[0] in FORBIDDEN[layer]]
    assert wrong == []


@pytest.mark.parametrize("layer", ["benchmarks", "scripts"])
def test_benchmarks_and_scripts_use_only_public_names(layer):
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {module}: {', '.join(names) or module}"
             for path in modules(layer) for line, module, names in imports(path)
             if module.split(".")[0] in PROJECT - {layer}
             and (any(part.startswith("_") for part in module.split(".")) or any(n.startswith("_") for n in names))]
    assert wrong == []


def test_the_walk_sees_lazy_and_relative_imports(tmp_path):
    """The checks above cannot pass for want of seeing: an import inside a function is found, resolved."""
    source = tmp_path / "cllm_core" / "probe.py"
    source.parent.mkdir()
    source.write_text("def later():\n    import mlflow\n    from .config import _moved\n")
    assert imports(source, tmp_path) == [(2, "mlflow", []), (3, "cllm_core.config", ["_moved"])]
