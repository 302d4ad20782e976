"""benchmarks/held_out.py on a finished run made of tiny models: the demo's prompts extended by the same held-out
stream, figures for both sets, and a run from other inputs refused."""

import json
import shutil
import sys

import pytest
import yaml

from cllm_core import ModelConfig
from cllm_core.data.ingest import ingest
from cllm_core.runtime.config import IngestConfig


def _finished_run(root, model_dir, ingest_config):
    """A run dir as `cllm run` leaves it, as far as the benchmark reads it: teacher/, cllm/, prompts/."""
    for name in ("teacher", "cllm"):
        shutil.copytree(model_dir, root / name)
    ingest(ingest_config, ModelConfig(name_or_path=str(model_dir)), root / "prompts", log=lambda line: None)
    return root


def _profile(path, source="synthetic-math"):
    path.write_text(yaml.safe_dump({
        "precision": "fp32", "ingest": {"source": source, "max_train": 20, "max_eval": 3},
        "collect": {"jacobi": {"n_tokens": 4, "max_new_tokens": 8}},
        "evaluate": {"jacobi": {"n_tokens": 4, "max_new_tokens": 8}, "methods": ["ar", "jacobi"], "warmup": 0}}))
    return path


def _main(monkeypatch, *args):
    from benchmarks import held_out

    monkeypatch.setattr(sys, "argv", ["held_out", *args])
    held_out.main()


def test_the_demos_prompts_are_the_first_of_the_held_out_set_and_both_sets_get_the_goals(
        tiny_model_dir, tmp_path, monkeypatch, capsys):
    run = _finished_run(tmp_path / "run", tiny_model_dir, IngestConfig(source="synthetic-math", max_train=20,
                                                                       max_eval=3))
    out = tmp_path / "held_out.json"
    _main(monkeypatch, "--run-dir", str(run), "--config", str(_profile(tmp_path / "p.yaml")), "--prompts", "7",
          "--json", str(out))
    result = json.loads(out.read_text())
    every, demo = result["figures"]["all"], result["figures"]["demo_prompts"]
    assert (every["prompts"], demo["prompts"], result["n_tokens"]) == (7, 3, 4)
    # the "CLLM" is the teacher's copy, and Jacobi is exact in fp32: every output is the teacher's
    assert every["identical_to_teacher"] == every["identical_to_own_ar"] == demo["identical_to_teacher"] == 1.0
    assert every["accuracy_drop"] == 0.0 and "minutes" not in result["goals"]["all"]
    assert result["goals"]["all"]["identical_to_teacher"]["met"] is True
    printed = capsys.readouterr().out
    assert "| identical_to_teacher | 1.000: MET | 1.000: MET |" in printed
    forward = result["forward_share"]  # the forward calls' time per AR token over that per Jacobi pass
    assert forward["prompts"] == 7 and forward["ar_forward_ms"] > 0 and forward["pass_forward_ms"] > 0
    assert forward["share"] == pytest.approx(forward["ar_forward_ms"] / forward["pass_forward_ms"])
    assert forward["wall_share"] == pytest.approx(forward["ar_wall_ms"] / forward["pass_wall_ms"])
    assert forward["ar_wall_ms"] > forward["ar_forward_ms"] and forward["pass_wall_ms"] > forward["pass_forward_ms"]
    assert f"The wall share of the model's forward alone: {forward['share']:.2f}" in printed
    assert len(json.loads((run / "held-out-7" / "prompts" / "manifest.json").read_text())) > 0


def test_a_run_made_from_other_prompts_is_refused_in_one_line(tiny_model_dir, tmp_path, monkeypatch):
    source = tmp_path / "mine.jsonl"
    source.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": f"#### {2 * i}"}) + "\n"
                              for i in range(30)))
    run = _finished_run(tmp_path / "run", tiny_model_dir, IngestConfig(source=str(source), max_eval=3))
    with pytest.raises(SystemExit, match=r"is not the start of the held-out prompts that synthetic-math gives"):
        _main(monkeypatch, "--run-dir", str(run), "--config", str(_profile(tmp_path / "p.yaml")), "--prompts", "7")
    with pytest.raises(SystemExit, match=r"has no cllm; finish `cllm run"):
        shutil.rmtree(run / "cllm")
        _main(monkeypatch, "--run-dir", str(run), "--config", str(_profile(tmp_path / "p.yaml")))
