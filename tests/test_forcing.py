"""Jacobi Forcing's packed sequence: the mask against a hand-written case, positions, labels and counted pairs,
the noise schedule, one packed forward against the separate forwards it stands for, and the loss's terms."""

import random

import pytest
import torch

from cllm_core.runtime.config import FinetuneConfig
from cllm_core.training import forcing
from cllm_core.training.forcing import CLEAN, NOISY, PADDING, PROMPT
from cllm_core.training.objectives import forcing_loss
from tests.tiny import tiny_model


def test_the_mask_matches_a_hand_written_case():
    """prompt p0 p1, then k0 (2 tokens), f0 (2), k1 (2), f1 (2), one padding slot. Rows: queries; 1: may see."""
    kind = torch.tensor([[PROMPT, PROMPT, NOISY, NOISY, CLEAN, CLEAN, NOISY, NOISY, CLEAN, CLEAN, PADDING]])
    expected = torch.tensor([
        # p0 p1 k0 k0 f0 f0 k1 k1 f1 f1 pad
        [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # p0
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # p1
        [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],  # k0[0]: the prompt and itself
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0],  # k0[1]
        [1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0],  # f0[0]: the prompt, not k0
        [1, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0],  # f0[1]
        [1, 1, 1, 1, 0, 0, 1, 0, 0, 0, 0],  # k1[0]: the prompt, the earlier noisy block, not f0
        [1, 1, 1, 1, 0, 0, 1, 1, 0, 0, 0],  # k1[1]
        [1, 1, 0, 0, 1, 1, 0, 0, 1, 0, 0],  # f1[0]: the prompt, the earlier clean block, not k0 or k1
        [1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0],  # f1[1]
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1],  # padding: the prompt and itself (no row without a key)
    ], dtype=torch.bool)
    bias = forcing.attention_bias(kind)
    assert bias.shape == (1, 1, 11, 11) and bias.dtype == torch.float32
    assert torch.equal(bias[0, 0] == 0, expected)
    assert (bias[0, 0][~expected] == torch.finfo(torch.float32).min).all()  # additive: eager adds it to scores
    assert forcing.attention_bias(kind, torch.bfloat16).dtype == torch.bfloat16


def test_packing_shares_positions_labels_the_clean_stream_and_counts_from_the_first_wrong_token():
    packed = forcing.pack([10, 11], noisy=[[20, 99], [98, 97]], clean=[[20, 21], [22, 23]])
    assert packed.ids == [10, 11, 20, 99, 20, 21, 98, 97, 22, 23]
    assert packed.positions == [0, 1, 2, 3, 2, 3, 4, 5, 4, 5]
    assert packed.kind == [PROMPT] * 2 + [NOISY] * 2 + [CLEAN] * 2 + [NOISY] * 2 + [CLEAN] * 2
    # the clean stream is prompt + response: each prompt/clean position predicts the next token of it, bridges too
    assert packed.labels == [11, 20, -1, -1, 21, 22, -1, -1, 23, -1]
    # block 0 is wrong from offset 1, block 1 from offset 0; pairs are (noisy, clean) packed indices, but the
    # response's last token (9) predicts nothing
    assert packed.pairs == [(3, 5), (6, 8)]
    short = forcing.pack([10], noisy=[[5, 7], [7]], clean=[[5, 6], [8]])  # a last block cut short (EOS)
    assert short.positions == [0, 1, 2, 1, 2, 3, 3] and short.pairs == [(2, 4)]
    with pytest.raises(ValueError, match="a noisy state of 1 tokens for a block of 2"):
        forcing.pack([10], noisy=[[5]], clean=[[5, 6]])


