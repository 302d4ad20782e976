"""The demo teacher: tokenizer, from-scratch Llama, cache, and the same loading path as any hub model."""

import json

import pytest
import torch

from cllm_core import ModelConfig, jacobi_generate, load_model, load_tokenizer
from cllm_core.engine.baselines import ar_generate
from cllm_core.runtime.config import TeacherConfig
from cllm_core.runtime.models import model_identity
from cllm_core.training.teacher import answer_accuracy, build_teacher
from cllm_core.training.teacher_model import learning_rate, train_tokenizer
from data.synthetic_math import splits

# A few seconds of training: enough to exercise every part, not to learn arithmetic.
TINY = TeacherConfig(train_problems=400, eval_problems=20, hidden_size=32, num_layers=1, num_heads=2,
                     intermediate_size=64, steps=6, batch_size=8, warmup_steps=2)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("teacher") / "teacher"
    build_teacher(TINY, directory, log=lambda line: None)
    return directory


def test_digits_are_single_tokens_and_text_round_trips():
    tokenizer = train_tokenizer(["Ava has 12 apples and 305 pears.\n12 + 305 = 317\n#### 317"] * 20, 400)
    ids = tokenizer("Ben has 1024 cards.", add_special_tokens=False)["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert [p for p in pieces if p.isdigit()] == ["1", "0", "2", "4"]  # no leading-space variants
    assert tokenizer.decode(ids) == "Ben has 1024 cards."
    assert tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id


def test_teacher_is_an_ordinary_model_directory_that_the_shared_loader_reads(teacher_dir):
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json",
            "teacher.json"} <= {p.name for p in teacher_dir.iterdir()}
    model_config = ModelConfig(name_or_path=str(teacher_dir))
    model, tokenizer = load_model(model_config), load_tokenizer(model_config)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.eos_token_id == tokenizer.eos_token_id
    record = json.loads((teacher_dir / "teacher.json").read_text())
    assert record["fingerprint"] == TINY.fingerprint() and record["metrics"]["train_steps"] == TINY.steps
    assert record["history"][0]["step"] == 0
    _, held_out = splits(TINY.train_problems, TINY.eval_problems)  # the recorded figure is the saved model's
    assert record["metrics"]["eval_accuracy"] == answer_accuracy(model, tokenizer, held_out, TINY.template)


def test_jacobi_equals_greedy_on_the_teacher(teacher_dir):
    model_config = ModelConfig(name_or_path=str(teacher_dir))
    model, tokenizer = load_model(model_config), load_tokenizer(model_config)
    batch = tokenizer(["Question:\nAva has 3 apples.\nAnswer:\n", "Question:\nHi\nAnswer:\n"], return_tensors="pt",
                      padding=True)
    ar = ar_generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=24)
    jacobi = jacobi_generate(model, batch["input_ids"], batch["attention_mask"], n_tokens=8, max_new_tokens=24)
    assert torch.equal(ar.sequences, jacobi.sequences)


def test_same_config_reuses_the_cached_teacher_and_another_config_retrains(teacher_dir):
    said = []
    record = build_teacher(TINY, teacher_dir, log=said.append)
    assert record["reused"] and "reusing" in said[0]
    weights, identity = (teacher_dir / "model.safetensors").read_bytes(), record["identity"]
    other = TINY.model_copy(update={"seed": 1})
    record = build_teacher(other, teacher_dir, log=said.append)
    assert not record["reused"] and record["fingerprint"] == other.fingerprint()
    assert identity != record["identity"] == model_identity(ModelConfig(name_or_path=str(teacher_dir)))
    assert (teacher_dir / "model.safetensors").read_bytes() != weights
    assert not [p for p in teacher_dir.parent.iterdir() if p.name.startswith(".")]


@pytest.mark.slow  # trains teachers
def test_same_config_trains_the_same_weights(tmp_path):
    for name in ("first", "again"):
        build_teacher(TINY, tmp_path / name, log=lambda line: None)
    assert (tmp_path / "again/model.safetensors").read_bytes() == (tmp_path / "first/model.safetensors").read_bytes()
    first, again = (json.loads((tmp_path / name / "teacher.json").read_text())["identity"]
                    for name in ("first", "again"))
    assert first == again  # identity is by content: two copies of the same weights are the same teacher


def test_schedule_warms_up_then_decays_to_a_tenth():
    config = TeacherConfig(lr=1e-3, warmup_steps=10)
    assert learning_rate(config, 0, 0.0) == pytest.approx(1e-4)
    assert learning_rate(config, 50, 0.0) == pytest.approx(1e-3)
    assert learning_rate(config, 50, 1.0) == pytest.approx(1e-4)


@pytest.mark.slow  # trains teachers
def test_a_teacher_stopped_by_its_guard_says_so_in_one_loud_line(tmp_path):
    warned = []
    record = build_teacher(TINY.model_copy(update={"max_minutes": 1e-6}), tmp_path / "t", log=lambda line: None,
                           warn=warned.append, precision="fp32")
    assert record["metrics"]["train_steps"] == 1 and record["metrics"]["stopped_by_budget"] == 1.0
    (line,) = warned
    assert "STOPPED EARLY" in line and "step 1 of 6" in line and "fp32" in line and "teacher.max_minutes" in line
    said = []
    again = build_teacher(TINY, tmp_path / "t", log=said.append, precision="fp32")  # same weights' config
    assert not again["reused"] and "stopped by its guard" in said[0] and again["metrics"]["train_steps"] == 6


@pytest.mark.slow  # trains teachers
def test_a_teacher_below_its_quality_floor_is_one_line_and_is_not_kept(tmp_path):
    from cllm_core.runtime.guards import BelowQualityFloor

    with pytest.raises(BelowQualityFloor) as error:
        build_teacher(TINY.model_copy(update={"min_accuracy": 0.99}), tmp_path / "t", log=lambda line: None,
                      precision="fp32")
    message = str(error.value)
    assert "\n" not in message and "after 6 of 6 steps (fp32), below teacher.min_accuracy 99%" in message
    assert "raise teacher.steps" in message and not (tmp_path / "t").exists()


def test_a_stop_request_ends_training_before_the_next_step_and_publishes_no_teacher(tmp_path):
    """SIGTERM or Ctrl-C of `cllm teacher` (#14): the loop checks cllm_core.engine.stopping before each step."""
    from cllm_core.engine.stopping import Stopped, clear_stop, request_stop

    request_stop()
    try:
        with pytest.raises(Stopped):
            build_teacher(TINY, tmp_path / "teacher", log=lambda line: None)
    finally:
        clear_stop()
    assert [p.name for p in tmp_path.iterdir()] == []
