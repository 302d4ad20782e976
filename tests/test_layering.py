"""The layers point one way, read from the source: every import statement of every module, lazy ones inside
functions included. cllm_core is pure (no Prefect, no MLflow, nothing above it), tasks never reach up into
flows, and benchmarks and scripts use only the public names of the layers they measure. Inside cllm_core no two
modules import each other, however far round (a cycle), and the engine package, which every CLLM ships, imports
nothing of the project outside itself."""

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


def module_graph(root: Path = ROOT, package: str = "cllm_core") -> dict[str, set[str]]:
    """Every module of `package` (dotted names; a package is its `__init__`) and the modules of the package it
    imports, lazily or not: `from a.b import c` is an edge to `a.b.c` where that is a module, else to `a.b`."""
    paths = {".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): path
             for path in sorted((root / package).rglob("*.py"))}
    graph = {}
    for name, path in paths.items():
        edges = set()
        for _, module, names in imports(path, root):
            if module.split(".")[0] != package:
                continue
            submodules = {f"{module}.{n}" for n in names} & paths.keys()
            edges |= submodules or ({module} & paths.keys())
        graph[name] = edges - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> ... -> a) for each strongly connected group of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(_path_through(graph, sorted(group)))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _path_through(graph: dict[str, set[str]], group: list[str]) -> list[str]:
    """A cycle inside a strongly connected group, from its first member back to it (breadth-first)."""
    start, members = group[0], set(group)
    previous, frontier = {start: None}, [start]
    while frontier:
        node = frontier.pop(0)
        for nxt in sorted(graph[node] & members):
            if nxt == start:
                path = [node]
                while previous[path[-1]] is not None:
                    path.append(previous[path[-1]])
                return [*reversed(path), start]
            if nxt not in previous:
                previous[nxt] = node
                frontier.append(nxt)
    raise AssertionError(f"{group} is not strongly connected")


def test_no_module_of_cllm_core_is_in_an_import_cycle():
    assert cycles(module_graph()) == []


def test_cllm_cores_packages_form_layers():
    """Package by package too: engine <- runtime <- data <- training, evaluation (no package imports one that
    imports it back), so the drawing in docs/architecture.md has arrows one way."""
    packages = {}
    for module, edges in module_graph().items():
        package = ".".join(module.split(".")[:2])
        packages.setdefault(package, set()).update(".".join(edge.split(".")[:2]) for edge in edges)
    assert {"cllm_core.engine", "cllm_core.runtime", "cllm_core.data", "cllm_core.training"} <= packages.keys()
    assert cycles({package: edges - {package} for package, edges in packages.items()}) == []
    assert packages["cllm_core.engine"] <= {"cllm_core.engine"}


def test_the_cycle_check_finds_a_planted_cycle(tmp_path):
    """Planted the way the two old cycles were: one import at the top of a module, the other lazy."""
    package = tmp_path / "cllm_core"
    (package / "training").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "training" / "__init__.py").write_text("")
    (package / "training" / "launch.py").write_text("def main():\n    from cllm_core.training.finetune import go\n")
    (package / "training" / "finetune.py").write_text("from cllm_core.training import launch\n")
    (package / "leaf.py").write_text("import cllm_core.training.finetune\n")
    assert cycles(module_graph(tmp_path)) == [["cllm_core.training.finetune", "cllm_core.training.launch",
                                                "cllm_core.training.finetune"]]


def test_the_engine_imports_nothing_of_the_project_outside_itself():
    assert module_graph()["cllm_core.engine.jacobi"]  # the walk sees the engine's own imports
    engine = sorted((ROOT / "cllm_core" / "engine").rglob("*.py"))
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {module}" for path in engine
             for line, module, _ in imports(path) if module.split(".")[0] in PROJECT | {"tests"}
             and not module.startswith("cllm_core.engine")]
    assert wrong == []


def test_every_public_name_of_cllm_core_is_importable_from_it():
    """The packages moved the modules; `from cllm_core import jacobi_generate` and the rest still work."""
    import cllm_core

    assert {"jacobi_generate", "jacobi_steps", "load_model", "load_tokenizer", "ModelConfig", "ar_generate",
            "lookup_generate", "DecodeOutput", "UserError"} <= set(cllm_core.__all__)
    assert all(getattr(cllm_core, name) is not None for name in cllm_core.__all__)