def test_the_noisy_state_follows_the_progressive_schedule():
    fixed = [1, 2, 3, 4]
    trajectory = [[9, 9, 9, 9], [1, 9, 9, 9], [1, 2, 3, 9], [1, 2, 3, 4]]  # noise 1, 0.75, 0.25, 0
    assert [forcing.noise(state, fixed) for state in trajectory] == [1.0, 0.75, 0.25, 0.0]
    assert forcing.schedule(5, window=4, phase=0) == [0.0, 1 / 3, 2 / 3, 1.0, 0.0]
    assert forcing.schedule(3, window=4, phase=3) == [1.0, 0.0, 1 / 3]
    assert [forcing.noisy_state(trajectory, fixed, t) for t in (0.0, 1 / 3, 2 / 3, 1.0)] == \
        [[1, 2, 3, 4], [1, 2, 3, 9], [1, 9, 9, 9], [9, 9, 9, 9]]
    rng = random.Random(0)
    packed = forcing.packed_row([7], [1, 2, 3, 4, 5, 6], [trajectory, [[9, 9], [5, 6]]], 4, window=2, rng=rng)
    assert packed.ids[5:9] == [1, 2, 3, 4]  # the clean blocks are the response, whatever the noise


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_one_packed_forward_equals_the_separate_forwards_it_stands_for(attention):
    """The clean stream's logits are the AR forward of prompt + response; noisy block j's are the causal forward
    of prompt + k_0 ... k_j (what Jacobi decoding meets after noisy blocks), at the same positions."""
    model = tiny_model("llama").float()
    model.config._attn_implementation = attention
    prompt, clean, noisy = [5, 6, 7], [[10, 11, 12], [13, 14, 15], [16, 17]], [[10, 40, 41], [42, 43, 44], [16, 45]]
    packed = forcing.pack(prompt, noisy, clean)
    ids, kind = torch.tensor([packed.ids]), torch.tensor([packed.kind])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=forcing.attention_bias(kind),
                       position_ids=torch.tensor([packed.positions])).logits[0]
        ar = model(input_ids=torch.tensor([prompt + sum(clean, [])])).logits[0]
        noisy_context = model(input_ids=torch.tensor([prompt + sum(noisy, [])])).logits[0]
    stream = [i for i, k in enumerate(packed.kind) if k != NOISY]
    noisy_at = [i for i, k in enumerate(packed.kind) if k == NOISY]
    torch.testing.assert_close(logits[stream], ar, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[noisy_at], noisy_context[len(prompt):], rtol=1e-5, atol=1e-5)


def test_a_training_step_reads_nothing_back_from_the_device(monkeypatch):
    """Each `.item()` on a loss term stalled a GPU's queue every step (#32.6): the terms stay device tensors, read
    once a log interval. Here any read of a tensor's value as a Python number fails."""
    from cllm_core.training.loop import window_means

    model = tiny_model("llama").float()
    batch = _batch([forcing.pack([5, 6], noisy=[[10, 40], [42, 43]], clean=[[10, 11], [12, 2]])], ar_from=1)
    config = FinetuneConfig(objective="jacobi_forcing", label_smoothing=0.0, ar_weight=10.0)
    reads = ("item", "tolist", "__float__", "__int__", "__bool__")
    originals = {name: getattr(torch.Tensor, name) for name in reads}
    for name in reads:
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _name=name: pytest.fail(f"Tensor.{_name}"))
    loss, terms = forcing_loss(model, batch, config)
    loss.backward()
    for name, original in originals.items():
        monkeypatch.setattr(torch.Tensor, name, original)
    assert window_means([terms, terms]) == pytest.approx(numbers(terms))


