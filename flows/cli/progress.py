"""Live progress bars of the long stages, drawn on the console of Prefect's log handler."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from cllm_core.runtime.records import ShardManifest
from flows.cli import startup
from flows.cli.base import console


@contextmanager
def live_progress(enabled: bool) -> Iterator[None]:
    """Bars for the long stages: one per training stage (step of total, loss, tokens/s, time left) and one that
    advances per collected shard with its throughput. They draw on the console of Prefect's log handler, so
    log lines scroll above them instead of through them; off unless both ends are terminals."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.theme import Theme

    from flows.collect import shard_listener
    from tasks.progress import step_listener

    screen = next((handler.console for handler in startup.prefect_console_handlers()), console)
    if not (enabled and console.is_terminal and screen.is_terminal):
        yield
        return
    bars: dict[str, int] = {}
    failed: list[int] = []

    def bar(name: str, total: int | None) -> int:
        if name not in bars:
            bars[name] = board.add_task(name, total=total, news="", failed="")
        return bars[name]

    def show_shards(collected: int, total: int, shard: int | None, manifest: ShardManifest | None) -> None:
        news = {}
        if manifest is not None:
            news["news"] = (f"shard {shard}: {manifest.prompts_per_s:.2f} prompts/s, {manifest.tokens_per_s:.0f} "
                            f"tokens/s, {manifest.mean_passes_per_block:.2f} passes per block")
        elif shard is not None:
            failed.append(shard)
            news["failed"] = f"failed: {failed}"
        board.update(bar("shards", total), total=total, completed=collected, **news)

    def show_steps(stage: str, step: int, steps: int, figures: dict) -> None:
        loss = figures.get("loss", figures.get("train_loss"))
        news = f"loss {loss:.3f}, {figures.get('tokens_per_s', 0):.0f} tokens/s" if loss is not None else ""
        board.update(bar(stage, steps), total=steps, completed=step, news=news)

    screen.push_theme(Theme())  # Prefect's theme has only its log styles; the bars need rich's own
    shards, steps = shard_listener.set(show_shards), step_listener.set(show_steps)
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("left"), TimeRemainingColumn(), TextColumn("{task.fields[news]}"),
                      TextColumn("{task.fields[failed]}", style="red"), console=screen) as board:
            yield
    finally:
        shard_listener.reset(shards)
        step_listener.reset(steps)
        screen.pop_theme()
