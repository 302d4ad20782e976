"""A CLLM directory decodes with Jacobi through transformers' own `generate(custom_generate=dir)`: the shipped file
is the engine's modules bundled (regenerated here and compared), it needs neither this project nor anything but
torch and transformers, and its output is greedy `generate`'s, token for token (fp32)."""

import ast
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, TextIteratorStreamer

from cllm_core import jacobi_generate
from cllm_core.training.shipping import SHIPPED, bundle, ship_generate
from tests.test_layering import ROOT, module_graph
from tests.tiny import PAD, prompts, tiny_model

MAX_NEW = 40


@pytest.fixture(scope="module")
def cllm_dir(tmp_path_factory):
    """A tiny Llama saved as a CLLM directory would be: `cllm_n_tokens` in its config, the shipped generate."""
    directory = tmp_path_factory.mktemp("shipped") / "cllm"
    model = tiny_model("llama")
    model.config.cllm_n_tokens = 6
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    model.save_pretrained(directory)
    ship_generate(directory)
    return directory


@pytest.fixture(scope="module")
def model(cllm_dir):
    return AutoModelForCausalLM.from_pretrained(cllm_dir).eval()


def test_the_shipped_file_is_the_engines_source_read_afresh(cllm_dir):
    """Checked against the engine's source as it is now, read here, not against `bundle()`: every top-level
    definition of every engine module the adapter imports (however deep) is in the shipped file verbatim, each
    module after the modules it imports, and nothing else of the project."""
    shipped = (cllm_dir / SHIPPED).read_text()
    graph = module_graph()
    needed, frontier = set(), ["cllm_core.engine.hf_generate"]
    while frontier:
        module = frontier.pop()
        if module not in needed:
            needed.add(module)
            frontier += graph[module]
    assert needed >= {"cllm_core.engine.jacobi", "cllm_core.engine.forwards", "cllm_core.engine.errors"}
    starts = {}
    for module in needed:
        path = ROOT / (module.replace(".", "/") + ".py")
        source = path.read_text()
        for node in ast.parse(source).body:
            if isinstance(node, ast.FunctionDef | ast.ClassDef):
                assert ast.get_source_segment(source, node) in shipped, f"{path}: {node.name} is not shipped as it is"
        starts[module] = shipped.index(f"# ---- {path.relative_to(ROOT)} ----")
    assert all(starts[dependency] < starts[module] for module in needed for dependency in graph[module])
    assert "cllm_core" not in "".join(line for line in shipped.splitlines() if line.startswith(("from", "import")))
    assert shipped == bundle()  # and shipping writes what bundling makes


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("with_eos", [False, True])
def test_generate_with_the_shipped_method_equals_greedy_generate(model, cllm_dir, batch, with_eos):
    ids, mask = prompts(batch)
    plain = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=MAX_NEW, pad_token_id=PAD)
    eos = int(plain[0, ids.shape[1] + 5]) if with_eos else None  # a token row 0 really emits: rows stop apart
    expected = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=eos,
                              pad_token_id=PAD)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, eos_token_id=eos,
                         custom_generate=str(cllm_dir), trust_remote_code=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, expected)
    engine = jacobi_generate(model, ids, mask, n_tokens=6, max_new_tokens=MAX_NEW, eos_token_id=eos,
                             pad_token_id=PAD)
    assert out.forwards == engine.stats.forwards  # at the trained block size (config.cllm_n_tokens)
    # one meaning of tokens per forward: new tokens over the forwards each row took part in, as `cllm eval` counts
    assert out.row_forwards == engine.stats.row_forwards and out.new_tokens == engine.stats.row_new_tokens
    assert out.tokens_per_forward == pytest.approx(sum(out.new_tokens) / sum(out.row_forwards))
    assert out.tokens_per_forward == pytest.approx(engine.stats.tokens_per_forward)
    if batch > 1:  # the old figure (per batched forward) grew with the batch: about 3x for 3 rows
        assert out.tokens_per_forward < sum(out.new_tokens) / out.forwards
    bare = model.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, eos_token_id=eos, n_tokens=3,
                          custom_generate=str(cllm_dir), trust_remote_code=True)
    assert torch.equal(bare, expected)  # a plain tensor, as generate returns; n_tokens chosen by the caller


