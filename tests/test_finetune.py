"""Stage 3 in the library on a tiny Llama: training lowers the loss, the result is an HF directory the engine
decodes exactly, a killed run resumes at the same step with the same losses, and bad input stops before any
step with one clear line."""

import json
import math
import shutil
from functools import partial

import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM

from cllm_core import ModelConfig, ar_generate, jacobi_generate, load_tokenizer
from cllm_core.data.prompts import encode
from cllm_core.data.samples import load_trajectories
from cllm_core.runtime.config import FinetuneConfig
from cllm_core.runtime.models import load_model
from cllm_core.training.batches import Sampler, draw_items, make_batch
from cllm_core.training.finetune import finetune
from cllm_core.training.objectives import forcing_loss, step_loss
from cllm_core.training.setup import lr_factor
from cllm_core.training.shipping import bundle
from tests.test_forcing import numbers

FAST = FinetuneConfig(steps=12, batch_size=4, lr=3e-3, warmup_steps=2, log_every=2, checkpoint_every=4,
                      sample_every=6, sample_prompts=2, ar_weight=1.0)


def quiet(line):
    pass


@pytest.fixture
def teacher(tiny_model_dir):
    return ModelConfig(name_or_path=str(tiny_model_dir))


@pytest.fixture
def store(tmp_path, tiny_trajectories):
    """A private copy of the tiny collection (tests may damage it)."""
    shutil.copytree(tiny_trajectories / "store", tmp_path / "store")
    return str(tmp_path / "store")


def dies_at(last: int):
    """An `on_metrics` that kills the run (KeyboardInterrupt) when it reports step `last`."""
    def die(step, metrics):
        if step == last:
            raise KeyboardInterrupt
    return die


def history(record):
    return [(h["step"], h["loss"]) for h in record.history]


@pytest.mark.parametrize("objective", ["cllm", "jacobi_forcing"])
def test_training_lowers_the_loss_and_writes_a_model_the_engine_decodes_exactly(tmp_path, teacher, store,
                                                                               tiny_trajectories, objective):
    probe = pq.read_table(tiny_trajectories / "prompts/eval.parquet").column("prompt").to_pylist()
    samples = []
    config = FinetuneConfig(**FAST.model_dump() | {"steps": 30, "log_every": 5, "objective": objective})
    record = finetune(config, teacher, store, tmp_path / "cllm", probe=(probe, False), log=quiet,
                      on_samples=lambda step, s: samples.append((step, s)))
    assert record.config["objective"] == objective
    batch = Sampler(load_trajectories(store), config).batch(1)  # the same batch before and after: no draw's noise
    loss = forcing_loss if objective == "jacobi_forcing" else partial(step_loss, reuse_ar=True)
    with torch.no_grad():
        before, after = (loss(load_model(m).eval(), batch, config)[1]["loss"]
                         for m in (teacher, ModelConfig(name_or_path=str(tmp_path / "cllm"))))
    assert after < 0.8 * before
    assert [step for step, _ in samples] == [6, 12, 18, 24, 30] and all(len(s["texts"]) == 2 for _, s in samples)
    assert not (tmp_path / "cllm.checkpoints").exists()  # the finished model replaces its checkpoints
    assert (tmp_path / "cllm/custom_generate/generate.py").read_text() == bundle()  # generate(custom_generate=)

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "cllm").eval()
    assert model.config.cllm_n_tokens == 4 == record.n_tokens
    chosen = model.config.cllm_decoding  # the block size and precision measured fastest here after training
    assert chosen["n_tokens"] in config.decoding_sizes and chosen["precision"] in ("fp32", "bf16")
    assert record.metrics["decoding_n_tokens"] == chosen["n_tokens"] and len(chosen["candidates"]) >= 4
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(tmp_path / "cllm")))
    ids, mask = encode(tokenizer, probe, chat=False)
    greedy = ar_generate(model, ids, mask, max_new_tokens=12).sequences
    assert torch.equal(jacobi_generate(model, ids, mask, n_tokens=4, max_new_tokens=12).sequences, greedy)


