"""The two forwards of the Jacobi loop (cllm_core/engine/forwards.py, packed.py): which one a model and batch get,
packed against padded (the same predictions, their logits within a stated tolerance in fp32 and bf16, the same
trajectories), the packed attention switch (and under two threads at once), and the refusals."""
# ruff: noqa: F811 (the tiny models and the packing switch are test_jacobi_hf's fixtures, imported: tests take them by name)

import copy
import threading

import pytest
import torch

from cllm_core import jacobi_generate
from cllm_core.engine import forwards, packed
from cllm_core.engine.slots import Slot, sees_in_pass
from tests.test_jacobi_hf import MAX_NEW, eos_from_output, greedy, model, pack_small_batches  # noqa: F401
from tests.tiny import PAD, prompts, tiny_model

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.1}
"""The largest difference between a packed and a padded forward's logits, per dtype: the packed forward sums the
same products in another order (its linear layers see N tokens, not B x W), so only rounding differs: fp32's
7 digits, bf16's 3 (tiny random models' logits are of order 1)."""


def one_pass(forward, ids, mask):
    """Two passes with rows of different widths (a guess of 3, 2 and 1 tokens, and one row with a second branch):
    the first feeds the prompts too, the second (its main branches kept in the cache) feeds the same slots again.
    Each pass's logits at its fed slots, (N, V) row-major, and its predictions."""
    seen, found = [], []
    hook = forward.model.register_forward_hook(lambda module, args, out: seen.append(out.logits))
    M, P = Slot.MAIN, Slot.PADDING
    kind = torch.tensor([[Slot.LAST, M, M, M], [Slot.LAST, M, P, P], [Slot.LAST, P, P, P],
                         [Slot.LAST, M, M + 1, M + 1]])
    offset = torch.tensor([[0, 1, 2, 3], [0, 1, 0, 0], [0, 0, 0, 0], [0, 1, 1, 2]])
    live = kind != Slot.PADDING
    try:
        forward.prefill(ids, mask)
        for guess in ([[7, 8, 9, 10], [11, 12, PAD, PAD], [13, PAD, PAD, PAD], [14, 15, 16, 17]],
                      [[8, 9, 10, 11], [12, 13, PAD, PAD], [14, PAD, PAD, PAD], [15, 16, 17, 18]]):
            predictions = forward.predict(torch.tensor(guess), kind, offset)
            logits = seen[-1]
            found.append(((logits[0] if logits.shape[0] == 1 else logits[live]).float(),
                          [p for row, keep in zip(predictions, live.tolist()) for p, k in zip(row, keep) if k]))
            forward.keep_slots((kind == Slot.LAST) | (kind == M))
    finally:
        hook.remove()
    return torch.cat([logits for logits, _ in found]), [p for _, predictions in found for p in predictions]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_packed_pass_gives_the_padded_passs_logits_within_the_tolerance_and_its_predictions(model, dtype):
    cast = copy.deepcopy(model).to(dtype)  # the shared model stays as it is: bf16 and back would round its weights
    ids, mask = prompts(4)
    cpu = torch.device("cpu")
    packed_forward, padded_forward = forwards.make_forward(cast, cpu, 4), forwards.PaddedForward(cast, cpu)
    assert isinstance(packed_forward, packed.PackedForward)
    packed_logits, packed_predictions = one_pass(packed_forward, ids, mask)
    padded_logits, padded_predictions = one_pass(padded_forward, ids, mask)
    assert packed_logits.shape == padded_logits.shape == (2 * (4 + 2 + 1 + 4), model.config.vocab_size)
    difference = (packed_logits - padded_logits).abs().max().item()
    assert difference <= TOLERANCE[dtype], f"{dtype}: logits differ by {difference}"
    near_tie = padded_logits.topk(2).values.diff().abs().squeeze(-1) <= 2 * TOLERANCE[dtype]
    assert all(a == b or tie for a, b, tie in zip(packed_predictions, padded_predictions, near_tie.tolist()))
    if dtype == torch.float32:
        assert packed_predictions == padded_predictions


