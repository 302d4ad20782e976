"""Bad input fails before any forward, with one error that names the argument and the fix."""

import pytest
import torch
from transformers import LlamaModel

from cllm_core import ar_generate, jacobi_generate, lookup_generate, reference_jacobi_generate
from cllm_core.engine.errors import UserError
from tests.fakes import constant
from tests.tiny import tiny_model

PROMPT = torch.tensor([[5, 6, 7]])


@pytest.mark.parametrize("n_tokens", [0, -3, 2.5])
def test_n_tokens_must_be_positive(n_tokens):
    with pytest.raises(ValueError, match="n_tokens must be a positive integer"):
        jacobi_generate(constant(), PROMPT, n_tokens=n_tokens)


@pytest.mark.parametrize("decode", [jacobi_generate, ar_generate, lookup_generate, reference_jacobi_generate])
def test_max_new_tokens_must_be_positive(decode):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        decode(model, PROMPT, max_new_tokens=0)


@pytest.mark.parametrize("ids", [torch.zeros((1, 0), dtype=torch.long), torch.zeros((0, 4), dtype=torch.long)])
def test_empty_prompt_is_refused(ids):
    with pytest.raises(ValueError, match="input_ids is empty"):
        jacobi_generate(constant(), ids)


def test_prompt_must_be_two_dimensional():
    with pytest.raises(ValueError, match=r"input_ids must be a 2-D tensor.*ids\[None\]"):
        jacobi_generate(constant(), torch.tensor([1, 2, 3]))


def test_an_all_padding_row_is_an_empty_prompt():
    ids = torch.tensor([[0, 0], [4, 5]])
    with pytest.raises(ValueError, match="empty prompt"):
        jacobi_generate(constant(), ids, torch.tensor([[0, 0], [1, 1]]), pad_token_id=0)


def test_padded_batch_without_attention_mask_is_refused():
    ids = torch.tensor([[0, 0, 4, 5], [3, 4, 5, 6]])
    with pytest.raises(ValueError, match="attention_mask is None"):
        jacobi_generate(constant(), ids, pad_token_id=0)


def test_right_padding_is_refused():
    ids = torch.tensor([[4, 5, 0], [3, 4, 5]])
    with pytest.raises(ValueError, match="left padding"):
        jacobi_generate(constant(), ids, torch.tensor([[1, 1, 0], [1, 1, 1]]))


def test_model_without_language_model_head_is_refused():
    base = LlamaModel(tiny_model("llama").config)
    with pytest.raises(UserError, match="LlamaModel is not a causal LM"):
        jacobi_generate(base, PROMPT)
    with pytest.raises(UserError, match="not a causal LM"):
        ar_generate(base, PROMPT)


def test_unknown_init_strategy_is_refused():
    with pytest.raises(ValueError, match="init must be 'repeat', 'random' or 'none'"):
        jacobi_generate(constant(), PROMPT, init="zeros")


def test_every_shipped_profile_and_deployment_parameter_set_validates():
    """configs/*.yaml and prefect.yaml's pipeline parameters are the same pydantic Profile; a typo in either
    would only show when a user (or a worker) runs it."""
    from pathlib import Path

    import yaml

    from cllm_core.runtime.config import Profile, load_profile

    root = Path(__file__).parents[1]
    profiles = sorted((root / "configs").glob("*.yaml"))
    assert {p.name for p in profiles} >= {"demo.yaml", "smollm2-gsm8k.yaml", "gsm8k-qwen-gpu.yaml"}
    for path in profiles:
        load_profile(path)
    deployments = yaml.safe_load((root / "prefect.yaml").read_text())["deployments"]
    pipeline = [d for d in deployments if d["entrypoint"] == "flows/pipeline.py:cllm_pipeline"]
    assert {d["name"] for d in pipeline} == {"local", "gpu"}
    local = next(d for d in pipeline if d["name"] == "local")
    assert Profile.model_validate(local["parameters"]["profile"]) == load_profile(root / "configs/demo.yaml")
    assert load_profile(root / "configs/smollm2-gsm8k.yaml").model.device == "auto"  # `gpu` runs it unchanged


def test_an_attention_kernel_that_ignores_custom_masks_is_refused_before_any_work():
    """flash_attention_2 applies no 4-D mask: noisy blocks would see clean ones, a cache's holes would be read
    (#32.4). A profile says so when it is read, a model loaded with it at the first decode."""
    from pydantic import ValidationError

    from cllm_core.runtime.config import ModelConfig

    with pytest.raises(ValidationError, match="Input should be 'sdpa' or 'eager'"):
        ModelConfig(name_or_path="x", attn_implementation="flash_attention_2")
    model = tiny_model("llama")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(UserError, match="attention 'flash_attention_2' does not apply the custom attention masks"):
        jacobi_generate(model, PROMPT)