def test_the_loss_reads_the_counted_pairs_and_the_clean_stream():
    model = tiny_model("llama").float()
    packed = forcing.pack([5, 6], noisy=[[10, 40], [42, 43]], clean=[[10, 11], [12, 2]])
    batch = _batch([packed], ar_from=1)
    config = FinetuneConfig(objective="jacobi_forcing", label_smoothing=0.0, ar_weight=10.0)
    loss, terms = forcing_loss(model, batch, config)
    loss.backward()
    with torch.no_grad():
        logits = model(input_ids=batch.ids, attention_mask=forcing.attention_bias(batch.kind),
                       position_ids=batch.positions).logits[0]
    student, target = logits[[3, 6]], logits[[5, 8]]
    kl = torch.nn.functional.kl_div(student.log_softmax(-1), target.log_softmax(-1), log_target=True,
                                    reduction="batchmean")
    labelled = [1, 4, 5, 8]  # the last prompt token (the bridge into f0) and f0, f1 except the final token
    ar = torch.nn.functional.cross_entropy(logits[labelled], torch.tensor([10, 11, 12, 2]))
    assert float(terms["consistency"]) == pytest.approx(kl.item(), rel=1e-5)
    assert float(terms["ar"]) == pytest.approx(ar.item(), rel=1e-5)
    assert float(terms["loss"]) == pytest.approx(kl.item() + 10 * ar.item(), rel=1e-5)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_jacobi_forcing_refuses_what_it_cannot_mean():
    for bad in ({"consistency": "local"}, {"ar_labels": "ground_truth"}):
        with pytest.raises(ValueError, match="set consistency: global and ar_labels: teacher"):
            FinetuneConfig(objective="jacobi_forcing", **bad)
    # the objective's fields leave the paper's fingerprint as it was: CLLMs trained before them stay valid
    assert FinetuneConfig(noise_window=8).fingerprint() == FinetuneConfig().fingerprint()
    assert FinetuneConfig(objective="jacobi_forcing").fingerprint() != FinetuneConfig().fingerprint()


def _batch(packed, ar_from):
    from cllm_core.training.batches import PackedBatch

    (one,) = packed
    mask = [label >= 0 and i >= ar_from for i, label in enumerate(one.labels)]
    return PackedBatch(ids=torch.tensor([one.ids]), positions=torch.tensor([one.positions]),
                       kind=torch.tensor([one.kind]), segment=torch.zeros(1, len(one.ids), dtype=torch.long),
                       labels=torch.tensor([[max(x, 0) for x in one.labels]]),
                       ar_mask=torch.tensor([mask]), pairs=torch.tensor([(0, k, f) for k, f in one.pairs]))


