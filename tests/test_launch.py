"""One call trains over N processes: `finetune` runs `accelerate launch` (gloo on the CPU here), relays the main
process's events, names a failed process in one line, and resumes from the checkpoints under the same launch."""

import json
import sys
import time
from pathlib import Path

import pytest

from cllm_core.engine.stopping import Stopped, clear_stop, request_stop
from cllm_core.runtime.config import FinetuneConfig, LaunchSection, ModelConfig
from cllm_core.training.finetune import finetune
from cllm_core.training.launch import STALL_S, EventRelay, accelerate_command, failure, launch_finetune, launched

INJECT = Path(__file__).with_name("inject")
ROOT_CAUSE = """[rank0]: RuntimeError: [gloo] Connection closed by peer
E1204 03:06:59.912000 15441 torch/distributed/elastic/multiprocessing/api.py:882] failed (exitcode: -9)
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
cllm_core.training.worker FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-12-04_03:06:59
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : 1 (pid: 15461)
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-04_03:06:59
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 15462)  (SIGKILL)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 15462
============================================================
"""  # the launcher's report of a process killed from outside (tests/inject, CLLM_TEST_FAIL=kill)


def test_one_ddp_process_trains_in_place_more_or_fsdp_are_launched():
    assert not launched(LaunchSection())
    assert launched(LaunchSection(processes=2)) and launched(LaunchSection(strategy="fsdp"))


