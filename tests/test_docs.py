"""The documentation site builds in strict mode (a broken link, a missing page or a page left out of the nav fails
it), its generated pages hold what the code holds, and every reference the code makes to docs/ resolves."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from cllm_core.runtime.config import Profile
from tests.test_layering import ROOT

MKDOCS_HOOKS = ROOT / "scripts" / "mkdocs_hooks.py"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={"NO_MKDOCS_2_WARNING": "1",
                                                                            "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def dotted_fields(model, prefix: str = "") -> list[str]:

    from scripts.mkdocs_hooks import _section

    found = []
    for name, field in model.model_fields.items():
        section = _section(field.annotation)
        found += dotted_fields(section, f"{prefix}{name}.") if section is not None else [f"{prefix}{name}"]
    return found


def test_the_configuration_reference_holds_every_field_of_the_profile(site):
    page = (site / "reference" / "configuration" / "index.html").read_text()
    fields = dotted_fields(Profile)
    assert len(fields) > 100 and "finetune.lora.rank" in fields and "collect.jacobi.n_tokens" in fields
    missing = [field for field in fields if f"<code>{field}</code>" not in page]
    assert missing == []


def test_the_architecture_page_draws_the_packages_and_the_benchmarks_page_lists_every_results_file(site):
    architecture = (site / "architecture" / "index.html").read_text()
    assert "training --&gt; engine" in architecture and "engine --&gt;" not in architecture
    for package in ("engine", "runtime", "data", "training", "evaluation"):
        assert f"cllm_core/{package}/" in architecture
    benchmarks = (site / "benchmarks" / "index.html").read_text()
    for path in (ROOT / "benchmarks" / "results").glob("*.json"):
        assert path.name in benchmarks


def test_a_broken_link_fails_the_build(tmp_path):
    """Strict mode is on: the build above would have failed on what this one fails on."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Home\n\nSee [the missing page](missing.md).\n")
    (tmp_path / "mkdocs.yml").write_text("site_name: probe\nstrict: true\n")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--site-dir", str(tmp_path / "site")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "missing.md" in done.stderr


def test_every_reference_the_code_makes_to_the_docs_resolves():
    """Docstrings and comments point at docs/ pages (and at headings in them); none at notes outside the repo."""
    sources = [p for layer in ("cllm_core", "tasks", "flows", "benchmarks", "scripts", "tests", "configs")
               for p in (ROOT / layer).rglob("*") if p.suffix in (".py", ".yaml")] + [ROOT / "pyproject.toml"]
    references, stale = [], []
    for path in sources:
        text = path.read_text()
        stale += [f"{path.relative_to(ROOT)}: {m}" for m in re.findall(r"\bnotes/\w+\.md|\bDESIGN\.md", text)]
        for page, heading in re.findall(r"(docs/[\w/.-]+\.md)(?:,\s+\"([^\"]+)\")?", text):
            references.append((path, page, heading))
    assert stale == [] and len(references) >= 10
    broken = []
    for path, page, heading in references:
        target = ROOT / page
        if not target.is_file():
            broken.append(f"{path.relative_to(ROOT)}: {page} does not exist")
        elif heading and " ".join(heading.split()) not in {line.lstrip("#").strip()
                                                           for line in target.read_text().splitlines()
                                                           if line.startswith("#")}:
            broken.append(f"{path.relative_to(ROOT)}: {page} has no heading {heading!r}")
    assert broken == []


def test_the_readmes_real_model_tables_are_the_committed_results_files():
    """The README's figures are made from benchmarks/results/real_model-*.json (one table per CPU class), so they
    cannot drift from what a rerun of their command checks."""
    from benchmarks.real_model import README, readme_tables, with_readme_tables

    text = README.read_text()
    assert (ROOT / "benchmarks" / "results" / "real_model-avx512.json").is_file()
    assert with_readme_tables(text, readme_tables()) == text, \
        "the README's tables are stale: python -m benchmarks.real_model --report-only --readme"
    assert len(text.splitlines()) <= 200


def test_the_readmes_demo_table_is_the_committed_results_files():
    """The README's first table is made from benchmarks/results/demo-*.json (a row per CPU class)."""
    from benchmarks.pipeline import README, readme_table, with_readme_table

    text = README.read_text()
    assert sorted(p.name for p in (ROOT / "benchmarks" / "results").glob("demo-*.json")) == ["demo-avx2.json",
                                                                                          "demo-avx512.json"]
    assert with_readme_table(text, readme_table()) == text, \
        "the README's demo table is stale: python -m benchmarks.pipeline --report-only --readme"


def test_the_demo_benchmark_sets_the_cllms_fastest_lossless_decoder_against_the_teachers_fastest_ar():
    from benchmarks.pipeline import figures, verdicts

    def row(model, method, tokens_per_s, tpf=1.0, accuracy=0.99, same=1.0, exact=1.0):
        return {"model": model, "method": method, "tokens_per_s": tokens_per_s, "tokens_per_forward": tpf,
                "accuracy": accuracy, "same_as_baseline": same, "exact_match": exact, "repetition_rate": 0.0}

    table = [row("teacher", "ar", 400.0), row("teacher", "generate", 500.0), row("teacher", "jacobi", 300.0, 1.4),
             row("cllm", "jacobi", 1450.0, 4.6, 0.985, 0.99), row("cllm", "jacobi_lookup", 1600.0, 4.8, 0.98, 0.985),
             row("cllm", "lookup", 2500.0, 5.0, 0.5, 0.5, 0.5)]  # prompt lookup is not lossless: not the CLLM's
    found = figures(table, 9.5)
    assert found["cllm_decoder"] == "jacobi_lookup" and found["speedup_vs_fastest_ar"] == 3.2  # against generate
    assert found["wall_share_of_tokens_per_forward"] == pytest.approx(3.2 / 4.8)
    assert found["accuracy_drop"] == pytest.approx(0.01) and found["identical_to_own_ar"] == 1.0
    missed = {name for name, goal in verdicts(found).items() if not goal["met"]}
    assert missed == {"wall_share_of_tokens_per_forward", "identical_to_teacher"}