def test_from_pretrained_with_trust_remote_code_makes_the_shipped_method_the_models_generate(cllm_dir, model):
    remote = AutoModelForCausalLM.from_pretrained(cllm_dir, trust_remote_code=True).eval()
    ids, mask = prompts(1)
    out = remote.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, return_dict_in_generate=True)
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=PAD)
    engine = jacobi_generate(model, ids, mask, n_tokens=6, max_new_tokens=MAX_NEW, pad_token_id=PAD)
    assert torch.equal(out.sequences, greedy)  # the tokens, and Jacobi's passes: the trained block size's
    assert out.forwards == engine.stats.forwards < MAX_NEW


def test_a_streamer_receives_each_pass_in_the_order_of_the_sequences(model, cllm_dir):
    class Recorder:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.flatten().tolist())

        def end(self):
            self.ended = True

    ids, mask = prompts(1)
    recorder = Recorder()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, streamer=recorder,
                         custom_generate=str(cllm_dir), trust_remote_code=True)
    assert recorder.puts[0] == ids[0].tolist() and recorder.ended
    assert sum(recorder.puts[1:], []) == out[0, ids.shape[1]:].tolist()
    assert max(len(p) for p in recorder.puts[1:]) > 1  # several tokens arrive in one burst
    with pytest.raises(ValueError, match="streamer: streams one row; got a batch of 3"):
        three, three_mask = prompts(3)
        model.generate(three, attention_mask=three_mask, streamer=recorder, custom_generate=str(cllm_dir),
                       trust_remote_code=True)


@pytest.mark.parametrize("setting, message", [
    ({"do_sample": True}, "do_sample/num_beams: Jacobi decoding is greedy"),
    ({"num_beams": 2}, "do_sample/num_beams: Jacobi decoding is greedy"),
    ({"repetition_penalty": 1.3}, "repetition_penalty: set in the generation config"),
    ({"logits_processor": [lambda ids, scores: scores]}, "logits_processor: not supported by Jacobi decoding"),
])
def test_what_jacobi_cannot_honour_is_refused_in_one_line(model, cllm_dir, setting, message):
    ids, mask = prompts(1)
    with pytest.raises(ValueError, match=message):
        model.generate(ids, attention_mask=mask, max_new_tokens=4, custom_generate=str(cllm_dir),
                       trust_remote_code=True, **setting)


def test_the_shipped_method_needs_only_torch_and_transformers(cllm_dir):
    """A fresh interpreter where importing cllm_core fails decodes the directory as a user without it would."""
    script = f"""
import json, sys
sys.modules["cllm_core"] = None  # any import of this project raises ImportError
from transformers import AutoModelForCausalLM
import torch
model = AutoModelForCausalLM.from_pretrained({str(cllm_dir)!r}).eval()
ids = torch.tensor([[5, 9, 13, 17]])
out = model.generate(ids, max_new_tokens=12, custom_generate={str(cllm_dir)!r}, trust_remote_code=True,
                     return_dict_in_generate=True)
print(json.dumps({{"sequence": out.sequences[0].tolist(), "forwards": out.forwards}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    model = AutoModelForCausalLM.from_pretrained(cllm_dir).eval()
    expected = model.generate(torch.tensor([[5, 9, 13, 17]]), max_new_tokens=12, do_sample=False)
    assert result["sequence"] == expected[0].tolist() and result["forwards"] <= 12


def test_a_text_streamer_prints_the_decoded_text(model, cllm_dir, tiny_model_dir):
    from cllm_core import ModelConfig, load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)))
    ids, mask = prompts(1)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, streamer=streamer,
                         custom_generate=str(cllm_dir), trust_remote_code=True)
    assert "".join(streamer) == tokenizer.decode(out[0, ids.shape[1]:])


def test_reshipping_leaves_an_unchanged_file_alone_and_replaces_a_changed_one_whole(tmp_path, monkeypatch):
    """A reused CLLM's generate.py was truncated and rewritten in place while a `generate` might load it (#32.11)."""
    import cllm_core.runtime.files

    path = ship_generate(tmp_path)
    before = path.stat()
    ship_generate(tmp_path)  # unchanged: not written again
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    path.write_text("# an older engine\n")

    def failing(fd):
        raise OSError("disk full")

    monkeypatch.setattr(cllm_core.runtime.files.os, "fsync", failing)
    with pytest.raises(OSError, match="disk full"):
        ship_generate(tmp_path)
    assert path.read_text() == "# an older engine\n"  # the old file whole, no half-written new one
    assert sorted(p.name for p in path.parent.iterdir()) == ["generate.py", "requirements.txt"]
    monkeypatch.undo()
    ship_generate(tmp_path)
    assert path.read_text() == bundle()
