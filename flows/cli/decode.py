"""`cllm decode`: Jacobi-decode one prompt and watch every pass, the paper's figure in a terminal; or, with
`--chat`, a short interactive session whose answers stream in the bursts Jacobi commits them in."""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.console import Group
from rich.live import Live
from rich.text import Text

from cllm_core.engine.errors import UserError
from cllm_core.runtime.config import Profile
from flows.cli.base import command, console
from flows.cli.startup import announce_precision


@command("model", "decode")
def decode(
    profile: Profile,
    prompt: Annotated[str | None, typer.Argument(help="The user prompt (rendered with the chat template if any); "
                                                 "with --chat, the first turn (optional).")] = None,
    template: Annotated[bool, typer.Option(help="Apply the tokenizer's chat template.")] = True,
    chat: Annotated[bool, typer.Option("--chat", help="An interactive session: type a prompt, watch the answer "
                                       "arrive a pass at a time; an empty line or Ctrl-D ends it.")] = False,
    no_chat: Annotated[bool, typer.Option("--no-chat", hidden=True)] = False,
    live: Annotated[bool, typer.Option(help="Redraw in place; --no-live prints one line per pass.")] = True,
) -> None:
    """Decode one prompt with Jacobi decoding and show every pass: committed tokens highlighted."""
    from cllm_core import jacobi_steps, load_model, load_tokenizer
    from cllm_core.data.prompts import encode, render

    if no_chat:
        raise UserError("--no-chat is now --no-template (skip the chat template); --chat starts a session")
    if profile.model is None:
        raise UserError("no model: pass --model ID_OR_DIR or --config configs/PROFILE.yaml")
    if prompt is None and not chat:
        raise UserError("no prompt: pass one (cllm decode --model DIR \"What is 3 + 4?\") or --chat for a session")
    lm = load_model(profile.model, announce_precision(profile.precision, profile.model.device,
                                                      profile.model.name_or_path).dtype)
    tokenizer = load_tokenizer(profile.model)
    if chat:
        return session(lm, tokenizer, profile, prompt, template)
    ids, mask = encode(tokenizer, [render(tokenizer, prompt, template)], lm.device, template)
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


def session(lm, tokenizer, profile: Profile, first: str | None, template: bool) -> None:
    """Read a prompt, stream the answer as Jacobi commits it (a pass's tokens at once), say how fast; repeat.
    With a chat template the conversation is kept, turn by turn; without one each prompt stands alone."""
    from transformers import TextStreamer

    from cllm_core import jacobi_generate
    from cllm_core.data.prompts import encode

    use_template = template and bool(tokenizer.chat_template)
    arguments = profile.decode.arguments(lm)
    console.print(f"[dim]Jacobi decoding, block size {arguments['n_tokens']}, at most "
                  f"{arguments['max_new_tokens']} new tokens; an empty line or Ctrl-D ends the session[/]")
    history: list[dict] = []
    while True:
        text = first if first is not None else _ask()
        first = None
        if not text:
            return
        if use_template:
            history.append({"role": "user", "content": text})
            text = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        ids, mask = encode(tokenizer, [text], lm.device, use_template)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        start = time.perf_counter()
        out = jacobi_generate(lm, ids, mask, streamer=streamer, **arguments)
        seconds = time.perf_counter() - start
        new = out.response(0, ids.shape[1])
        if use_template:
            history.append({"role": "assistant", "content": tokenizer.decode(new, skip_special_tokens=True)})
        console.print(f"[dim]{len(new)} tokens in {out.stats.forwards} forwards: "
                      f"{len(new) / out.stats.forwards:.2f} tokens per forward, {len(new) / seconds:.1f} tokens/s[/]",
                      soft_wrap=True)


def _ask() -> str:
    try:
        return console.input("[bold]> [/]").strip()
    except EOFError:
        return ""


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
            return Group(Text("the prompt and the first guess ...", style="dim"))
        new = len(self.step.committed)
        body = Text.assemble(self.piece(self.committed[:-new], "default"),
                             self.piece(self.committed[-new:], "bold black on green"))
        status = Text(f"pass {self.passes}: block {self.step.block}, +{new} tokens "
                      f"({self.tokens / self.passes:.2f} per forward)", style="dim")
        return Group(body, self.line(), status)
