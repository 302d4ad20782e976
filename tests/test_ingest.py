"""Stage 1 in the library: sources -> deduplicated, rendered, counted prompts; every bad input is one line."""

import json

import pyarrow.parquet as pq
import pytest

from cllm_core.data.answers import extract_answer, is_correct
from cllm_core.data.ingest import PROMPT_SCHEMA, ingest, prompt_id
from cllm_core.data.sources import IngestError
from cllm_core.data.templates import render_template
from cllm_core.runtime.config import IngestConfig, ModelConfig

GSM8K_QUESTION = "Janet has 3 apples. How many?"


@pytest.fixture
def tokenizer(tiny_model_dir):
    return ModelConfig(name_or_path=str(tiny_model_dir))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def records(path):
    return pq.read_table(path).to_pylist()


def quiet(message):
    pass


def test_local_jsonl_with_a_field_mapping_is_deduplicated_split_and_counted(tmp_path, tokenizer):
    rows = [{"instruction": f"Task {i}: add {i} and {i}.", "output": str(2 * i)} for i in range(20)]
    rows += [rows[0], rows[1], {"instruction": "  ", "output": "nothing"}]
    source = write_jsonl(tmp_path / "tasks.jsonl", rows)
    config = IngestConfig(source=str(source), fields={"question": "instruction", "answer": "output"},
                          eval_fraction=0.25, seed=3)
    manifest = ingest(config, tokenizer, tmp_path / "prompts", log=quiet)
    train, eval_ = records(tmp_path / "prompts/train.parquet"), records(tmp_path / "prompts/eval.parquet")
    assert len(train) + len(eval_) == 20 and len(eval_) == 6  # 23 rows: 2 duplicates and 1 empty dropped
    assert manifest["train_duplicates"] + manifest["eval_duplicates"] == 2
    assert manifest["train_empty"] + manifest["eval_empty"] == 1
    assert not {r["prompt_id"] for r in train} & {r["prompt_id"] for r in eval_}
    first = next(r for r in train + eval_ if r["question"] == "Task 0: add 0 and 0.")
    assert first["answer"] == "0" and first["source"] == str(source)
    assert first["prompt_id"] == prompt_id(first["prompt"]) and len(first["prompt_id"]) == 16
    assert first["prompt_tokens"] > 5
    assert pq.read_schema(tmp_path / "prompts/train.parquet").remove_metadata() == PROMPT_SCHEMA