def test_the_launch_command_asks_accelerate_for_what_the_config_says(tmp_path):
    ddp = accelerate_command(LaunchSection(processes=2), "fp32", False, cuda=False, port=29500, work=tmp_path)
    assert ddp[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert ddp[-3:] == ["--module", "cllm_core.training.worker", str(tmp_path / "spec.json")]
    assert _option(ddp, "--config_file") == str(tmp_path / "accelerate.yaml")  # not the user's default config
    assert "--multi_gpu" in ddp and "--cpu" not in ddp  # `--cpu` with 2 processes starts one, silently
    assert int(_option(ddp, "--num_cpu_threads_per_process")) >= 1  # accelerate's default: 1
    assert _option(ddp, "--num_processes") == "2" and _option(ddp, "--mixed_precision") == "no"
    fsdp = accelerate_command(LaunchSection(processes=8, strategy="fsdp", fsdp_sharding="shard_grad_op",
                                            cpu_offload=True), "bf16", True, cuda=True, port=29500, work=tmp_path)
    assert "--use_fsdp" in fsdp and "--multi_gpu" not in fsdp and _option(fsdp, "--fsdp_version") == "2"
    assert "--num_cpu_threads_per_process" not in fsdp
    assert _option(fsdp, "--fsdp_reshard_after_forward") == "false"  # shard_grad_op: FSDP2 keeps them gathered
    assert _option(fsdp, "--fsdp_offload_params") == "true"
    assert _option(fsdp, "--fsdp_activation_checkpointing") == "true"  # finetune.gradient_checkpointing
    assert _option(fsdp, "--fsdp_state_dict_type") == "FULL_STATE_DICT"
    assert _option(fsdp, "--mixed_precision") == "bf16"


def test_fsdp_without_a_gpu_and_fsdp_with_lora_are_one_line_each(tmp_path, tiny_model_dir, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = FinetuneConfig(launch=LaunchSection(strategy="fsdp"))
    with pytest.raises(ValueError, match="shards the model over GPUs and this machine has none"):
        launch_finetune(config, ModelConfig(name_or_path=str(tiny_model_dir)), str(tmp_path), tmp_path / "cllm",
                        answers=None, probe=([], False), precision="fp32", log=print, warn=print, on_metrics=None,
                        on_samples=None, progress=None)
    assert not (tmp_path / "cllm.launch").exists()
    with pytest.raises(ValueError, match="lora under finetune.launch.strategy fsdp"):
        FinetuneConfig(launch={"strategy": "fsdp"}, lora={})


def test_the_process_count_is_in_the_fingerprint_how_they_share_the_model_is_not():
    alone = FinetuneConfig()
    assert FinetuneConfig(launch={"strategy": "fsdp", "cpu_offload": True}).fingerprint() == alone.fingerprint()
    assert FinetuneConfig(launch={"processes": 2}).fingerprint() != alone.fingerprint()


def test_the_relay_replays_whole_lines_and_waits_for_a_line_being_written(tmp_path):
    path, seen = tmp_path / "events.jsonl", []
    relay = EventRelay(path, {"log": seen.append, "metrics": lambda step, figures: seen.append((step, figures)),
                              "samples": None})
    relay.poll()  # nothing written yet
    path.write_text(json.dumps({"kind": "log", "args": ["one"]}) + "\n" + '{"kind": "metrics", "ar')
    relay.poll()
    assert seen == ["one"]
    with open(path, "a") as events:
        events.write('gs": [2, {"loss": 1.5}]}\n' + json.dumps({"kind": "samples", "args": [2, {}]}) + "\n")
    relay.poll()
    assert seen == ["one", (2, {"loss": 1.5})]


def test_a_process_killed_from_outside_is_named_with_its_signal(tmp_path):
    (tmp_path / "launcher.log").write_text(ROOT_CAUSE)
    (tmp_path / "failed-0.txt").write_text("1764817619912000000 RuntimeError: [gloo] Connection closed by peer")
    line = failure(tmp_path, 2, 1)  # the survivor wrote why it stopped; the killed process could not
    assert line.startswith("fine-tuning process 1 of 2 was killed by signal 9 (out of memory?)")
    assert "\n" not in line and "resumes from the last checkpoint" in line


def test_of_two_processes_killed_from_outside_the_root_cause_is_named(tmp_path):
    """The out-of-memory killer often takes more than one; torch's report lists the others before its root cause."""
    report = ROOT_CAUSE.replace("rank      : 0 (local_rank: 0)\n  exitcode  : 1 (pid: 15461)",
                                "rank      : 0 (local_rank: 0)\n  exitcode  : -15 (pid: 15461)")
    (tmp_path / "launcher.log").write_text(report)
    assert failure(tmp_path, 2, 1).startswith("fine-tuning process 1 of 2 was killed by signal 9 (out of memory?)")


def test_the_process_that_raised_first_is_named_whatever_the_launcher_saw_first(tmp_path):
    """Its file is written before it exits, so before the others lose their connection to it; torch's report
    can name a survivor when both exits fall in the same second."""
    (tmp_path / "launcher.log").write_text(ROOT_CAUSE.replace("rank      : 1 (local_rank: 1)\n  exitcode  : -9",
                                                              "rank      : 0 (local_rank: 0)\n  exitcode  : 1"))
    (tmp_path / "failed-0.txt").write_text("1764817619912000500 RuntimeError: [gloo] Connection closed by peer")
    (tmp_path / "failed-1.txt").write_text("1764817619912000000 ValueError: bad batch")
    assert failure(tmp_path, 2, 1).startswith("fine-tuning process 1 of 2 failed: ValueError: bad batch;")


@pytest.mark.slow
def test_two_launched_processes_train_as_one_on_their_samples_and_a_failure_names_its_process_then_resumes(
        tmp_path, tiny_trajectories, tiny_model_dir, monkeypatch):
    """2 processes x batch 2 = 1 process x batch 4, loss for loss (the same slots drawn; each mean weighted by
    its share of the step's positions; the schedule stepped once a step). Rank 1 then fails at step 4: one line
    names it, the step-2 checkpoint stays; killed there, it is named with its signal; the same call resumes there
    to the same record."""
    teacher, store = ModelConfig(name_or_path=str(tiny_model_dir)), str(tiny_trajectories / "store")
    config = FinetuneConfig(steps=4, batch_size=2, log_every=1, checkpoint_every=2, ar_weight=1.0, warmup_steps=0,
                            sample_prompts=0, launch={"processes": 2})
    lines, metrics = [], []
    two = finetune(config, teacher, store, tmp_path / "two", log=lines.append,
                   on_metrics=lambda step, figures: metrics.append(step))
    one = finetune(config.model_copy(update={"batch_size": 4, "launch": LaunchSection()}), teacher, store,
                   tmp_path / "one", log=lambda line: None)
    assert metrics == [1, 2, 3, 4] and any(line.startswith("launching 2 training process") for line in lines)
    assert two.metrics["train_steps"] == one.metrics["train_steps"] == 4
    assert two.metrics["train_blocks"] == one.metrics["train_blocks"]
    for key in ("loss", "consistency", "ar", "agreement", "lr"):
        assert [h[key] for h in two.history] == pytest.approx([h[key] for h in one.history], rel=1e-4), key
    assert not (tmp_path / "two.launch").exists()

    monkeypatch.setenv("PYTHONPATH", str(INJECT))
    monkeypatch.setenv("CLLM_TEST_FAIL", "raise")
    with pytest.raises(RuntimeError) as failed:
        finetune(config, teacher, store, tmp_path / "again", log=lambda line: None)
    assert str(failed.value).startswith("fine-tuning process 1 of 2 failed: RuntimeError: injected failure at step 4")
    assert [p.name for p in (tmp_path / "again.checkpoints").iterdir()] == ["step-000002"]
    assert not (tmp_path / "again").exists()
    monkeypatch.setenv("CLLM_TEST_FAIL", "kill")  # resumed at step 2, killed at step 4 as by the OOM killer
    with pytest.raises(RuntimeError) as killed:
        finetune(config, teacher, store, tmp_path / "again", log=lambda line: None)
    assert str(killed.value).startswith("fine-tuning process 1 of 2 was killed by signal 9")
    monkeypatch.delenv("CLLM_TEST_FAIL")
    resumed_lines = []
    resumed = finetune(config, teacher, store, tmp_path / "again", log=resumed_lines.append)
    assert any("resuming from" in line and "step-000002" in line for line in resumed_lines)
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in two.history], rel=1e-5)


