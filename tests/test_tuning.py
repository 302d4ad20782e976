"""The block size and precision a CLLM decodes with, chosen by measurement: the choice is the fastest candidate by
its own figures, its tokens per forward are the engine's, and it is used where it was measured and nowhere else."""

import json
from types import SimpleNamespace

import pytest
import torch

from cllm_core import jacobi_generate
from cllm_core.evaluation.evaluate import with_block_size
from cllm_core.evaluation.tuning import DecodingChoice, choose_decoding
from cllm_core.runtime.config import EvalConfig, JacobiConfig
from cllm_core.runtime.precision import device_name, for_model
from tests.tiny import tiny_model

PROMPTS = [[5, 6, 7, 8], [9, 10, 11]]


def test_the_choice_is_the_fastest_candidate_and_its_tokens_per_forward_are_the_engines():
    model = tiny_model("llama").float().train()
    choice = choose_decoding(model, PROMPTS, ["fp32", "bf16"], sizes=(4, 8), max_new_tokens=16, repeats=2)
    assert {(c.n_tokens, c.precision) for c in choice.candidates} == {(4, "fp32"), (4, "bf16"), (8, "fp32"),
                                                                       (8, "bf16")}
    for n in (4, 8):
        outs = [jacobi_generate(model, torch.tensor([p]), n_tokens=n, max_new_tokens=16).stats for p in PROMPTS]
        expected = sum(s.new_tokens for s in outs) / sum(s.forwards for s in outs)
        assert all(c.tokens_per_forward == pytest.approx(expected) for c in choice.candidates if c.n_tokens == n)
    for c in choice.candidates:  # speed is tokens per forward over a pass's time, against the fastest AR step
        assert c.tokens_per_s == pytest.approx(c.tokens_per_forward / (c.pass_ms / 1e3))
        assert c.speedup == pytest.approx(c.tokens_per_s / choice.ar_tokens_per_s)
    best = max(choice.candidates, key=lambda c: c.speedup)
    assert (choice.n_tokens, choice.precision, choice.speedup) == (best.n_tokens, best.precision, best.speedup)
    assert choice.device == device_name("cpu") and f"n_tokens {choice.n_tokens} in {choice.precision}" in \
        choice.describe()
    assert DecodingChoice.from_json(json.loads(json.dumps(choice.to_json()))) == choice
    assert model.training  # left as it was found


def test_a_cllm_decodes_with_its_measured_choice_on_the_kind_of_machine_it_was_measured_on_only(tmp_path):
    choice = {"n_tokens": 32, "precision": "bf16", "speedup": 2.5, "ar_precision": "fp32", "ar_tokens_per_s": 10.0,
              "device": device_name("cpu"), "candidates": []}
    (tmp_path / "config.json").write_text(json.dumps({"cllm_decoding": choice, "cllm_n_tokens": 16}))
    measured = for_model("auto", str(tmp_path), "cpu")
    assert measured.name == "bf16" and measured.measured and "measured fastest" in measured.describe()
    assert for_model("fp32", str(tmp_path), "cpu").name == "fp32"  # an explicit precision wins
    (tmp_path / "config.json").write_text(json.dumps({"cllm_decoding": choice | {"device": "cpu (AVX2)x"}}))
    assert not for_model("auto", str(tmp_path), "cpu").measured  # measured on another kind of machine

    cllm = SimpleNamespace(config=SimpleNamespace(cllm_decoding=choice, cllm_n_tokens=16))
    assert JacobiConfig().block_size(cllm) == 32 and JacobiConfig(n_tokens=8).block_size(cllm) == 8
    lines = []
    config = with_block_size(EvalConfig(), {"teacher": SimpleNamespace(config=SimpleNamespace()), "cllm": cllm},
                             lines.append)
    assert config.jacobi.n_tokens == 32 and "for cllm, decoding at n_tokens 32 in bf16" in lines[0]
