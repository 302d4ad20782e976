import pytest
import torch

from benchmarks.tiny_model import save_tiny_model
from cllm_core import SMOLLM2, load_model, load_tokenizer


@pytest.fixture(autouse=True, scope="session")
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama saved with SmolLM2's tokenizer: an ordinary model directory, built offline."""
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def smollm2():
    return load_model(SMOLLM2), load_tokenizer(SMOLLM2)
