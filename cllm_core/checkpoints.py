"""Training checkpoints: `step-NNNNNN/` directories that let a killed fine-tuning run resume at the same step.

Weights are safetensors; the optimizer, scheduler and RNG states, the loss history and the elapsed time are
a `torch.save` dict read back with `weights_only=True` (no unrestricted unpickling). Each checkpoint is
written to a temporary directory and renamed, so a kill leaves the previous one intact.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_model as load_weights
from safetensors.torch import save_model as save_weights


class Checkpoints:
    """`step-NNNNNN/` directories: `model.safetensors` and `state.pt` (optimizer, scheduler, RNG, history)."""

    def __init__(self, root: Path, fingerprint: str, keep: int = 2):
        self.root, self.fingerprint, self.keep = root, fingerprint, keep

    def latest(self) -> Path | None:
        """The newest complete checkpoint, refused when it was made for another config, teacher or data."""
        done = sorted(self.root.glob("step-*/state.pt")) if self.root.is_dir() else []
        if not done:
            return None
        state = torch.load(done[-1], weights_only=True)
        if state["fingerprint"] != self.fingerprint:
            raise ValueError(f"the checkpoint {done[-1].parent} was made with another config, teacher or data "
                             f"({state['fingerprint']}, now {self.fingerprint}); delete {self.root} to start over, "
                             "or restore the config it was made with")
        return done[-1].parent

    def save(self, step: int, lm, optimizer, scheduler, history: list, seconds: float) -> None:
        final = self.root / f"step-{step:06d}"
        staging = self.root / f".step-{step:06d}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        save_weights(lm, str(staging / "model.safetensors"))
        torch.save({"step": step, "fingerprint": self.fingerprint, "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(), "history": history,
                    "seconds": seconds}, staging / "state.pt")
        os.replace(staging, final)
        for old in sorted(self.root.glob("step-*"))[: -self.keep]:
            shutil.rmtree(old)

    def load(self, path: Path, lm, optimizer, scheduler) -> dict:
        state = torch.load(path / "state.pt", weights_only=True)
        load_weights(lm, str(path / "model.safetensors"))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        return state
