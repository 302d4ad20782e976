"""Checkpoints resume anywhere: one written on a GPU with fp16 (CUDA tensors, CUDA RNG states, a grad scaler)
loads on a CPU-only machine, with `weights_only=True`, each process taking back its own RNG."""

import zipfile

import torch

from cllm_core.training.checkpoints import Checkpoints, full_states


def as_if_written_on_a_gpu(path):
    """Rewrite a `torch.save` file so that its tensors say they were saved from `cuda:0`."""
    with zipfile.ZipFile(path) as source:
        entries = [(info, source.read(info)) for info in source.infolist()]
    with zipfile.ZipFile(path, "w") as target:
        for info, data in entries:
            if info.filename.endswith("data.pkl"):
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            target.writestr(info, data)


def training_objects(seed):
    torch.manual_seed(seed)
    lm = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(lm.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))
    return lm, optimizer, scheduler


def test_a_gpu_fp16_checkpoint_resumes_on_a_cpu_with_its_scaler_and_each_processs_rng(tmp_path, monkeypatch):
    lm, optimizer, scheduler = training_objects(0)
    lm(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    scaler = torch.amp.GradScaler("cpu")
    scaler.load_state_dict({"scale": 512.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 4,
                            "_growth_tracker": 3})
    cuda = [torch.arange(16, dtype=torch.uint8), torch.ones(16, dtype=torch.uint8)]  # two GPUs' RNG states
    rng = [{"torch": torch.get_rng_state(), "cuda": cuda},
           {"torch": torch.manual_seed(7).get_state(), "cuda": cuda}]
    checkpoints = Checkpoints(tmp_path, "same")
    checkpoints.save(1, full_states(lm, optimizer), scheduler, [{"step": 1}], 2.5, rng, scaler)
    as_if_written_on_a_gpu(tmp_path / "step-000001/state.pt")
    as_if_written_on_a_gpu(tmp_path / "step-000001/optimizer.pt")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    here_lm, here_optimizer, here_scheduler = training_objects(1)
    here_scaler = torch.amp.GradScaler("cpu")
    state = checkpoints.load(checkpoints.latest(), here_lm, here_optimizer, here_scheduler, here_scaler, process=1)
    assert state["step"] == 1 and state["seconds"] == 2.5
    assert here_scaler.state_dict() == scaler.state_dict()
    assert torch.equal(torch.get_rng_state(), rng[1]["torch"])  # process 1's own, the GPUs' skipped
    assert all(torch.equal(a, b) for a, b in zip(here_lm.state_dict().values(), lm.state_dict().values()))
    moments = here_optimizer.state_dict()["state"][0]["exp_avg"]
    assert moments.device.type == "cpu" and torch.equal(moments, optimizer.state_dict()["state"][0]["exp_avg"])
    assert here_scheduler.state_dict() == scheduler.state_dict()

    fp32_lm, fp32_optimizer, fp32_scheduler = training_objects(1)  # fp16 then, no scaler now: left out
    checkpoints.load(checkpoints.latest(), fp32_lm, fp32_optimizer, fp32_scheduler, process=5)
    assert torch.equal(torch.get_rng_state(), rng[0]["torch"])  # a process beyond those saved takes process 0's