def test_no_samples_asked_for_means_none_decoded_even_with_prompts_at_hand(tmp_path, teacher, store,
                                                                          tiny_trajectories):
    """Regression: `sample_prompts: 0` with eval prompts present (as `cllm train` always passes) encoded an empty
    batch and failed the run."""
    probe = pq.read_table(tiny_trajectories / "prompts/eval.parquet").column("prompt").to_pylist()
    samples = []
    record = finetune(FAST.model_copy(update={"steps": 6, "sample_prompts": 0}), teacher, store, tmp_path / "cllm",
                      probe=(probe, False), log=quiet, on_samples=lambda step, s: samples.append(step))
    assert record.metrics["train_steps"] == 6 and samples == [] and "sample_tokens_per_forward" not in record.metrics


def test_a_killed_run_resumes_at_its_last_checkpoint_with_the_uninterrupted_losses(tmp_path, teacher, store):
    whole = finetune(FAST, teacher, store, tmp_path / "whole", log=quiet)

    with pytest.raises(KeyboardInterrupt):
        finetune(FAST, teacher, store, tmp_path / "killed", log=quiet, on_metrics=dies_at(10))
    assert not (tmp_path / "killed").exists()  # no model directory until training finished
    assert sorted(p.name for p in (tmp_path / "killed.checkpoints").iterdir()) == ["step-000004", "step-000008"]
    said = []
    resumed = finetune(FAST, teacher, store, tmp_path / "killed", log=said.append)
    assert "resuming from" in said[0] and said[0].endswith("at step 8")
    assert [step for step, _ in history(resumed)] == [step for step, _ in history(whole)] == [2, 4, 6, 8, 10, 12]
    assert [loss for _, loss in history(resumed)] == pytest.approx([loss for _, loss in history(whole)], rel=1e-6)


def test_a_killed_fp16_run_resumes_with_its_grad_scaler(tmp_path, teacher, store, monkeypatch):
    """accelerate refuses fp16 on a CPU, so the accelerator here is given the grad scaler fp16 has on a GPU
    (doubling its scale every step); the resumed run must go on from the checkpoint's scale, not start over."""
    from accelerate import Accelerator

    import cllm_core.training.setup

    made = []

    class ScaledAccelerator(Accelerator):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1)
            made.append(self)

    monkeypatch.setattr(cllm_core.training.setup, "Accelerator", ScaledAccelerator)
    config = FAST.model_copy(update={"steps": 4, "checkpoint_every": 2})

    # the last step: the resume starts from step 2's checkpoint
    with pytest.raises(KeyboardInterrupt):
        finetune(config, teacher, store, tmp_path / "cllm", log=quiet, on_metrics=dies_at(4))
    state = torch.load(tmp_path / "cllm.checkpoints/step-000002/state.pt", weights_only=True)
    assert state["scaler"]["scale"] == 2.0 ** 12
    record = finetune(config, teacher, store, tmp_path / "cllm", log=quiet)
    assert made[-1].scaler.get_scale() == 2.0 ** 14  # as if never killed (2 ** 12 had it started over)
    assert record.metrics["skipped_steps"] == 0


def test_steps_the_fp16_grad_scaler_skips_leave_the_schedule_and_too_many_are_said_loudly(tmp_path, teacher, store,
                                                                                          monkeypatch):
    """A scale so large that every step's gradients overflow: no update is made, so the schedule must not move
    (it did: the warm-up and decay ran on without training) and the run must say so rather than publish the
    teacher as if trained."""
    from accelerate import Accelerator

    import cllm_core.training.setup

    class OverflowingAccelerator(Accelerator):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127, backoff_factor=0.99)  # never finite

    monkeypatch.setattr(cllm_core.training.setup, "Accelerator", OverflowingAccelerator)
    warnings = []
    config = FAST.model_copy(update={"steps": 4, "sample_prompts": 0})
    record = finetune(config, teacher, store, tmp_path / "cllm", log=quiet, warn=warnings.append)
    assert record.metrics["skipped_steps"] == 4 and record.metrics["train_steps"] == 4
    assert [h["lr"] for h in record.history] == [config.lr * lr_factor(config, 0)] * 2  # never stepped
    assert warnings == ["fine-tuning: the fp16 grad scaler skipped 4 of 4 steps (inf or NaN gradients), so the "
                        "model was updated 0 times; train in bf16 or fp32 where the device has it, or lower "
                        "finetune.lr"]


