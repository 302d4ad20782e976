"""Training checkpoints: `step-NNNNNN/` directories that let a killed fine-tuning run resume at the same step,
on this machine or another (a GPU's checkpoint resumes on a CPU-only machine, and back).

Weights are safetensors; the optimizer state, and the scheduler, fp16 grad scaler, each process's RNG states, the
loss history and the elapsed time, are `torch.save` dicts of tensors and plain values, read back with
`weights_only=True` (no unrestricted unpickling) onto the CPU, from where each state moves to its parameters'
device. Python's `random` and NumPy's RNG are not saved: nothing in training draws from them (the batches come
from generators seeded by (seed, step, slot)). Each checkpoint is written to a temporary directory and renamed,
so a kill leaves the previous one intact.

Model and optimizer are stored whole, by parameter name, whatever the strategy trained them: `full_states` gathers
them on every process (a collective under FSDP, where each process holds a shard) and the main process writes
them, so a checkpoint made under FSDP resumes under DDP, on one process, or on another machine, and back.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from cllm_core.engine.errors import UserError

WHOLE = StateDictOptions(full_state_dict=True, cpu_offload=True)
FORMAT = 3  # 1: the optimizer's own state_dict (by parameter index); 2: by name, inside state.pt


class Checkpoints:
    """`step-NNNNNN/` directories: `model.safetensors`, `optimizer.pt`, `state.pt` (scheduler, scaler, RNG, history)."""

    def __init__(self, root: Path, fingerprint: str, keep: int = 2):
        self.root, self.fingerprint, self.keep = root, fingerprint, keep

    def latest(self) -> Path | None:
        """The newest complete checkpoint, refused when it was made for another config, teacher or data."""
        done = sorted(self.root.glob("step-*/state.pt")) if self.root.is_dir() else []
        if not done:
            return None
        state = torch.load(done[-1], map_location="cpu", weights_only=True)
        if state.get("format") != FORMAT:
            raise UserError(f"the checkpoint {done[-1].parent} was written by an older cllm-pipeline; delete "
                            f"{self.root} to start over, or resume it with the version that wrote it")
        if state["fingerprint"] != self.fingerprint:
            raise UserError(f"the checkpoint {done[-1].parent} was made with another config, teacher or data "
                            f"({state['fingerprint']}, now {self.fingerprint}); delete {self.root} to start over, "
                            "or restore the config it was made with")
        return done[-1].parent

    def save(self, step: int, states: tuple[dict, dict], scheduler, history: list, seconds: float,
             rng: list[dict] | None = None, scaler: torch.amp.GradScaler | None = None) -> None:
        """`states`: `full_states(lm, optimizer)`; `rng`: every process's `rng_state()`, by process index (default:
        this process's alone)."""
        weights, optimizer = states
        final = self.root / f"step-{step:06d}"
        staging = self.root / f".step-{step:06d}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        save_file(_unshared(weights), str(staging / "model.safetensors"))
        torch.save(optimizer, staging / "optimizer.pt")
        torch.save({"format": FORMAT, "step": step, "fingerprint": self.fingerprint,
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                    "rng": rng or [rng_state()], "history": history, "seconds": seconds}, staging / "state.pt")
        os.replace(staging, final)
        for old in sorted(self.root.glob("step-*"))[: -self.keep]:
            shutil.rmtree(old)

    def load(self, path: Path, lm, optimizer, scheduler, scaler: torch.amp.GradScaler | None = None,
             process: int = 0) -> dict:
        """Restore the states into the objects (on their devices, into each process's shard under FSDP: every
        process calls it) and this `process`'s RNG; returns the dict. Under several processes only the first
        reads the model and optimizer and sends them to the others (a 7B model's are about 16 bytes a parameter,
        which every process of a node reading them at once would hold N times in host memory).

        A scaler state without a scaler now (fp16 then, another precision here) is left out, as are CUDA RNG
        states without CUDA; a process beyond those saved takes process 0's RNG.
        """
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        shared = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not shared or dist.get_rank() == 0:  # read on the CPU, copied in (and sent on)
            weights = load_file(path / "model.safetensors")
            moments = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        else:
            weights, moments = {}, {}
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=shared)
        # two calls, not set_state_dict: given no model state (the other processes), it would skip the model's
        # broadcast that the first process enters, and every process would wait for the others forever
        set_model_state_dict(lm, weights, options=options)
        set_optimizer_state_dict(lm, _bare(optimizer), moments, options=options)
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"][process if process < len(state["rng"]) else 0])
        return state


def full_states(lm, optimizer) -> tuple[dict, dict]:
    """The whole model's and optimizer's states by parameter name, on the CPU. Every process must call it."""
    return get_state_dict(lm, _bare(optimizer), options=WHOLE)


def _bare(optimizer):
    """The torch optimizer inside accelerate's wrapper: torch initialises an empty optimizer's state with a
    zero-gradient step, which the wrapper would route through an fp16 grad scaler that has scaled nothing."""
    return getattr(optimizer, "optimizer", optimizer)


def _unshared(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tied weights (the embedding and the output head) share memory, which safetensors refuses: copy the
    second name's."""
    seen, out = set(), {}
    for name, tensor in weights.items():
        out[name] = tensor.clone() if tensor.data_ptr() in seen else tensor.contiguous()
        seen.add(tensor.data_ptr())
    return out


def rng_state() -> dict:
    """This process's torch RNG states: the CPU's and, when CUDA is present, every device's."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    """Restore `rng_state()`; CUDA states are skipped where there is no CUDA, or past the devices here."""
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        for device, cuda in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda, device)
