"""Tier (a): the Jacobi loop against fake models whose greedy output and pass counts are known exactly."""

import pytest
import torch

from cllm_core import jacobi_generate, jacobi_steps
from tests.fakes import FakeLM, by_position, constant, noisy, scripted, successor

PROMPT = torch.tensor([[1, 2, 3]])


@pytest.mark.parametrize("n_tokens", [1, 2, 4, 16])
def test_constant_model_converges_in_one_pass_per_block(n_tokens):
    out = jacobi_generate(constant(7), PROMPT, n_tokens=n_tokens, max_new_tokens=12, eos_token_id=[],
                          return_trajectories=True)
    assert out.sequences[0, 3:].tolist() == [7] * 12
    # the first pass feeds the prompt with block 0's guess (the prompt's last token repeated: wrong, so it fixes
    # one token and the update makes the rest right), then a whole block per pass (n_tokens=1: the carried token
    # fills a block, so a pass works on the next one and fixes it and its own carried token)
    assert out.stats.forwards == 1 + -(-11 // max(n_tokens, 2))
    assert out.trajectories[0][0].passes == min(n_tokens, 2)
    assert all(block.passes <= 1 for block in out.trajectories[0][1:])


def test_successor_model_needs_one_pass_per_token():
    model = successor()
    out = jacobi_generate(model, PROMPT, n_tokens=4, max_new_tokens=8, eos_token_id=[])
    assert out.sequences[0, 3:].tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert out.stats.forwards == 8 and out.stats.tokens_per_forward == 1.0
    assert out.stats.fast_forward == 0
    # only the unconverged tail is re-fed: the prompt and block 0's whole guess (2 + 1 + 4), then [last] + 3, 2, 1
    # guesses in block 0, then 4, 3, 2, 1 in block 1
    assert [q for _, q in model.calls] == [7, 4, 3, 2, 5, 4, 3, 2]


def test_fast_forward_and_stationary_counts_on_a_known_trajectory():
    # positions 3..: 5 6 3 3 9; block 0's guess, the prompt's last token repeated (3 3 3 3), is right at positions
    # 5 and 6 from the first pass on; the second pass confirms 6 3 3 and fixes 9, the next block's carried token
    model = by_position([0, 0, 0, 5, 6, 3, 3, 9, 9, 9])
    out = jacobi_generate(model, PROMPT, n_tokens=4, max_new_tokens=5, eos_token_id=[], return_trajectories=True)
    assert out.sequences[0, 3:].tolist() == [5, 6, 3, 3, 9]
    assert out.stats.forwards == 2
    assert (out.stats.fast_forward, out.stats.stationary) == (3, 2)
    first = out.trajectories[0][0]
    assert first.states == [[3, 3, 3, 3], [5, 6, 3, 3]] and first.fixed_point == [5, 6, 3, 3] and first.passes == 2
    assert out.trajectories[0][1].fixed_point == [9] and out.trajectories[0][1].passes == 0  # the carried token


@pytest.mark.parametrize("carry", [True, False])
@pytest.mark.parametrize(("model", "eos"), [(constant(7), []), (noisy(), []), (successor(), [9])])
def test_every_token_a_pass_fixes_beyond_its_first_is_fast_forwarded_also_when_eos_or_the_budget_cuts(model, eos,
                                                                                                      carry):
    prompts = torch.randint(3, 60, (2, 5), generator=torch.Generator().manual_seed(0))
    out = jacobi_generate(model, prompts, n_tokens=4, max_new_tokens=10, eos_token_id=eos, carry=carry)
    steps = list(jacobi_steps(model, prompts, n_tokens=4, max_new_tokens=10, eos_token_id=eos, carry=carry))
    fixing = sum(1 for step in steps for row in step.rows if row.committed)
    assert out.stats.fast_forward == out.stats.new_tokens - fixing  # a whole uncarried block: L - 1, not L
    assert 0 <= out.stats.stationary <= out.stats.new_tokens - 2  # each row's first token was never fed before


@pytest.mark.parametrize("n_tokens", [1, 3, 8])
@pytest.mark.parametrize("batch", [1, 3])
def test_every_pass_commits_a_token_and_the_loop_stays_in_bound(n_tokens, batch):
    prompts = torch.randint(3, 60, (batch, 5), generator=torch.Generator().manual_seed(batch))
    steps = list(jacobi_steps(noisy(), prompts, n_tokens=n_tokens, max_new_tokens=20, eos_token_id=[]))
    assert all(len(row.committed) >= 1 for step in steps for row in step.rows)
    assert len(steps) <= 20
    assert all(sum(len(r.committed) for s in steps for r in s.rows if r.row == b) == 20 for b in range(batch))


def test_first_eos_ends_the_row_and_nothing_after_it_is_returned():
    out = jacobi_generate(constant(7), PROMPT, n_tokens=4, max_new_tokens=12, eos_token_id=7)
    assert out.sequences.tolist() == [[1, 2, 3, 7]]
    out = jacobi_generate(successor(), PROMPT, n_tokens=16, max_new_tokens=12, eos_token_id=6, pad_token_id=0,
                          return_trajectories=True)
    assert out.sequences.tolist() == [[1, 2, 3, 4, 5, 6]]
    assert out.trajectories[0][0].fixed_point == [4, 5, 6]
    assert all(len(state) == 3 for state in out.trajectories[0][0].states)


def test_finished_rows_leave_the_batch():
    model = successor()
    prompts = torch.tensor([[1, 2, 3], [20, 21, 22]])
    out = jacobi_generate(model, prompts, n_tokens=4, max_new_tokens=8, eos_token_id=6, pad_token_id=0)
    assert out.sequences.tolist() == [[1, 2, 3, 4, 5, 6, 0, 0, 0, 0, 0], [20, 21, 22, *range(23, 31)]]
    assert out.stats.row_forwards == [3, 8]
    assert [rows for rows, _ in model.calls] == [2, 2, 2] + [1] * 5


def test_random_init_is_seeded_per_row():
    prompts = torch.randint(3, 60, (2, 6), generator=torch.Generator().manual_seed(0))
    runs = [jacobi_generate(successor(), prompts, n_tokens=8, max_new_tokens=16, eos_token_id=[], init="random",
                            seed=seed, return_trajectories=True) for seed in (0, 0, 1)]
    initial = [[row[0].states[0] for row in run.trajectories] for run in runs]
    assert initial[0] == initial[1] and initial[0] != initial[2]
    assert torch.equal(runs[0].sequences, runs[2].sequences)
    context = [set(p.tolist()) | set(range(p[-1].item() + 1, p[-1].item() + 18)) for p in prompts]
    assert all(set(state[1:]) <= ctx for state, ctx in zip(initial[0], context))


def test_a_stop_request_ends_decoding_before_the_next_pass():
    """SIGTERM once waited for a whole shard (#14): the one Jacobi loop now checks for a stop before each pass."""
    from cllm_core.engine.stopping import Stopped, clear_stop, request_stop

    model = successor()
    steps = jacobi_steps(model, PROMPT, n_tokens=4, max_new_tokens=8, eos_token_id=[])
    next(steps), next(steps)  # two passes (the first feeds the prompt too)
    request_stop()
    try:
        with pytest.raises(Stopped):
            next(steps)
    finally:
        clear_stop()
    assert len(model.calls) == 2  # no forward after the request


def test_lookup_drafts_turn_a_cycle_the_successor_model_walks_token_by_token_into_whole_blocks():
    """next = token % 8 + 1 after the prompt 1..8: plain Jacobi is wrong until each predecessor is fixed (one
    token a pass); the context already holds the cycle, so a new block's draft from it is right whole. Block 0 opens
    before the first token is known ("7 8" occurs nowhere earlier): it is walked like plain Jacobi's."""
    prompt, expected = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]), [1, 2, 3, 4, 5, 6, 7, 8] * 2
    cycle = lambda: FakeLM(lambda ids, pos: ids % 8 + 1)  # noqa: E731
    plain = jacobi_generate(cycle(), prompt, n_tokens=4, max_new_tokens=16, eos_token_id=[])
    drafted = jacobi_generate(cycle(), prompt, n_tokens=4, max_new_tokens=16, eos_token_id=[], lookup=2)
    assert plain.sequences[0, 8:].tolist() == drafted.sequences[0, 8:].tolist() == expected
    assert plain.stats.forwards == 16
    assert drafted.stats.forwards == 7  # block 0 one token a pass (4), then 4 + 4 + 4 a pass (the last's bonus)