def test_the_same_config_teacher_and_data_reuse_the_model_and_another_config_retrains(tmp_path, teacher, store):
    first = finetune(FAST.model_copy(update={"steps": 4}), teacher, store, tmp_path / "cllm", log=quiet)
    (tmp_path / "cllm/custom_generate/generate.py").write_text("# from an older engine\n")
    again = finetune(FAST.model_copy(update={"steps": 4, "log_every": 1}), teacher, store, tmp_path / "cllm",
                     log=quiet)
    assert not first.reused and again.reused
    assert (tmp_path / "cllm/custom_generate/generate.py").read_text() == bundle()  # reshipped from this engine
    other = finetune(FAST.model_copy(update={"steps": 4, "ar_weight": 2.0}), teacher, store, tmp_path / "cllm",
                     log=quiet)
    assert not other.reused and json.loads((tmp_path / "cllm/cllm.json").read_text())["config"]["ar_weight"] == 2


def test_processes_started_by_hand_are_another_run_than_one_process(tmp_path, teacher, store, monkeypatch):
    """batch_size is per process: a CLLM (or checkpoint) of one process is not what torchrun's 4 would train."""
    from cllm_core.training.setup import finished_cllm

    config = FAST.model_copy(update={"steps": 2, "sample_prompts": 0})
    finetune(config, teacher, store, tmp_path / "cllm", log=quiet)
    assert finished_cllm(config, teacher, store, tmp_path / "cllm", "fp32", quiet) is not None
    monkeypatch.setenv("WORLD_SIZE", "4")  # as torchrun --nproc_per_node 4 sets it in each process
    assert finished_cllm(config, teacher, store, tmp_path / "cllm", "fp32", quiet) is None
    as_launched = FinetuneConfig(**config.model_dump() | {"launch": {"processes": 4}})
    assert finished_cllm(as_launched, teacher, store, tmp_path / "cllm", "fp32", quiet) is None


def test_one_process_trains_in_fp32_then_in_bf16(tmp_path, teacher, store):
    """accelerate caches one precision per process; a second run in another precision (a notebook, a test
    session) trains in its own precision instead of failing."""
    config = FAST.model_copy(update={"steps": 1, "batch_size": 2})
    fp32 = finetune(config, teacher, store, tmp_path / "fp32", precision="fp32", log=quiet)
    bf16 = finetune(config, teacher, store, tmp_path / "bf16", precision="bf16", log=quiet)
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")


def test_batches_depend_only_on_the_step_and_mask_from_lengths_when_pad_is_eos(store):
    data = load_trajectories(store)
    eos = 2  # SmolLM2's tokenizer pads with its EOS in some setups: masks must not look at token values
    draw = draw_items(4, 7, 0, len(data.items), seed=0)
    assert draw == draw_items(4, 7, 0, len(data.items), seed=0) != draw_items(4, 8, 0, len(data.items), seed=0)
    batch = make_batch(data, draw, 7, 0, seed=0, local=False, augment=0.5, labels=None, ar_on_prompt=False, pad=eos)
    again = make_batch(data, draw, 7, 0, seed=0, local=False, augment=0.5, labels=None, ar_on_prompt=False, pad=eos)
    assert all(torch.equal(getattr(batch, f), getattr(again, f)) for f in batch.__dataclass_fields__)
    for b, index in enumerate(draw):
        row, block = data.items[index]
        prompt, response = data.rows[row]["prompt_ids"], data.rows[row]["response_ids"]
        assert batch.ar_mask[b].sum() == len(response)  # every response token counts, an EOS among them too
        assert batch.ar_targets[b, len(prompt) - 1: len(prompt) - 1 + len(response)].tolist() == response
        assert batch.block_start[b] == len(prompt) + 4 * block
        assert batch.fixed_points[b, : batch.block_len[b]].tolist() == response[4 * block: 4 * block + 4]