def test_the_loss_under_bf16_autocast_is_the_fp32_loss_to_rounding():
    """The additive mask is made in the autocast dtype (fp32's minimum would be -inf in fp16)."""
    model = tiny_model("llama").float()
    batch = _batch([forcing.pack([5, 6], noisy=[[10, 40], [42, 43]], clean=[[10, 11], [12, 2]])], ar_from=1)
    config = FinetuneConfig(objective="jacobi_forcing")
    _, exact = forcing_loss(model, batch, config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, rounded = forcing_loss(model, batch, config)
    assert torch.isfinite(loss) and float(rounded["loss"]) == pytest.approx(float(exact["loss"]), rel=0.05)


def test_a_packed_batch_pads_rows_and_counts_the_ar_labels_of_each_response():
    import datasets

    from cllm_core.data.samples import TrajectoryData
    from cllm_core.training.batches import make_packed_batch

    rows = datasets.Dataset.from_list([
        {"prompt_ids": [5, 6, 7], "response_ids": [10, 11, 12, 2],
         "block_states": [[[40, 41], [10, 41], [10, 11]], [[43, 44], [12, 2]]]},
        {"prompt_ids": [8], "response_ids": [20, 2], "block_states": [[[30, 31], [20, 2]]]},
    ])
    data = TrajectoryData(rows, [(0, 0), (0, 1), (1, 0)], 2, "f", 0, {})
    batch = make_packed_batch(data, [0, 1], step=1, slot_offset=0, seed=0, window=2, ar_on_prompt=False, pad=0)
    assert batch.ids.shape == (2, 3 + 2 * 4) and batch.tokens == 22
    assert batch.kind[1].tolist() == [PROMPT, NOISY, NOISY, CLEAN, CLEAN] + [PADDING] * 6
    # the AR loss reads each response: the bridge from the prompt's last token, then every token but the last
    assert batch.ar_mask.sum(1).tolist() == [4, 2]
    assert batch.labels[0][batch.ar_mask[0]].tolist() == [10, 11, 12, 2]
    assert batch.labels[1][batch.ar_mask[1]].tolist() == [20, 2]
    row, noisy, clean = batch.pairs.unbind(1)
    assert (batch.kind[row, noisy] == NOISY).all() and (batch.kind[row, clean] == CLEAN).all()
    assert (batch.positions[row, noisy] == batch.positions[row, clean]).all()  # twins share their position
    again = make_packed_batch(data, [0, 1], step=1, slot_offset=0, seed=0, window=2, ar_on_prompt=False, pad=0)
    assert torch.equal(again.ids, batch.ids)  # a step's batch depends only on the step: resumable
    with_prompt = make_packed_batch(data, [0], step=1, slot_offset=0, seed=0, window=2, ar_on_prompt=True, pad=0)
    assert with_prompt.ar_mask.sum().item() == 4 + 2  # and the prompt's own next tokens


def test_responses_packed_beside_each_other_see_only_themselves_and_give_the_one_per_row_loss(monkeypatch):
    """Several responses share a batch row (each a segment with its own positions): each one's logits are those of
    its own packed sequence, and the step's loss and gradient are those of one response per row."""
    import datasets

    from cllm_core.data.samples import TrajectoryData
    from cllm_core.training.batches import make_packed_batch

    rows = datasets.Dataset.from_list([
        {"prompt_ids": [5, 6, 7, 8], "response_ids": [10, 11, 12, 13, 14, 2],
         "block_states": [[[40, 41], [10, 41], [10, 11]], [[43, 44], [12, 44], [12, 13]], [[45, 46], [14, 2]]]},
        {"prompt_ids": [8], "response_ids": [20, 21, 22, 2],
         "block_states": [[[30, 31], [20, 21]], [[32, 33], [22, 33], [22, 2]]]},
        {"prompt_ids": [9, 5], "response_ids": [23, 2], "block_states": [[[34, 35], [23, 2]]]},
    ])
    data = TrajectoryData(rows, [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0)], 2, "f", 0, {})
    batch = make_packed_batch(data, [0, 1, 2], step=1, slot_offset=0, seed=0, window=3, ar_on_prompt=False, pad=0)
    assert batch.ids.shape == (2, 4 + 2 * 6)  # the longest alone; the two others beside each other
    assert batch.segment[1].tolist() == [0] * 9 + [1] * 6 + [-1]
    model = tiny_model("llama").float()
    with torch.no_grad():
        logits = model(input_ids=batch.ids, attention_mask=forcing.attention_bias(batch.kind, segment=batch.segment),
                       position_ids=batch.positions).logits
        for segment in (0, 1):
            where = batch.segment[1] == segment
            alone = model(input_ids=batch.ids[1, where][None], position_ids=batch.positions[1, where][None],
                          attention_mask=forcing.attention_bias(batch.kind[1, where][None])).logits[0]
            torch.testing.assert_close(logits[1, where], alone, rtol=1e-5, atol=1e-5)
    config = FinetuneConfig(objective="jacobi_forcing")
    loss, terms = forcing_loss(model, batch, config)
    loss.backward()
    packed_grad = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    monkeypatch.setattr(forcing, "fit_rows", lambda lengths: [[i] for i in range(len(lengths))])
    alone = make_packed_batch(data, [0, 1, 2], step=1, slot_offset=0, seed=0, window=3, ar_on_prompt=False, pad=0)
    assert alone.ids.shape[0] == 3
    loss_alone, terms_alone = forcing_loss(model, alone, config)
    loss_alone.backward()
    assert numbers(terms) == pytest.approx(numbers(terms_alone), rel=1e-5)
    for grad, parameter in zip(packed_grad, model.parameters()):
        torch.testing.assert_close(grad, parameter.grad, rtol=1e-4, atol=1e-6)


def test_rows_are_filled_first_fit_longest_first_no_longer_than_the_longest():
    assert forcing.fit_rows([5, 9, 4, 3, 2]) == [[1], [0, 2], [3, 4]]
    assert forcing.fit_rows([3]) == [[0]]


def numbers(terms: dict) -> dict[str, float]:
    """A loss's terms (device tensors, read once a log interval in training) as numbers."""
    return {key: float(value) for key, value in terms.items()}
