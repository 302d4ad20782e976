"""MkDocs hooks: the pages that are read off the code, rendered at build time so that they cannot go stale.

- `reference/configuration.md`: every field of the profile (`cllm_core.runtime.config.Profile`), section by
  section, with its type, default and description; a new field appears with no edit.
- `architecture.md`: the packages of cllm_core, their modules with line counts, and which package imports
  which
  (read from every import statement, lazy ones included).
- `benchmarks.md`: the committed results files (`benchmarks/results/*.json`), each with its commit, CPU class,
  command and headline figures.

- `real-model.md`: the real-model tables, one per CPU class, from `benchmarks/results/real_model-*.json` (the
  README's, made the same way).
- `stages/pipeline.md`: each committed demo run (`benchmarks/results/demo-*.json`), its stage table and goals.

A page asks for one with a marker line (`{{ configuration }}`, `{{ packages }}`, `{{ results }}`, `{{ real_model }}`,
`{{ demo }}`).
"""

from __future__ import annotations

import ast
import json
import sys
import types
from pathlib import Path
from typing import Literal, Union, get_args, get_origin

from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]


def on_config(config):
    """Read the code from the checkout being documented, not from whichever copy is installed (MkDocs takes its
    own entry off sys.path after loading this file, so the checkout's is added here)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return config


def on_page_markdown(markdown: str, page, config, files) -> str:
    for marker, render in (("{{ configuration }}", configuration), ("{{ packages }}", packages),
                           ("{{ results }}", results), ("{{ real_model }}", real_model),
                           ("{{ demo }}", demo)):
        if marker in markdown:
            markdown = markdown.replace(marker, render())
    return markdown


def configuration() -> str:
    """The profile's fields: the top-level ones, then one table per section (nested sections by dotted name)."""
    from cllm_core.runtime.config import Profile

    top = [(name, field) for name, field in Profile.model_fields.items() if _section(field.annotation) is None]
    parts = ["## Profile\n", _table(top, "")]
    for name, field in Profile.model_fields.items():
        section = _section(field.annotation)
        if section is not None:
            parts += _section_tables(name, section, optional=field.default is None)
    return "\n".join(parts)


def _section_tables(path: str, model: type[BaseModel], optional: bool = False) -> list[str]:
    doc = " ".join((model.__doc__ or "").split())
    note = " Optional: absent unless the profile sets it." if optional else ""
    plain = [(name, field) for name, field in model.model_fields.items() if _section(field.annotation) is None]
    parts = [f"## `{path}`\n", f"{doc}{note}\n", _table(plain, path)]
    for name, field in model.model_fields.items():
        section = _section(field.annotation)
        if section is not None:
            parts += _section_tables(f"{path}.{name}", section, optional=field.default is None)
    return parts


def _section(annotation) -> type[BaseModel] | None:
    """The section model a field holds (also through `X | None`), else None."""
    candidates = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _table(fields, path: str) -> str:
    rows = ["| field | type | default | description |", "|---|---|---|---|"]
    for name, field in fields:
        dotted = f"{path}.{name}" if path else name
        default = field.default_factory() if field.default_factory is not None else field.default
        rows.append(f"| `{dotted}` | {_cell(_type_name(field.annotation))} | {_cell(_shown(default))} | "
                    f"{_cell(' '.join((field.description or '').split()))} |")
    return "\n".join(rows) + "\n"


def _type_name(annotation) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " \\| ".join(f"`{value}`" for value in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in args)
    if origin is not None:
        inner = ", ".join(_type_name(arg) for arg in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _shown(value) -> str:
    if isinstance(value, BaseModel):
        return "(section)"
    if value is None:
        return "null"
    return f"`{json.dumps(value, default=str)}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") if "\\|" not in text else text.replace("\n", " ")


def packages() -> str:
    """cllm_core's packages as a drawing (which package imports which) and a tree with line counts."""
    library = ROOT / "cllm_core"
    modules = {path: ".".join(path.relative_to(ROOT).with_suffix("").parts) for path in sorted(library.rglob("*.py"))}
    edges: set[tuple[str, str]] = set()
    for path, name in modules.items():
        source = _package_of(name)
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cllm_core."):
                targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names if alias.name.startswith("cllm_core.")]
            for target in targets:
                if _package_of(target) != source and source != "cllm_core":
                    edges.add((source, _package_of(target)))
    drawing = ["```mermaid", "flowchart BT"]
    drawing += [f"    {a.split('.')[-1]} --> {b.split('.')[-1]}" for a, b in sorted(edges)]
    drawing.append("```")
    tree = ["```text"]
    for package in sorted(p for p in library.iterdir() if (p / "__init__.py").is_file()):
        files = sorted(package.glob("*.py"))
        tree.append(f"cllm_core/{package.name}/  {sum(_lines(f) for f in files):,} lines")
        tree += [f"    {f.name:<20} {_lines(f):>4}" for f in files if f.name != "__init__.py"]
    tree.append("```")
    return "\n".join(drawing) + "\n\n" + "\n".join(tree) + "\n"


def _package_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 or (ROOT / Path(*parts)).is_dir() else parts[0]


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def results() -> str:
    """One row per committed results file: what it measured, where, from which commit, with which command."""
    rows = ["| file | CPU class | commit | headline | command |", "|---|---|---|---|---|"]
    for path in sorted((ROOT / "benchmarks" / "results").glob("*.json")):
        data = json.loads(path.read_text())
        headline = {key: data[key] for key in ("cllm_tokens_per_forward", "speedup_vs_fastest_ar",
                                               "speedup_vs_prompt_lookup", "final_answer_agreement") if key in data}
        if "figures" in data and "all" in data["figures"]:  # the demo's models on many held-out prompts
            headline = {"prompts": data["figures"]["all"]["prompts"]} | {
                key: data["figures"]["all"][key] for key in ("identical_to_teacher", "accuracy_drop",
                                                             "cllm_tokens_per_forward", "speedup_vs_fastest_ar")}
        elif "figures" in data:  # the demo: its headline figures
            headline = {key: data["figures"][key] for key in ("minutes", "cllm_tokens_per_forward",
                                                              "speedup_vs_fastest_ar")}
        if "variants" in data:  # the step benchmark: minutes per epoch of each variant
            headline = {f"{v['variant']} {v['precision']} min/epoch": v["minutes_per_epoch"] for v in data["variants"]}
        figures = ", ".join(f"{key} {value:.3g}" if isinstance(value, float) else f"{key} {value}"
                            for key, value in headline.items()) or "(see the file)"
        command = data.get("command")
        command = " ".join(command) if isinstance(command, list) else (command or "")
        rows.append(f"| `{path.name}` | {data.get('cpu_capability', data.get('cpu_class', ''))} | "
                    f"`{str(data.get('commit', ''))[:10]}` | {_cell(figures)} | `{_cell(command)}` |")
    return "\n".join(rows) + "\n"


def demo() -> str:
    """Each committed demo run (`benchmarks/results/demo-*.json`): its stage table and goals; then its models on
    many more held-out prompts (`demo_held_out-*.json`)."""
    from benchmarks.held_out import report
    from benchmarks.pipeline import RESULTS, summary_markdown

    runs = [f"**{path.stem}**\n\n" + summary_markdown(json.loads(path.read_text()))
            for path in sorted(RESULTS.glob("demo-*.json"))]
    held_out = [f"**{path.stem}**\n\n" + report(json.loads(path.read_text()))
                for path in sorted(RESULTS.glob("demo_held_out-*.json"))]
    return "\n\n".join(runs + held_out) + "\n"


def real_model() -> str:
    from benchmarks.real_model import readme_tables

    return readme_tables()