def test_ground_truth_labels_replace_the_teachers_response_and_a_missing_answer_is_refused(tmp_path, teacher, store,
                                                                                          tiny_trajectories):
    table = pq.read_table(tiny_trajectories / "prompts/train.parquet")
    answers = dict(zip(table.column("prompt_id").to_pylist(), table.column("answer").to_pylist()))
    config = FAST.model_copy(update={"steps": 2, "ar_labels": "ground_truth"})
    record = finetune(config, teacher, store, tmp_path / "gt", answers=answers, log=quiet)
    assert record.config["ar_labels"] == "ground_truth"
    with pytest.raises(ValueError, match="have no ground-truth answer"):
        finetune(config, teacher, store, tmp_path / "none", answers={}, log=quiet)


def damage(case, tmp_path, store):
    from cllm_core.data.shards import ShardStore

    shards = ShardStore(store)
    if case == "schema-version":
        manifest = tmp_path / "store/shard-00000.json"
        manifest.write_text(manifest.read_text().replace('"schema_version": 1', '"schema_version": 2'))
    elif case == "other-tokenizer":
        record = shards.collection() | {"tokenizer": "0123456789abcdef"}
        (tmp_path / "store/collection.json").write_text(json.dumps(record))
    elif case == "empty":
        for path in (tmp_path / "store").glob("shard-*"):
            path.unlink()
    elif case == "no-store":
        shutil.rmtree(tmp_path / "store")
    elif case == "flipped":
        path = tmp_path / "store/shard-00001.parquet"
        data = bytearray(path.read_bytes())
        data[100] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.mark.parametrize(("case", "expected"), [
    ("schema-version", "has trajectory schema version 2, this code reads 1"),
    ("other-tokenizer", "were collected with another tokenizer"),
    ("empty", "holds no shards; run `cllm collect` first"),
    ("no-store", "no trajectories in"),
    ("flipped", "shards [1] in"),
    ("unwritable", "is not writable"),
])
def test_bad_input_is_one_clear_line_before_any_step(tmp_path, teacher, store, case, expected):
    damage(case, tmp_path, store)
    out = tmp_path / "cllm"
    if case == "unwritable":
        (tmp_path / "a-file").write_text("x")
        out = tmp_path / "a-file" / "cllm"
    steps = []
    with pytest.raises((OSError, ValueError)) as error:
        finetune(FAST, teacher, store, out, log=quiet, on_metrics=lambda step, m: steps.append(step))
    assert expected in str(error.value) and "\n" not in str(error.value)
    assert steps == [] and not out.exists()


def test_vocabulary_beyond_the_model_is_refused(store):
    with pytest.raises(ValueError, match="beyond this model's vocabulary of 50: they come from another tokenizer"):
        load_trajectories(store, vocab_size=50)


def test_a_checkpoint_from_another_config_is_refused_before_any_step(tmp_path, teacher, store):
    def stop(step, metrics):
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(FAST, teacher, store, tmp_path / "cllm", log=quiet, on_metrics=stop)
    steps = []
    with pytest.raises(ValueError, match="was made with another config, teacher or data") as error:
        finetune(FAST.model_copy(update={"lr": 1e-3}), teacher, store, tmp_path / "cllm", log=quiet,
                 on_metrics=lambda step, m: steps.append(step))
    assert "delete" in str(error.value) and steps == []



