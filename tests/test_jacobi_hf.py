"""Tier (b): on tiny random Hugging Face models, Jacobi output == greedy `generate`, token for token (fp32)."""

import pytest
import torch

from cllm_core import jacobi_generate, reference_jacobi_generate
from cllm_core.engine import forwards
from tests.tiny import PAD, prompts, tiny_model

MAX_NEW = 40


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def model(request):
    model = tiny_model(request.param)
    model.generation_config.eos_token_id = None  # `generate` stops only where a test asks it to
    return model


@pytest.fixture(autouse=True)
def pack_small_batches(monkeypatch):
    """Batches of 2 rows and more decode packed here (by default from 8), so every test of a batch covers it."""
    monkeypatch.setattr(forwards, "PACK_FROM", 2)


_greedy_outputs: dict = {}


def greedy(model, ids, mask, eos):
    """`generate`'s greedy output, computed once per model, prompts and EOS (the parametrised tests share it)."""
    key = (model.config.model_type, tuple(ids.flatten().tolist()), tuple(mask.flatten().tolist()), tuple(eos or ()))
    if key not in _greedy_outputs:
        _greedy_outputs[key] = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=MAX_NEW,
                                              eos_token_id=eos, pad_token_id=PAD)
    return _greedy_outputs[key].clone()


def eos_from_output(model, ids, mask) -> int:
    """A token the model really emits early in row 0, so that EOS stops rows at different points."""
    return int(greedy(model, ids, mask, eos=None)[0, ids.shape[1] + 5])


@pytest.mark.parametrize("carry", [True, False])
@pytest.mark.parametrize("with_eos", [False, True])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("n_tokens", [1, 2, 4, 16, 32])
def test_jacobi_equals_greedy_generate(model, n_tokens, batch, with_eos, carry):
    ids, mask = prompts(batch)
    eos = [eos_from_output(model, ids, mask)] if with_eos else []
    expected = greedy(model, ids, mask, eos=eos or None)
    if not with_eos:
        assert expected.shape[1] == ids.shape[1] + MAX_NEW
    out = jacobi_generate(model, ids, mask, n_tokens=n_tokens, max_new_tokens=MAX_NEW, eos_token_id=eos,
                          pad_token_id=PAD, carry=carry)
    assert out.sequences.tolist() == expected.tolist()
    if with_eos:
        assert (out.sequences[0, ids.shape[1]:] == eos[0]).any()


@pytest.mark.parametrize("lookup", [1, 3])
@pytest.mark.parametrize(("n_tokens", "batch"), [(4, 1), (16, 4)])
def test_jacobi_with_lookup_drafts_equals_greedy_generate(model, n_tokens, batch, lookup):
    ids, mask = prompts(batch)
    eos = [eos_from_output(model, ids, mask)]
    out = jacobi_generate(model, ids, mask, n_tokens=n_tokens, max_new_tokens=MAX_NEW, eos_token_id=eos,
                          pad_token_id=PAD, lookup=lookup)
    assert out.sequences.tolist() == greedy(model, ids, mask, eos=eos).tolist()


def test_random_initialisation_reaches_the_same_fixed_points(model):
    ids, mask = prompts(4)
    expected = greedy(model, ids, mask, eos=None)
    out = jacobi_generate(model, ids, mask, n_tokens=8, max_new_tokens=MAX_NEW, eos_token_id=[], init="random",
                          seed=3, pad_token_id=PAD, return_trajectories=True)
    assert out.sequences.tolist() == expected.tolist()
    response = out.sequences[0, ids.shape[1]:].tolist()
    assert [t for block in out.trajectories[0] for t in block.fixed_point] == response


def test_batched_rows_equal_unpadded_single_rows(model):
    ids, mask = prompts(4)
    batched = jacobi_generate(model, ids, mask, n_tokens=8, max_new_tokens=MAX_NEW, eos_token_id=[])
    for row in range(4):
        alone = jacobi_generate(model, ids[row][mask[row].bool()][None], n_tokens=8, max_new_tokens=MAX_NEW,
                                eos_token_id=[])
        assert batched.sequences[row, -MAX_NEW:].tolist() == alone.sequences[0, -MAX_NEW:].tolist()
        assert batched.stats.row_forwards[row] == alone.stats.forwards


@pytest.mark.parametrize("n_tokens", [1, 4, 16])
def test_uncarried_random_trajectories_equal_the_reference_codes_state_for_state(model, n_tokens):
    """Without the carried token and with the same seeded draws, the batched KV-cached loop visits exactly
    the states of the research code's batch-1, no-cache loop; only its pass count can be one lower, since
    the token after a confirmed prefix needs no confirming pass."""
    ids, mask = prompts(4)
    ours = jacobi_generate(model, ids, mask, n_tokens=n_tokens, max_new_tokens=MAX_NEW, eos_token_id=[],
                           pad_token_id=PAD, init="random", seed=5, carry=False, return_trajectories=True)
    for row in range(4):
        alone = ids[row][mask[row].bool()][None]
        theirs = reference_jacobi_generate(model, alone, n_tokens=n_tokens, max_new_tokens=MAX_NEW, eos_token_id=[],
                                           pad_token_id=PAD, seed=5 + row, return_trajectories=True)
        assert [b.states for b in ours.trajectories[row]] == [b.states for b in theirs.trajectories[0]]
        assert all(0 <= b.passes - a.passes <= 1 for a, b in zip(ours.trajectories[row], theirs.trajectories[0]))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize(("blocks", "pool", "lookup_branch"), [(2, 0, False), (1, 4, False), (3, 4, False),
                                                            (1, 0, True), (2, 4, True)])