def test_a_lookup_draft_continues_the_latest_earlier_occurrence_of_the_longest_matching_tail():
    from cllm_core.engine.drafts import lookup_draft

    context = [5, 1, 2, 9, 7, 1, 2, 3, 4, 1, 2]
    assert lookup_draft(context, 3, ngram=2) == [3, 4, 1]  # "1 2" last seen at 5..6
    assert lookup_draft(context, 3, ngram=3) == [3, 4, 1]  # "4 1 2" never occurred before: falls back to "1 2"
    assert lookup_draft([4, 8, 9, 3, 8], 5, ngram=1) == [9, 3, 8]  # what there is, up to the context's end
    assert lookup_draft([1, 2, 3], 2, ngram=2) == []  # no earlier occurrence of any tail
    with pytest.raises(ValueError, match="lookup must be >= 0"):
        jacobi_generate(constant(), PROMPT, lookup=-1)


# a prompt that holds the answer's run 3..8 behind a wrong token: the lookup draft after "2" is "9 3 4 5 6 7 8"
SHIFTED_PROMPT = [1, 2, 9, 3, 4, 5, 6, 7, 8, 1]
SHIFTED_TRUTH = [2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18]


@pytest.mark.parametrize("pool", [0, 1, 4])
def test_recycling_recovers_a_rejected_draft_behind_its_one_wrong_token(pool):
    """Pass 1 rejects the draft at its first token "9" and commits "3"; the scripted model then sees only wrong
    contexts past it, so plain Jacobi walks token by token. The pool still holds the draft: after "3" it says
    "4 5 6 7 8", which pass 2 feeds as a second branch and confirms whole, with the bonus token."""
    model = scripted(SHIFTED_PROMPT, SHIFTED_TRUTH)
    out = jacobi_generate(model, torch.tensor([SHIFTED_PROMPT]), n_tokens=8, max_new_tokens=16, eos_token_id=[],
                          lookup=1, pool=pool)
    assert out.sequences[0, len(SHIFTED_PROMPT):].tolist() == SHIFTED_TRUTH
    if pool == 0:
        assert out.stats.forwards == 15  # "2" with the prompt, then one a pass (block 1's first token carried)
    else:  # "2" with the prompt, "3", "4 5 6 7 8 10", then block 1 one token a pass
        assert out.stats.forwards == 10
        assert model.calls[1] == (1, 1 + 6 + 6)  # the last token, the guess, the recycled branch