def test_a_stop_request_ends_training_before_the_next_step_publishes_nothing_and_a_rerun_resumes(
        tmp_path, teacher, store):
    """SIGTERM or Ctrl-C of `cllm train` (#14): the loop checks cllm_core.engine.stopping before each step."""
    from cllm_core.engine.stopping import Stopped, clear_stop, request_stop

    steps, lines = [], []
    try:
        with pytest.raises(Stopped):
            finetune(FAST, teacher, store, tmp_path / "cllm", log=quiet,
                     on_metrics=lambda step, m: steps.append(step) or (step == 4 and request_stop()))
    finally:
        clear_stop()
    assert steps == [2, 4] and not (tmp_path / "cllm").exists()
    record = finetune(FAST, teacher, store, tmp_path / "cllm", log=lines.append)
    assert any(line.endswith("at step 4") and line.startswith("resuming from") for line in lines)
    assert record.metrics["train_steps"] == FAST.steps

def test_several_states_per_block_share_its_ar_row_and_reading_targets_off_it_equals_a_target_forward(
        store, tiny_model_dir):
    from cllm_core import load_model
    from cllm_core.training.objectives import step_loss

    data = load_trajectories(store)
    draw = draw_items(3, 1, 0, len(data.items), seed=0)
    batch = make_batch(data, draw, 1, 0, seed=0, local=False, augment=0.0, labels=None, ar_on_prompt=False, pad=0,
                       states_per_block=2)
    assert len(batch.ar_ids) == 3 and len(batch.state_ids) == 6 and batch.states_per_block == 2
    assert torch.equal(batch.block_start[0::2], batch.block_start[1::2])
    assert torch.equal(batch.fixed_points[0::2], batch.fixed_points[1::2])
    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir)))
    config = FAST.model_copy(update={"states_per_block": 2})
    read_off, _ = step_loss(model, batch, config, reuse_ar=True)
    forwarded, _ = step_loss(model, batch, config, reuse_ar=False)  # a separate forward on context + fixed point
    assert read_off.item() == pytest.approx(forwarded.item(), rel=1e-4)


def test_logits_only_where_the_losses_read_them_give_the_same_loss_and_gradient(store, tiny_model_dir):
    from cllm_core import load_model
    from cllm_core.training.objectives import logits_head, step_loss

    data = load_trajectories(store)
    batch = make_batch(data, draw_items(4, 1, 0, len(data.items), seed=0), 1, 0, seed=0, local=False, augment=0.5,
                       labels=None, ar_on_prompt=False, pad=0, states_per_block=2)
    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir)))
    config = FAST.model_copy(update={"states_per_block": 2})
    head = logits_head(model)
    assert head is model.get_output_embeddings()
    results = []
    for used in (None, head):
        model.zero_grad()
        loss, terms = step_loss(model, batch, config, reuse_ar=True, head=used)
        loss.backward()
        results.append((terms, [p.grad.clone() for p in model.parameters()]))
    (full, full_grads), (sparse, sparse_grads) = results
    assert numbers(sparse) == pytest.approx(numbers(full), rel=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(full_grads, sparse_grads))
    model.register_forward_hook(lambda module, args, out: out.__setitem__("logits", out.logits * 2))
    assert logits_head(model) is None  # logits transformed after the head (soft-capping, scaling): full logits


