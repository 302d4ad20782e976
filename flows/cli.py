"""`cllm`: one command, a sub-command per stage. Errors print one line and exit non-zero."""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from cllm_core.config import ModelConfig

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__.split(":")[0] + ": Consistency LLMs.")
console = Console()
FIELDS = ModelConfig.model_fields


@app.callback()
def main() -> None:
    """Consistency LLMs: Jacobi decoding, trajectory collection, consistency fine-tuning, evaluation."""


def fail(message: str) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(1)


@app.command()
def decode(
    prompt: Annotated[str, typer.Argument(help="The user prompt (rendered with the chat template if any).")],
    model: Annotated[str, typer.Option(help=FIELDS["name_or_path"].description)],
    gguf_file: Annotated[str | None, typer.Option(help=FIELDS["gguf_file"].description)] = None,
    n_tokens: Annotated[int, typer.Option(help="Jacobi block size: tokens solved in parallel per pass.")] = 16,
    max_new_tokens: Annotated[int, typer.Option(help="Stop after this many new tokens.")] = 128,
    init: Annotated[str, typer.Option(help="Initial guess of a block: repeat (last token) or random.")] = "repeat",
    seed: Annotated[int, typer.Option(help="Seed of the random initial guess.")] = 0,
    dtype: Annotated[str, typer.Option(help=FIELDS["dtype"].description)] = "float32",
    device: Annotated[str, typer.Option(help=FIELDS["device"].description)] = "cpu",
    chat: Annotated[bool, typer.Option(help="Apply the tokenizer's chat template.")] = True,
    live: Annotated[bool, typer.Option(help="Redraw in place; --no-live prints one line per pass.")] = True,
) -> None:
    """Decode one prompt with Jacobi decoding and show every pass: committed tokens highlighted."""
    from cllm_core import jacobi_steps, load_model, load_tokenizer
    from cllm_core.prompts import encode, render

    try:
        config = ModelConfig(name_or_path=model, gguf_file=gguf_file, dtype=dtype, device=device)
        lm, tokenizer = load_model(config), load_tokenizer(config)
        ids, mask = encode(tokenizer, [render(tokenizer, prompt, chat)], lm.device)
        steps = jacobi_steps(lm, ids, mask, n_tokens=n_tokens, max_new_tokens=max_new_tokens, init=init, seed=seed)
    except (ValueError, OSError, TypeError) as error:  # pydantic's ValidationError is a ValueError
        raise fail(str(error).splitlines()[0]) from None

    view = TrajectoryView(tokenizer, n_tokens)
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
                  f"{seconds:.2f}s ({view.tokens / seconds:.1f} tokens/s)")


class TrajectoryView:
    """The paper's figure in a terminal: the response so far, this pass's commits in green, the guess in red."""

    def __init__(self, tokenizer, n_tokens: int):
        self.tokenizer, self.n_tokens = tokenizer, n_tokens
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

    def piece(self, tokens, style: str) -> Text:
        return Text(self.tokenizer.decode(list(tokens)), style=style)

    def line(self) -> Text:
        """One pass: the block as fed, its earlier commits dim, this pass's commits green, the rest red."""
        row = self.step
        return Text.assemble(f"pass {self.passes:3d}  block {row.block:2d}  +{len(row.committed):2d}  ",
                             self.piece(row.state[: row.prefix], "dim"), self.piece(row.committed, "bold green"),
                             self.piece(row.state[row.prefix + len(row.committed) :], "red"))

    def render(self) -> Group:
        if self.step is None:
            return Group(Text("prefill ...", style="dim"))
        new = len(self.step.committed)
        body = Text.assemble(self.piece(self.committed[:-new], "default"),
                             self.piece(self.committed[-new:], "bold black on green"))
        status = Text(f"pass {self.passes}: block {self.step.block}, +{new} tokens "
                      f"({self.tokens / self.passes:.2f} per forward)", style="dim")
        return Group(body, self.line(), status)


if __name__ == "__main__":
    app()
