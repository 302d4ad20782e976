"""Tier (b): on tiny random Hugging Face models, Jacobi output == greedy `generate`, token for token (fp32)."""

import pytest

from cllm_core import greedy_generate, jacobi_generate, reference_jacobi_generate
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


@pytest.mark.parametrize("with_eos", [False, True])
@pytest.mark.parametrize("batch", [1, 4])
def test_the_loops_own_ar_equals_greedy_generate(model, batch, with_eos):
    ids, mask = prompts(batch)
    eos = [eos_from_output(model, ids, mask)] if with_eos else []
    out = greedy_generate(model, ids, mask, max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=PAD)
    assert out.sequences.tolist() == greedy(model, ids, mask, eos=eos or None).tolist()


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