def _option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


@pytest.mark.slow
def test_a_launch_that_sends_nothing_for_long_says_so_once_with_every_processs_stacks(
        tmp_path, tiny_trajectories, tiny_model_dir, monkeypatch):
    """Rank 1 sleeps at step 4 and rank 0 waits for it in a collective: a launch that would sit out its 2-hour
    timeout in silence. It says so once, with each process's stacks, and goes on waiting (here until stopped)."""
    teacher, store = ModelConfig(name_or_path=str(tiny_model_dir)), str(tiny_trajectories / "store")
    config = FinetuneConfig(steps=6, batch_size=2, log_every=1, checkpoint_every=100, warmup_steps=0,
                            sample_prompts=0, launch={"processes": 2})
    monkeypatch.setenv("PYTHONPATH", str(INJECT))
    monkeypatch.setenv("CLLM_TEST_FAIL", "hang")
    monkeypatch.setenv(STALL_S, "20")  # above the processes' start on a busy machine
    warnings = []

    def warned(line: str) -> None:
        warnings.append(line)
        request_stop()  # the test's way out, as Ctrl-C would be

    try:
        with pytest.raises(Stopped):
            finetune(config, teacher, store, tmp_path / "cllm", log=lambda line: None, warn=warned)
    finally:
        clear_stop()
    assert len(warnings) == 1 and "the fine-tuning launch has sent nothing for" in warnings[0], warnings
    assert warnings[0].endswith("still waiting")
    stacks = {rank: (tmp_path / f"cllm.launch/stacks-{rank}.txt").read_text() for rank in (0, 1)}
    assert "sitecustomize.py" in stacks[1] and "in batch" in stacks[1], stacks[1]  # where rank 1 sleeps
    assert "in fit" in stacks[0], stacks[0]  # rank 0: in the training loop, waiting for rank 1
    pids = [int((tmp_path / f"cllm.launch/pid-{rank}.txt").read_text()) for rank in (0, 1)]
    deadline = time.monotonic() + 60  # the stop ends the launcher; its agent ends the ranks, which end themselves
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:  # once their caller is gone at the latest
        time.sleep(0.5)
    assert not any(alive(pid) for pid in pids), f"ranks left running after the stop: {pids}"


def alive(pid: int) -> bool:
    """Whether a process with this pid runs (a zombie, already ended, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_two_fine_tunings_into_one_directory_are_refused_and_a_reused_pid_is_not_the_caller(tmp_path):
    """`launch.py` deleted `<out>.launch` unconditionally and both runs shared `<out>.checkpoints`; its processes
    watched the caller's pid, which the system may give to a new process (#32.10)."""
    import os
    import subprocess

    from cllm_core.engine.errors import UserError
    from cllm_core.runtime.files import exclusive, wait_unheld
    from cllm_core.training.finetune import lock_path, workers_lock_path
    from cllm_core.training.launch import process_start
    from cllm_core.training.worker import caller_alive

    out = tmp_path / "cllm"
    with exclusive(lock_path(out), "fine-tuning into it"):  # another run holds the directory
        with pytest.raises(UserError, match=rf"another process \(pid {os.getpid()}\) is fine-tuning into {out}"):
            finetune(FinetuneConfig(steps=1), ModelConfig(name_or_path="x"), str(tmp_path / "store"), out)
    assert caller_alive(os.getpid(), process_start(os.getpid()))
    assert not caller_alive(os.getpid(), "1")  # the same pid, started at another time: another process
    assert not caller_alive(2 ** 22 + 7, None)  # above the kernel's largest pid: no such process

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from cllm_core.runtime.files import "
                               f"shared_until_exit; shared_until_exit({str(workers_lock_path(out))!r}); "
                               "print('held', flush=True); time.sleep(1.5)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"  # an earlier launch's process, still alive
    with pytest.raises(UserError, match="training processes .* still run after 0.2 s"):
        wait_unheld(workers_lock_path(out), 0.2, "training processes an earlier launch left")
    wait_unheld(workers_lock_path(out), 30, "training processes an earlier launch left")  # until it ends
    assert holder.wait(timeout=30) == 0
