"""`cllm`: one command, a sub-command per stage. Errors print one line and exit non-zero."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from cllm_core.config import DecodeConfig, ModelConfig, Profile, describe, load_profile

app = typer.Typer(no_args_is_help=True, add_completion=False)
console = Console()
MODEL, DECODE = ModelConfig.model_fields, DecodeConfig.model_fields


@app.callback()
def main() -> None:
    """Consistency LLMs: Jacobi decoding, trajectory collection, consistency fine-tuning, evaluation."""


def fail(message: str) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(1)


@app.command()
def decode(
    prompt: Annotated[str, typer.Argument(help="The user prompt (rendered with the chat template if any).")],
    config: Annotated[Path | None, typer.Option(help="YAML profile from configs/; options below override it.")] = None,
    model: Annotated[str | None, typer.Option(help=MODEL["name_or_path"].description)] = None,
    gguf_file: Annotated[str | None, typer.Option(help=MODEL["gguf_file"].description)] = None,
    dtype: Annotated[str | None, typer.Option(help=MODEL["dtype"].description)] = None,
    device: Annotated[str | None, typer.Option(help=MODEL["device"].description)] = None,
    n_tokens: Annotated[int | None, typer.Option(help=DECODE["n_tokens"].description)] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help=DECODE["max_new_tokens"].description)] = None,
    init: Annotated[str | None, typer.Option(help=DECODE["init"].description)] = None,
    seed: Annotated[int | None, typer.Option(help=DECODE["seed"].description)] = None,
    chat: Annotated[bool, typer.Option(help="Apply the tokenizer's chat template.")] = True,
    live: Annotated[bool, typer.Option(help="Redraw in place; --no-live prints one line per pass.")] = True,
) -> None:
    """Decode one prompt with Jacobi decoding and show every pass: committed tokens highlighted."""
    from cllm_core import jacobi_steps, load_model, load_tokenizer
    from cllm_core.prompts import encode, render

    try:
        profile = resolve_profile(config, {"name_or_path": model, "gguf_file": gguf_file, "dtype": dtype,
                                           "device": device},
                                  {"n_tokens": n_tokens, "max_new_tokens": max_new_tokens, "init": init, "seed": seed})
        lm, tokenizer = load_model(profile.model), load_tokenizer(profile.model)
        ids, mask = encode(tokenizer, [render(tokenizer, prompt, chat)], lm.device)
        steps = jacobi_steps(lm, ids, mask, **profile.decode.model_dump())
    except ValidationError as error:
        raise fail(describe(error)) from None
    except (ValueError, OSError, TypeError) as error:
        raise fail(str(error).splitlines()[0]) from None

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


def resolve_profile(path: Path | None, model: dict, decode: dict) -> Profile:
    """The profile at `path` (or the defaults), overridden by the options the user gave."""
    given = lambda options: {k: v for k, v in options.items() if v is not None}  # noqa: E731
    base = load_profile(path) if path else None
    if base is None and model["name_or_path"] is None:
        raise ValueError("no model: pass --model ID_OR_DIR or --config configs/PROFILE.yaml")
    model_fields = (base.model.model_dump() if base else {}) | given(model)
    decode_fields = (base.decode.model_dump() if base else {}) | given(decode)
    return Profile(model=ModelConfig(**model_fields), decode=DecodeConfig(**decode_fields))


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


if __name__ == "__main__":
    app()