def test_rerun_with_the_same_inputs_gives_byte_identical_files(tmp_path, tokenizer):
    source = write_jsonl(tmp_path / "q.jsonl", [{"question": f"What is {i} + 1?"} for i in range(30)])
    config = IngestConfig(source=str(source), template="gsm8k")
    ingest(config, tokenizer, tmp_path / "a", log=quiet)
    ingest(config, tokenizer, tmp_path / "b", log=quiet)
    for name in ("train.parquet", "eval.parquet", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    other = IngestConfig(source=str(source), template="gsm8k", seed=1)
    ingest(other, tokenizer, tmp_path / "c", log=quiet)
    assert (tmp_path / "a/eval.parquet").read_bytes() != (tmp_path / "c/eval.parquet").read_bytes()


@pytest.mark.slow  # reads the whole GSM8K copy
def test_gsm8k_preset_reads_the_local_copy_offline_with_the_papers_template(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    said = []
    manifest = ingest(IngestConfig(source="gsm8k", max_train=50, max_eval=20), tokenizer, tmp_path / "p",
                      log=said.append)
    assert any("unreachable" in line and "local copy" in line for line in said)
    assert (manifest["train_rows"], manifest["eval_rows"], manifest["template"]) == (50, 20, "gsm8k")
    row = records(tmp_path / "p/eval.parquet")[0]
    assert row["prompt"].startswith("Question:\nJanet") and row["prompt"].endswith("Let's think step by step.\n")
    assert extract_answer(row["answer"]) == "18"  # GSM8K test item 1: Janet's ducks


def test_synthetic_math_preset_uses_disjoint_generator_seeds(tmp_path, tokenizer):
    manifest = ingest(IngestConfig(source="synthetic-math", max_train=300, max_eval=40), tokenizer, tmp_path / "p",
                      log=quiet)
    assert (manifest["train_rows"] + manifest["train_duplicates"], manifest["eval_rows"]) == (300, 40)
    train, eval_ = records(tmp_path / "p/train.parquet"), records(tmp_path / "p/eval.parquet")
    assert not {r["question"] for r in train} & {r["question"] for r in eval_}
    assert all(extract_answer(r["answer"]) for r in train)


def test_chat_template_and_sharegpt_first_user_turn(tmp_path, tokenizer):
    conversations = [[{"from": "human", "value": f"Tell me fact {i}."}, {"from": "gpt", "value": f"Fact {i}."},
                      {"from": "human", "value": "More?"}] for i in range(10)]
    source = tmp_path / "sharegpt.json"
    source.write_text(json.dumps([{"id": str(i), "conversations": c} for i, c in enumerate(conversations)]))
    manifest = ingest(IngestConfig(source=str(source), preset="sharegpt"), tokenizer, tmp_path / "p", log=quiet)
    assert manifest["template"] == "chat"
    row = records(tmp_path / "p/train.parquet")[0]
    assert "<|im_start|>user\nTell me fact" in row["prompt"] and row["prompt"].endswith("<|im_start|>assistant\n")
    assert row["answer"].startswith("Fact ") and "More?" not in row["prompt"]


def test_a_system_prompt_replaces_the_templates_default_and_needs_the_chat_template(tmp_path, tokenizer):
    source = write_jsonl(tmp_path / "q.jsonl", [{"question": f"Question {i}?"} for i in range(6)])
    ingest(IngestConfig(source=str(source), template="chat", system_prompt="Be brief."), tokenizer, tmp_path / "p",
           log=quiet)
    rows = records(tmp_path / "p/train.parquet")
    assert all(r["prompt"].startswith("<|im_start|>system\nBe brief.<|im_end|>") for r in rows)
    with pytest.raises(ValueError, match="ingest.system_prompt needs the chat template"):
        IngestConfig(source=str(source), template="plain", system_prompt="Be brief.")


def test_csv_and_parquet_sources_read_the_same_way(tmp_path, tokenizer):
    (tmp_path / "q.csv").write_text("prompt,label\n" + "".join(f"Question {i}?,{i}\n" for i in range(12)))
    ingest(IngestConfig(source=str(tmp_path / "q.csv"), fields={"question": "prompt", "answer": "label"}),
           tokenizer, tmp_path / "from-csv", log=quiet)
    pq.write_table(pq.read_table(tmp_path / "from-csv/train.parquet"), tmp_path / "q.parquet")
    manifest = ingest(IngestConfig(source=str(tmp_path / "q.parquet")), tokenizer, tmp_path / "from-parquet",
                      log=quiet)
    assert manifest["train_rows"] + manifest["eval_rows"] == 11  # a seeded 10% of train's 11 rows


def test_over_long_prompts_are_dropped_and_counted(tmp_path, tokenizer):
    rows = [{"question": "short?"}] * 1 + [{"question": "long " * 50 + str(i)} for i in range(9)]
    rows += [{"question": f"short {i}?"} for i in range(10)]
    source = write_jsonl(tmp_path / "q.jsonl", rows)
    manifest = ingest(IngestConfig(source=str(source), max_prompt_tokens=20), tokenizer, tmp_path / "p", log=quiet)
    assert manifest["train_too_long"] + manifest["eval_too_long"] == 9
    assert manifest["train_rows"] + manifest["eval_rows"] == 11


@pytest.mark.parametrize("eval_fraction", [0.1, 0.9])
def test_two_prompts_make_one_to_train_and_one_to_evaluate(tmp_path, tokenizer, eval_fraction):
    source = write_jsonl(tmp_path / "q.jsonl", [{"question": "What is 2+2?"}, {"question": "What is 3+3?"}])
    manifest = ingest(IngestConfig(source=str(source), eval_fraction=eval_fraction), tokenizer, tmp_path / "p",
                      log=quiet)
    assert (manifest["train_rows"], manifest["eval_rows"]) == (1, 1)


@pytest.mark.parametrize("case, expected", [
    ("missing", "does not exist"),
    ("unknown-preset", "unknown preset 'gsm9k'; choose one of gsm8k, spider"),
    ("bad-mapping", "field mapping question=prompt: {path} has no column 'prompt' (columns: text, label)"),
    ("empty", "is empty"),
    ("no-rows", "holds no rows"),
    ("latin-1", "is not UTF-8 text (byte 0xe9 at offset"),
    ("too-long", "every prompt is longer than max_prompt_tokens=2"),
    ("bad-parquet", "is not a readable Parquet file"),
    ("bad-json", "cannot parse"),
    ("no-question", "no question column is mapped"),
    ("one-question", "has 1 usable prompt: need at least 2 distinct prompts, one to train and one to evaluate"),
    ("one-distinct", "has 1 usable prompt after dropping 1 duplicates: need at least 2 distinct prompts"),
])
def test_bad_input_is_one_clear_line_and_leaves_no_output(tmp_path, tokenizer, case, expected):
    path = tmp_path / "source.jsonl"
    options = {}
    if case == "missing":
        path = tmp_path / "nowhere.jsonl"
    elif case == "unknown-preset":
        path = "gsm9k"
    elif case == "bad-mapping":
        write_jsonl(path, [{"text": "a", "label": "b"}])
        options = {"fields": {"question": "prompt"}}
    elif case == "empty":
        path.write_text("")
    elif case == "no-rows":
        path = tmp_path / "source.csv"
        path.write_text("question,answer\n")
    elif case == "latin-1":
        path.write_bytes('{"question": "caf\u00e9?"}\n'.encode("latin-1"))
    elif case == "too-long":
        write_jsonl(path, [{"question": f"a long question number {i}"} for i in range(10)])
        options = {"max_prompt_tokens": 2}
    elif case == "bad-parquet":
        path = tmp_path / "source.parquet"
        path.write_bytes(b"PAR1 this is not parquet")
    elif case == "bad-json":
        path.write_text('{"question": "ok"}\n{"question": \n')
    elif case == "no-question":
        write_jsonl(path, [{"text": "a"}])
    elif case == "one-question":  # once an IndexError from the tokenizer called on the empty train split
        write_jsonl(path, [{"question": "What is 2+2?"}])
    elif case == "one-distinct":
        write_jsonl(path, [{"question": "What is 2+2?"}] * 2)
    out = tmp_path / "prompts"
    with pytest.raises((IngestError, FileNotFoundError)) as error:
        ingest(IngestConfig(source=str(path), **options), tokenizer, out, log=quiet)
    message = str(error.value)
    assert expected.format(path=path) in message and "\n" not in message
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".prompts")]