@pytest.mark.parametrize("objective", ["cllm", "jacobi_forcing"])
def test_the_anchor_term_is_the_kl_from_the_frozen_starting_model_at_the_ar_labels(teacher, store, objective):
    from cllm_core import load_model
    from cllm_core.training import forcing
    from cllm_core.training.batches import Sampler
    from cllm_core.training.objectives import forcing_loss, frozen_anchor, step_loss

    config = FAST.model_copy(update={"objective": objective, "anchor_weight": 3.0, "label_smoothing": 0.0})
    batch = Sampler(load_trajectories(store), config).batch(1)
    start, model = frozen_anchor(teacher, torch.device("cpu")), load_model(teacher).train()

    def loss_of(anchor):
        if objective == "cllm":
            return step_loss(model, batch, config, reuse_ar=True, anchor=anchor)
        return forcing_loss(model, batch, config, anchor=anchor)

    def logits_at_labels(lm):
        if objective == "cllm":
            return lm(input_ids=batch.ar_ids).logits[batch.ar_mask]
        return lm(input_ids=batch.ids, attention_mask=forcing.attention_bias(batch.kind, segment=batch.segment),
                  position_ids=batch.positions).logits[batch.ar_mask]

    assert loss_of(start)[1]["anchor"] == pytest.approx(0.0, abs=1e-6)  # the student still is the start
    with torch.no_grad():
        expected_start = logits_at_labels(model)
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
        student = logits_at_labels(model)
    plain, plain_terms = loss_of(None)
    anchored, terms = loss_of(start)
    kl = torch.nn.functional.kl_div(student.log_softmax(-1), expected_start.log_softmax(-1), log_target=True,
                                    reduction="batchmean")
    assert "anchor" not in plain_terms and kl > 1e-3
    assert float(terms["anchor"]) == pytest.approx(kl.item(), rel=1e-4)
    assert anchored.item() == pytest.approx(plain.item() + 3.0 * kl.item(), rel=1e-5)
    anchored.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_an_anchored_run_records_its_term_and_is_not_an_unanchored_run(tmp_path, teacher, store):
    config = FAST.model_copy(update={"steps": 4, "anchor_weight": 1.0})
    assert config.fingerprint() != FAST.model_copy(update={"steps": 4}).fingerprint()
    record = finetune(config, teacher, store, tmp_path / "cllm", log=quiet)
    assert record.config["anchor_weight"] == 1.0
    assert all(h["anchor"] > 0 for h in record.history)


def test_lora_trains_the_adapters_alone_resumes_and_saves_an_ordinary_merged_model(tmp_path, teacher, store):
    from cllm_core import load_model

    lora = {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    config = FinetuneConfig(**FAST.model_dump() | {"steps": 8, "lr": 1e-2, "lora": lora})
    assert config.fingerprint() != FinetuneConfig(**FAST.model_dump() | {"steps": 8, "lr": 1e-2}).fingerprint()
    whole = finetune(config, teacher, store, tmp_path / "whole", log=quiet)

    with pytest.raises(KeyboardInterrupt):
        finetune(config, teacher, store, tmp_path / "killed", log=quiet, on_metrics=dies_at(6))
    resumed = finetune(config, teacher, store, tmp_path / "killed", log=quiet)  # from step 4's checkpoint
    assert [loss for _, loss in history(resumed)] == pytest.approx([loss for _, loss in history(whole)], rel=1e-6)

    assert not (tmp_path / "whole/adapter_config.json").exists()  # merged: no adapter files, no peft to load it
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "whole").state_dict()
    start = load_model(teacher).state_dict()
    moved = {name for name in start if not torch.equal(saved[name], start[name])}
    assert moved and all(name.endswith(("q_proj.weight", "v_proj.weight")) for name in moved)
    assert set(saved) == set(start)  # the teacher's parameter names: every later stage loads it as before
    recomputed = finetune(config.model_copy(update={"gradient_checkpointing": True}), teacher, store,
                          tmp_path / "recomputed", log=quiet)  # frozen embeddings still feed recomputed blocks
    assert [loss for _, loss in history(recomputed)] == pytest.approx([loss for _, loss in history(whole)], rel=1e-5)


def test_gradient_checkpointing_trades_memory_for_time_without_changing_the_losses(tmp_path, teacher, store):
    config = FAST.model_copy(update={"steps": 4, "checkpoint_every": 100})
    plain = finetune(config, teacher, store, tmp_path / "plain", log=quiet)
    recomputed = finetune(config.model_copy(update={"gradient_checkpointing": True}), teacher, store,
                          tmp_path / "recomputed", log=quiet)
    assert [loss for _, loss in history(recomputed)] == pytest.approx([loss for _, loss in history(plain)], rel=1e-5)


