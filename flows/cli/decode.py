"""`cllm decode`: Jacobi-decode one prompt and watch every pass, the paper's figure in a terminal."""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.console import Group
from rich.live import Live
from rich.text import Text

from cllm_core.config import Profile
from flows.cli.base import command, console
from flows.cli.startup import announce_precision


@command("model", "decode")
def decode(
    profile: Profile,
    prompt: Annotated[str, typer.Argument(help="The user prompt (rendered with the chat template if any).")],
    chat: Annotated[bool, typer.Option(help="Apply the tokenizer's chat template.")] = True,
    live: Annotated[bool, typer.Option(help="Redraw in place; --no-live prints one line per pass.")] = True,
) -> None:
    """Decode one prompt with Jacobi decoding and show every pass: committed tokens highlighted."""
    from cllm_core import jacobi_steps, load_model, load_tokenizer
    from cllm_core.prompts import encode, render

    if profile.model is None:
        raise ValueError("no model: pass --model ID_OR_DIR or --config configs/PROFILE.yaml")
    lm = load_model(profile.model, announce_precision(profile.precision, profile.model.device).dtype)
    tokenizer = load_tokenizer(profile.model)
    ids, mask = encode(tokenizer, [render(tokenizer, prompt, chat)], lm.device, chat)
    steps = jacobi_steps(lm, ids, mask, **profile.decode.arguments(lm))

    view = TrajectoryView(tokenizer)
    start = time.perf_counter()
    if live:
        with Live(view.render(), console=console, auto_refresh=False, transient=False) as screen:
            for step in steps:
                view.add(step)
                screen.update(view.render(), refresh=True)
    else:
        for step in steps:
            view.add(step)
            console.print(view.line())
    seconds = time.perf_counter() - start
    console.print(f"[bold]{view.tokens} tokens in {view.passes} forwards[/]: {view.tokens / view.passes:.2f} "
                  f"tokens per forward, {view.fast_forward} fast-forwarded, {view.stationary} stationary, "
                  f"{seconds:.2f}s ({view.tokens / seconds:.1f} tokens/s)", soft_wrap=True)


class TrajectoryView:
    """The paper's figure in a terminal: the response so far, this pass's commits in green, the guess in red."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.committed: list[int] = []
        self.step = None
        self.passes = self.tokens = self.fast_forward = self.stationary = 0

    def add(self, step) -> None:
        (row,) = step.rows
        self.step, self.passes = row, self.passes + 1
        self.committed += row.committed
        self.tokens += len(row.committed)
        self.fast_forward += row.fast_forward
        self.stationary += row.stationary

    def piece(self, tokens, style: str, inline: bool = False) -> Text:
        text = self.tokenizer.decode(list(tokens))
        return Text(text.replace("\n", "↵") if inline else text, style=style)

    def line(self) -> Text:
        """One pass: the block as fed, its earlier commits dim, this pass's commits green, the rest red."""
        row = self.step
        return Text.assemble(f"pass {self.passes:3d}  block {row.block:2d}  +{len(row.committed):2d}  ",
                             self.piece(row.state[: row.prefix], "dim", True),
                             self.piece(row.committed, "bold green", True),
                             self.piece(row.state[row.prefix + len(row.committed) :], "red", True))

    def render(self) -> Group:
        if self.step is None:
            return Group(Text("prefill ...", style="dim"))
        new = len(self.step.committed)
        body = Text.assemble(self.piece(self.committed[:-new], "default"),
                             self.piece(self.committed[-new:], "bold black on green"))
        status = Text(f"pass {self.passes}: block {self.step.block}, +{new} tokens "
                      f"({self.tokens / self.passes:.2f} per forward)", style="dim")
        return Group(body, self.line(), status)