def test_a_lookup_branch_recovers_the_prompts_run_after_the_rejected_draft():
    """The same walk as above without a pool: after "3" the lookup draft ("4 5 6 7 8 1", from the prompt) is fed
    beside Jacobi's wrong update, confirmed to its last token, and committed with the bonus token."""
    model = scripted(SHIFTED_PROMPT, SHIFTED_TRUTH)
    out = jacobi_generate(model, torch.tensor([SHIFTED_PROMPT]), n_tokens=8, max_new_tokens=16, eos_token_id=[],
                          lookup=1, lookup_branch=True)
    assert out.sequences[0, len(SHIFTED_PROMPT):].tolist() == SHIFTED_TRUTH
    assert out.stats.forwards == 10 and model.calls[1] == (1, 1 + 6 + 6)
    with pytest.raises(ValueError, match="lookup_branch"):
        jacobi_generate(constant(), PROMPT, lookup_branch=True)


def test_multi_block_opens_the_next_block_once_the_share_is_solved():
    """by_position: a pass makes every guess token right, so a block takes two passes; with the next block
    opened at half of the current one, its guess converges in the same passes and a block pair takes three."""
    sequence = [0, 0, 0, *range(10, 40)]
    runs = {}
    for blocks, open_at in [(1, 0.5), (2, 1.0), (2, 0.5), (3, 0.5)]:
        model = by_position(sequence)
        out = jacobi_generate(model, PROMPT, n_tokens=4, max_new_tokens=16, eos_token_id=[], blocks=blocks,
                              open_at=open_at)
        assert out.sequences[0, 3:].tolist() == sequence[3:19]
        runs[blocks, open_at] = (out.stats.forwards, [q for _, q in model.calls])
    # the first pass feeds the prompt with block 0's whole guess (2 + 1 + 4); open_at 1: never before a block ends
    assert runs[1, 0.5] == runs[2, 1.0] == (8, [7, 4, 4, 3, 4, 3, 4, 3])
    # block 2 opens after pass 3 (2 of block 1 committed): 1 + 2 + 4 slots; its tail is right a pass later
    assert runs[2, 0.5] == (7, [7, 4, 4, 7, 4, 4, 3])
    assert runs[3, 0.5] == runs[2, 0.5]  # a third block opens only once the second is half solved