@pytest.mark.slow
def test_two_processes_under_ddp_train_one_model_keep_one_history_and_stop_together_when_their_clocks_differ(
        tmp_path, tiny_model_dir, store):
    """The loop is plain `accelerate`: torchrun with 2 CPU processes (gloo) is DDP from the same code. Regression:
    each process judged `max_minutes` by its own clock, so one could stop alone and hang the other."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).with_name("ddp_worker.py")  # rank 1's clock runs out at step 3, rank 0's never
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    with subprocess.Popen([*launch, str(worker), str(tiny_model_dir), store, str(tmp_path / "cllm")],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=os.environ | {"OMP_NUM_THREADS": "1"}, cwd=Path(__file__).parents[1]) as run:
        try:
            _, stderr = run.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            run.terminate()  # torchrun ends its workers (they run in sessions of their own)
            run.communicate(timeout=60)
            pytest.fail("the DDP run hung: its processes stopped at different steps")
    assert run.returncode == 0, stderr[-2000:]
    records = [json.loads((tmp_path / f"cllm.record-{rank}.json").read_text()) for rank in (0, 1)]
    assert len(records) == 2 and records[0] == records[1]
    assert records[0]["steps"] == 3 and records[0]["stopped_early"] is True
    assert [h["step"] for h in records[0]["history"]] == [2, 3]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "cllm").config.cllm_n_tokens == 4


def test_epochs_set_the_steps_from_the_data_and_each_epoch_draws_every_item_once(tmp_path, teacher, store):
    data = load_trajectories(store)
    for total in (len(data.items), len(data.trained_rows)):
        epoch = [i for step in range(1, total + 1) for i in draw_items(1, step, 0, total, seed=0)]
        assert sorted(epoch) == list(range(total)) and epoch != list(range(total))  # every item once, shuffled
        assert draw_items(2, 5, 0, total, 0, per_step=4) + draw_items(2, 5, 2, total, 0, per_step=4) == \
            draw_items(4, 5, 0, total, 0)  # two processes' slots of a step: one process's draws of that step
    config = FinetuneConfig(**FAST.model_dump(exclude={"steps"}) | {"epochs": 1.5, "objective": "jacobi_forcing"})
    record = finetune(config, teacher, store, tmp_path / "cllm", log=quiet)
    steps = math.ceil(1.5 * len(data.trained_rows) / config.batch_size)
    assert record.config["steps"] == steps == record.metrics["train_steps"]
    assert record.history[-1]["epoch"] == pytest.approx(steps * config.batch_size / len(data.trained_rows))
    with pytest.raises(ValueError, match="sets both steps \\(10\\) and epochs \\(2.0\\); set one"):
        FinetuneConfig(steps=10, epochs=2)


def test_a_single_process_trains_on_the_cuda_device_the_model_names(monkeypatch):
    """accelerate trains a single process on its *current* CUDA device: `model.device: cuda:1` trained on cuda:0
    until that device is made current (#32.2). No GPU here: the CUDA calls are recorded, not made."""
    import types

    import cllm_core.training.setup

    made_current = []
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    monkeypatch.setattr(cllm_core.training.setup, "Accelerator",
                        lambda **kwargs: types.SimpleNamespace(num_processes=1, device=torch.device("cuda"),
                                                               kwargs=kwargs))
    accelerator = cllm_core.training.setup.make_accelerator("no", torch.device("cuda", 1))
    assert made_current == [1] and accelerator.kwargs["cpu"] is False
    on_cpu = cllm_core.training.setup.make_accelerator("no", torch.device("cpu"))
    assert on_cpu.kwargs["cpu"] is True and made_current == [1]


def test_a_run_its_guard_stops_is_published_loudly_and_the_next_run_resumes_at_that_step(tmp_path, teacher, store):
    """A max_minutes stop was retrained from scratch by the rerun, so a budget shorter than the run never ended."""
    warned, said = [], []
    stopped = finetune(FAST.model_copy(update={"max_minutes": 1e-9}), teacher, store, tmp_path / "cllm", log=quiet,
                       warn=warned.append)
    assert stopped.metrics["stopped_early"] and stopped.metrics["train_steps"] == 1
    assert "STOPPED EARLY" in warned[0] and warned[0].endswith("the next run resumes at step 1")
    assert [p.name for p in (tmp_path / "cllm.checkpoints").iterdir()] == ["step-000001"]
    resumed = finetune(FAST, teacher, store, tmp_path / "cllm", log=said.append)
    assert "stopped by its guard at step 1" in said[0] and "resuming from" in said[1] and said[1].endswith("at step 1")
    assert not resumed.metrics["stopped_early"] and resumed.metrics["train_steps"] == 12
    assert not (tmp_path / "cllm.checkpoints").exists()


def test_trajectories_another_model_made_are_refused_as_the_teacher_retrained_in_place(tmp_path, tiny_model_dir,
                                                                                      store):
    """`cllm train` alone after the teacher was retrained in place trained on the old teacher's fixed points and
    exited 0: a silent stale result."""
    from cllm_core.engine.errors import UserError

    retrained = tmp_path / "teacher"
    shutil.copytree(tiny_model_dir, retrained)
    model = AutoModelForCausalLM.from_pretrained(retrained)
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    model.save_pretrained(retrained)  # the same path and tokenizer, other weights
    with pytest.raises(UserError, match="were collected from another model .* retrained in place; collect them"):
        finetune(FAST, ModelConfig(name_or_path=str(retrained)), store, tmp_path / "cllm", log=quiet)


def test_a_rate_that_makes_the_cllm_forget_the_teacher_stops_in_one_line_before_anything_is_published(
        tmp_path, teacher, store):
    """LoRA's learning rate had no guard: at r32 and lr 1e-2 the demo's CLLM collapsed to repetition (2% against
    99%) and training went on to the end and published it."""
    from cllm_core.runtime.guards import Diverged

    lora = {"rank": 8, "alpha": 256, "target_modules": ["all-linear"]}
    wild = FinetuneConfig(**FAST.model_dump() | {"lr": 1.0, "warmup_steps": 0, "lora": lora})
    with pytest.raises(Diverged, match=r"^fine-tuning diverged at step \d+: AR loss .* lower finetune.lr, or the "
                                       r"adapters' rank or alpha \(finetune.lora\) \(nothing was published\)$"):
        finetune(wild, teacher, store, tmp_path / "cllm", log=quiet)
    assert not (tmp_path / "cllm").exists()
    unguarded = finetune(wild.model_copy(update={"max_ar_rise": None}), teacher, store, tmp_path / "free", log=quiet)
    assert unguarded.metrics["final_ar"] - unguarded.history[0]["ar"] > wild.max_ar_rise  # what the guard stops


def test_the_divergence_guard_reads_the_first_interval_and_stops_on_a_loss_that_is_not_finite():
    from cllm_core.runtime.guards import Diverged, check_divergence

    healthy = [{"step": 10, "ar": 0.31, "loss": 9.4}, {"step": 20, "ar": 1.3, "loss": 8.0}]
    check_divergence(healthy, 1.0, lora=False)
    check_divergence(healthy + [{"step": 30, "ar": 9.0, "loss": 20.0}], None, lora=False)
    with pytest.raises(Diverged, match="step 30: AR loss 1.320 against 0.310 .* lower finetune.lr \\(nothing"):
        check_divergence(healthy + [{"step": 30, "ar": 1.32, "loss": 8.0}], 1.0, lora=False)
    with pytest.raises(Diverged, match="step 30: AR loss nan"):
        check_divergence(healthy + [{"step": 30, "ar": float("nan"), "loss": float("nan")}], 1.0, lora=False)