def test_the_packed_switch_serves_two_threads_decoding_one_model_at_once(model):
    """Two threads decode the same model at once, packed, while a third runs plain forwards of it: every decode
    is greedy `generate`'s, every plain forward SDPA's, and the model's attention is SDPA again afterwards."""
    ids, mask = prompts(4)
    expected = greedy(model, ids, mask, eos=None).tolist()
    with torch.inference_mode():
        plain = model(ids, attention_mask=mask).logits
    failures, start = [], threading.Barrier(3)

    def decode() -> None:
        start.wait()
        for _ in range(3):
            out = jacobi_generate(model, ids, mask, n_tokens=6, max_new_tokens=MAX_NEW, eos_token_id=[],
                                  pad_token_id=PAD)
            if out.sequences.tolist() != expected:
                failures.append("a packed decode differed from greedy generate")

    def forward() -> None:
        start.wait()
        for _ in range(10):
            with torch.inference_mode():
                if not torch.equal(model(ids, attention_mask=mask).logits, plain):
                    failures.append("a plain forward differed from SDPA's")

    def caught(work):
        def run() -> None:
            try:
                work()
            except Exception as error:  # a thread's exception would otherwise only be printed
                failures.append(f"{type(error).__name__}: {error}")
        return run

    threads = [threading.Thread(target=caught(work)) for work in (decode, decode, forward)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads) and failures == []
    assert model.config._attn_implementation == "sdpa" and packed._users == {}


def test_a_sliding_window_cache_is_left_uncompacted_and_decodes_exactly(monkeypatch):
    """Regression: compaction gathered a sliding-window layer's keys but not the length it tracks itself, and
    the next forward's mask no longer matched them."""
    model = tiny_model("mistral")
    model.generation_config.eos_token_id = None
    assert isinstance(forwards.make_forward(model, torch.device("cpu"), 4), forwards.PaddedForward)  # never packed
    monkeypatch.setattr(forwards, "COMPACT_AT", 0.0)  # whenever a slot could be freed
    ids, mask = prompts(4)
    out = jacobi_generate(model, ids, mask, n_tokens=8, max_new_tokens=MAX_NEW, eos_token_id=[], pad_token_id=PAD,
                          init="random", seed=5, carry=False)
    assert out.sequences.tolist() == greedy(model, ids, mask, eos=None).tolist()


@pytest.mark.parametrize(("carry", "blocks", "pool"), [(False, 1, 0), (True, 1, 0), (True, 2, 4)])
def test_the_packed_forward_visits_the_padded_forwards_states_and_gives_greedy_tokens(model, monkeypatch, carry,
                                                                                     blocks, pool):
    """Rows packed into one sequence with a ragged cache, or padded with holes: the same trajectories state for
    state, the same passes per row, and greedy `generate`'s tokens, as rows finish and leave (the buffer then
    drops them) and recycled branches win (their slots then move to the front of what the row wrote)."""
    ids, mask = prompts(4)
    eos = [eos_from_output(model, ids, mask)]
    runs = {}
    for pack in (True, False):
        monkeypatch.setattr(forwards, "PACK", pack)
        assert isinstance(forwards.make_forward(model, torch.device("cpu"), 4),
                          forwards.PackedForward if pack else forwards.PaddedForward)
        runs[pack] = jacobi_generate(model, ids, mask, n_tokens=8, max_new_tokens=MAX_NEW, eos_token_id=eos,
                                     pad_token_id=PAD, init="random", seed=3, carry=carry, blocks=blocks,
                                     open_at=0.5, pool=pool, lookup=1, return_trajectories=True)
    packed, padded = runs[True], runs[False]
    assert packed.sequences.tolist() == padded.sequences.tolist() == greedy(model, ids, mask, eos=eos).tolist()
    assert [[b.states for b in row] for row in packed.trajectories] == \
        [[b.states for b in row] for row in padded.trajectories]
    assert packed.stats.row_forwards == padded.stats.row_forwards
    assert packed.stats.fed_share == 1.0


def test_a_packed_decode_leaves_the_models_attention_as_it_was_and_plain_forwards_meanwhile_unchanged(model):
    """The packed forward routes the model's attention through its own function only while it runs; a forward of
    the same model without its layout meanwhile (another thread's) gets transformers' SDPA, mask and all."""
    ids, mask = prompts(4)
    with torch.inference_mode():
        before = model(ids, attention_mask=mask).logits
        with packed.packed_attention(model):
            assert model.config._attn_implementation == packed.PACKED
            during = model(ids, attention_mask=mask).logits
            # a decode that starts meanwhile is packed all the same: its path does not depend on timing
            assert isinstance(forwards.make_forward(model, torch.device("cpu"), 4), forwards.PackedForward)
    assert torch.equal(before, during)
    jacobi_generate(model, ids, mask, n_tokens=4, max_new_tokens=8, eos_token_id=[], pad_token_id=PAD)
    assert model.config._attn_implementation == "sdpa"


