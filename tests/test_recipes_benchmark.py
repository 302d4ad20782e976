"""benchmarks/recipes.py's bookkeeping: a CLLM's rounds and training seconds from the records beside it, and the
goals judged on the fastest exact row."""

import json

import pytest

from benchmarks.recipes import goals, lineage, training_seconds


def _cllm(directory, teacher, store, train_seconds):
    directory.mkdir(parents=True)
    (directory / "cllm.json").write_text(json.dumps({"teacher": {"name_or_path": str(teacher)},
                                                     "trajectories": {"store": str(store)},
                                                     "metrics": {"train_seconds": train_seconds}}))


def test_a_second_round_counts_both_rounds_training_and_collection(tmp_path):
    for name, seconds in [("trajectories", [30.0, 20.0]), ("trajectories-round2", [15.0])]:
        (tmp_path / name).mkdir()
        for i, s in enumerate(seconds):
            (tmp_path / name / f"shard-{i:05d}.json").write_text(json.dumps({"seconds": s}))
    (tmp_path / "teacher").mkdir()
    _cllm(tmp_path / "cllm", tmp_path / "teacher", tmp_path / "trajectories", 200.0)
    _cllm(tmp_path / "cllm-round2", tmp_path / "cllm", tmp_path / "trajectories-round2", 190.0)
    root, rounds = lineage(tmp_path / "cllm-round2")
    assert root == tmp_path / "teacher" and len(rounds) == 2
    assert training_seconds(rounds) == {"finetune_s": 390.0, "collect_s": 65.0}
    assert training_seconds(lineage(tmp_path / "cllm")[1]) == {"finetune_s": 200.0, "collect_s": 50.0}
    with pytest.raises(SystemExit, match="no cllm.json"):
        lineage(tmp_path / "teacher")


def _row(model, method, speedup, tpf=1.0, accuracy=0.99, same=1.0, repetition=0.0, n=None):
    return {"model": model, "method": method, "speedup": speedup, "tokens_per_forward": tpf, "accuracy": accuracy,
            "same_as_teacher": same, "repetition_rate": repetition, "n_tokens": n}


def test_goals_are_judged_on_the_fastest_exact_cllm_row():
    rows = [_row("teacher", "ar", 1.0, accuracy=0.995), _row("teacher", "lookup", 1.2),
            _row("jf", "ar", 0.95), _row("jf", "jacobi", 3.1, tpf=4.6, accuracy=0.985, same=0.985, n=32),
            _row("jf", "jacobi_recycling", 2.8, tpf=4.7, n=32)]
    verdict = goals(rows)
    assert verdict.pop("row") == "jf jacobi n=32"
    assert verdict == {"tokens_per_forward >= 4.0": True, "speedup >= 2.5": True, "ahead of prompt lookup": True,
                       "accuracy within 1 point of the teacher": True, ">= 99% identical to the teacher": False,
                       "repetition 0%": True}
    rows[1]["speedup"] = 3.5  # prompt lookup faster still
    assert goals(rows)["ahead of prompt lookup"] is False