def test_recycling_and_multi_block_arguments_are_checked():
    for bad, message in [({"blocks": 0}, "blocks"), ({"open_at": 0.0}, "open_at"), ({"open_at": 1.5}, "open_at"),
                         ({"pool": -1}, "pool")]:
        with pytest.raises(ValueError, match=message):
            jacobi_generate(constant(), PROMPT, **bad)


def test_a_pass_feeds_the_guess_up_to_its_first_eos_and_a_rejected_eos_keeps_the_output_greedy():
    """A pass fed the whole block after a guessed EOS: on the demo's short answers a quarter of its tokens."""
    ends = by_position([0, 0, 0, 4, 5, 6, 9, 8, 8, 8, 8])  # after the prompt: 4 5 6 and EOS 9
    out = jacobi_generate(ends, PROMPT, n_tokens=8, max_new_tokens=8, eos_token_id=9)
    assert out.sequences.tolist() == [[1, 2, 3, 4, 5, 6, 9]]
    assert ends.calls == [(1, 11), (1, 4)]  # the prompt with the whole guess, then 4 5 6 9: not the 8s after

    # a context the script does not know gets 63: guessed EOS everywhere past the first wrong token, rejected
    # four times before the true one; each pass feeds one guessed token, and the output is the greedy one
    model = scripted([1, 2, 3], [4, 5, 6, 7, 8, 9])
    out = jacobi_generate(model, PROMPT, n_tokens=16, max_new_tokens=16, eos_token_id=63)
    assert out.sequences.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 63]]
    assert model.calls == [(1, 2 + 1 + 16)] + [(1, 2)] * 6


@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_generate_is_ar_through_the_loop_one_token_a_pass(batch):
    """The AR that Jacobi is timed against goes through the same forward: one fed token and one new token a pass."""
    from cllm_core import greedy_generate

    model = successor()
    prompts = torch.tensor([[1, 2, 3], [20, 21, 22], [40, 41, 42]])[:batch]
    out = greedy_generate(model, prompts, max_new_tokens=8, eos_token_id=6, pad_token_id=0)
    assert out.sequences[0].tolist()[:6] == [1, 2, 3, 4, 5, 6]
    assert model.calls[0] == (batch, 3) and all(q == 1 for _, q in model.calls[1:])  # the prompt, then one token
    assert out.stats.row_forwards[0] == 3 and out.stats.tokens_per_forward == 1.0