def test_a_failed_rerun_keeps_the_previous_complete_output(tmp_path, tokenizer):
    source = write_jsonl(tmp_path / "q.jsonl", [{"question": f"Q{i}?"} for i in range(10)])
    ingest(IngestConfig(source=str(source)), tokenizer, tmp_path / "prompts", log=quiet)
    before = (tmp_path / "prompts/train.parquet").read_bytes()
    with pytest.raises(IngestError):
        ingest(IngestConfig(source=str(source), max_prompt_tokens=1), tokenizer, tmp_path / "prompts", log=quiet)
    assert (tmp_path / "prompts/train.parquet").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "prompts").iterdir()) == ["eval.parquet", "manifest.json",
                                                                         "train.parquet"]


def test_unknown_names_in_the_config_fail_at_validation():
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        IngestConfig(source="x.jsonl", preset="nope")
    with pytest.raises(ValueError, match="unknown template 'fancy'"):
        IngestConfig(source="x.jsonl", template="fancy")


def test_answer_extraction_follows_gsm8k_and_tolerates_commas_and_a_trailing_period():
    assert extract_answer("5 * 3 = 15\n#### 15") == "15"
    assert extract_answer("so #### 1,234.") == "1234"
    assert extract_answer("#### $5.50") == "5.5" and extract_answer("#### -3") == "-3"
    assert extract_answer("#### 7.0") == "7" and extract_answer("no marker 12") is None
    assert is_correct("2 + 2 = 4\n#### 4.", "#### 4") and not is_correct("#### 5", "#### 4")


def test_templates_render_the_papers_prompts():
    assert render_template("gsm8k", {"question": GSM8K_QUESTION}) == (
        f"Question:\n{GSM8K_QUESTION}\nAnswer:\nLet's think step by step.\n")
    spider = render_template("spider", {"question": "How many singers?", "context": "concert_singer"})
    assert spider.startswith("### Instruction:\nCould you translate") and spider.endswith("### Response:\n")
    assert "Database: concert_singer\nQuestion: How many singers?" in spider