def test_models_the_packed_forward_cannot_serve_and_batches_below_pack_from_get_the_padded_one(model, monkeypatch):
    """Eager attention (not SDPA), models that are not transformers models (the fakes) and batches of fewer than
    `PACK_FROM` rows decode padded."""
    from tests.fakes import successor

    monkeypatch.setattr(forwards, "PACK_FROM", 8)
    cpu = torch.device("cpu")
    assert isinstance(forwards.make_forward(model, cpu, 7), forwards.PaddedForward)
    assert isinstance(forwards.make_forward(model, cpu, 8), forwards.PackedForward)
    # CUDA decodes padded until a variable-length path is measured there (#32.5): the packed one's dense mask
    # keeps SDPA off its fused kernels (a CUDA device object needs no GPU)
    assert isinstance(forwards.make_forward(model, torch.device("cuda"), 64), forwards.PaddedForward)

    model.set_attn_implementation("eager")
    try:
        assert isinstance(forwards.make_forward(model, cpu, 8), forwards.PaddedForward)
    finally:
        model.set_attn_implementation("sdpa")
    assert isinstance(forwards.make_forward(successor(), cpu, 8), forwards.PaddedForward)


def test_the_ragged_mask_lets_each_row_see_its_committed_slots_then_its_own_fed_slots_causally():
    """Hand-written: row 0 holds 2 committed slots and feeds 3 tokens, row 1 holds 3 and feeds 1 (2 padding
    queries); S = max(2 + 3, 3 + 1) = 5. Padding queries see what the row's last token sees (their output is
    dropped); nothing sees a slot past the row's own."""
    kind = torch.tensor([[Slot.LAST, Slot.MAIN, Slot.MAIN], [Slot.LAST, Slot.PADDING, Slot.PADDING]])
    mask = packed._ragged_mask(torch.tensor([2, 3]), torch.tensor([3, 1]), sees_in_pass(kind))
    assert mask.shape == (2, 1, 3, 5)
    assert mask[0, 0].int().tolist() == [[1, 1, 1, 0, 0],
                                         [1, 1, 1, 1, 0],
                                         [1, 1, 1, 1, 1]]
    assert mask[1, 0].int().tolist() == [[1, 1, 1, 1, 0]] * 3


def test_one_token_prompts_padded_wider_decode_packed_without_a_prefill(model):
    """Regression: the prompts' part fed before their last tokens (once a prefill of its own, now the first pass's)
    is empty for prompts of one token padded to two, and the packed forward once built an empty mask and failed."""
    ids, mask = torch.tensor([[PAD, 5], [PAD, 9]]), torch.tensor([[0, 1], [0, 1]])
    assert isinstance(forwards.make_forward(model, torch.device("cpu"), 2), forwards.PackedForward)
    out = jacobi_generate(model, ids, mask, n_tokens=4, max_new_tokens=MAX_NEW, eos_token_id=[], pad_token_id=PAD,
                          init="random", carry=False)
    assert out.sequences.tolist() == greedy(model, ids, mask, eos=None).tolist()


def test_attention_the_packed_forward_does_not_serve_fails_in_one_line_before_a_token():
    """A Mistral whose layers are all full attention but whose config keeps a sliding window passes the window to
    its attention: the packed mask would ignore it, so the first forward refuses, naming it and the way out."""
    model = tiny_model("mistral")
    model.config.layer_types = ["full_attention"] * model.config.num_hidden_layers
    model.config.sliding_window = 4
    ids, mask = prompts(4)
    assert isinstance(forwards.make_forward(model, torch.device("cpu"), 4), forwards.PackedForward)  # plain layers
    refusal = r"does not serve this MistralAttention \(sliding_window\).*attn_implementation: eager"
    with pytest.raises(ValueError, match=refusal):
        jacobi_generate(model, ids, mask, n_tokens=4, max_new_tokens=8, eos_token_id=[], pad_token_id=PAD)
    assert model.config._attn_implementation == "sdpa"