@pytest.mark.parametrize(("n_tokens", "batch"), [(4, 1), (16, 4)])
def test_multi_block_and_recycling_equal_greedy_generate(model, n_tokens, batch, blocks, pool, lookup_branch,
                                                         attention):
    """Recycled branches go through a 4-D additive mask (eager adds it to the scores) and leave the cache
    compacted; random models repeat themselves, so the pool has branches to feed."""
    ids, mask = prompts(batch)
    eos = [eos_from_output(model, ids, mask)]
    expected = greedy(model, ids, mask, eos=eos).tolist()
    model.set_attn_implementation(attention)
    try:
        out = jacobi_generate(model, ids, mask, n_tokens=n_tokens, max_new_tokens=MAX_NEW, eos_token_id=eos,
                              pad_token_id=PAD, blocks=blocks, open_at=0.5, pool=pool, lookup=1,
                              lookup_branch=lookup_branch)
    finally:
        model.set_attn_implementation("sdpa")
    assert out.sequences.tolist() == expected


@pytest.mark.parametrize(("blocks", "pool"), [(1, 0), (2, 4)])
def test_a_compacted_cache_changes_no_state_and_no_token(model, monkeypatch, blocks, pool):
    """The padded forward compacting its cache before every pass (each row's live slots gathered to the end) or
    never: the same trajectories, state for state, and greedy `generate`'s tokens; more of the attention live."""
    ids, mask = prompts(4)
    eos = [eos_from_output(model, ids, mask)]  # rows end at different passes: holes, then rows leaving
    runs = {}
    monkeypatch.setattr(forwards, "PACK", False)
    for name, at in (("never", 2.0), ("every pass", -1.0)):
        monkeypatch.setattr(forwards, "COMPACT_AT", at)
        runs[name] = jacobi_generate(model, ids, mask, n_tokens=8, max_new_tokens=MAX_NEW, eos_token_id=eos,
                                     pad_token_id=PAD, init="random", seed=5, carry=False, blocks=blocks, pool=pool,
                                     return_trajectories=True)
    never, always = runs["never"], runs["every pass"]
    assert always.sequences.tolist() == never.sequences.tolist() == greedy(model, ids, mask, eos=eos).tolist()
    assert [[b.states for b in row] for row in always.trajectories] == \
        [[b.states for b in row] for row in never.trajectories]
    assert always.stats.row_forwards == never.stats.row_forwards
    if pool == 0:  # (passes with branches are left out of the share: their masks are 4-D)
        assert always.stats.live_share > never.stats.live_share


def test_a_batch_feeds_each_row_what_it_feeds_alone_packed_exactly_that_padded_with_the_rest_counted(model,
                                                                                                    monkeypatch):
    """`stats.fed_share`: a row's own tokens among those fed. Each row of a batch (its prompt, then per pass its
    last token and its guess) is what it feeds decoded alone. The packed forward feeds exactly that; the padded one
    pads to the widest row and counts the padding."""
    ids, mask = prompts(4)
    eos = [eos_from_output(model, ids, mask)]
    kwargs = dict(n_tokens=8, max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=PAD, init="random",
                  carry=False)
    alone = [jacobi_generate(model, ids[b:b + 1, -int(mask[b].sum()):], mask[b:b + 1, -int(mask[b].sum()):],
                             seed=b, **kwargs).stats for b in range(4)]
    assert all(one.fed_share == 1.0 and one.fed_tokens == one.live_fed_tokens for one in alone)
    packed = jacobi_generate(model, ids, mask, seed=[0, 1, 2, 3], **kwargs).stats
    assert packed.fed_tokens == packed.live_fed_tokens == sum(one.fed_tokens for one in alone)
    monkeypatch.setattr(forwards, "PACK", False)
    padded = jacobi_generate(model, ids, mask, seed=[0, 1, 2, 3], **kwargs).stats
    assert padded.live_fed_tokens == sum(one.fed_tokens for one in alone)
    assert padded.fed_tokens > padded.live_fed_tokens
    assert padded.fed_share == padded.live_fed_tokens / padded.fed_tokens


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
        with forwards._packed_attention(model):
            assert model.config._attn_implementation == forwards.PACKED
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
    kind = torch.tensor([[0, 1, 1], [0, -1, -1]])
    mask = forwards._ragged_mask(torch.tensor([2, 3]), torch.tensor([3, 1]), forwards._own(kind))
    assert mask.shape == (2, 1, 3, 5)
    assert mask[0, 0].int().tolist() == [[1, 1, 1, 0, 0],
                                         [1, 1, 1, 1, 0],
                                         [1, 1, 1, 1, 1]]
    assert mask[1, 0].int().tolist() == [[1, 1, 1, 1, 0]] * 3


def test_one_token_prompts_padded_wider_decode_packed_without_a_prefill(model):
    """Regression: without carry the prefill stops before each prompt's last token; prompts of one token padded to
    two left it nothing to feed, and the packed forward built an empty mask and failed."""
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
