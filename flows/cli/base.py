"""The `cllm` app: one-line errors, the profile a command runs with, and its options read from the configs.

A command names the profile sections it reads (`@command("collect", "model")`); every field of those pydantic
models becomes an option, its description the help, so a new config field is one edit in cllm_core/config.py.
`--config`, `--set SECTION.FIELD=VALUE` and `--work-dir` (and `--precision` where a command trains or decodes)
come with every command. Options beat `--set`, which beats the profile, which beats the defaults.
"""

from __future__ import annotations

import faulthandler
import inspect
import os
import shutil
import signal
import sys
import threading
import time
import traceback
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Literal, Union, get_args, get_origin

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.markup import escape

from cllm_core.config import Profile, describe, put, read_profile, set_value
from cllm_core.engine.errors import UserError

app = typer.Typer(no_args_is_help=True, add_completion=False)
console = Console()

OPTION_NAMES = {"model.name_or_path": "model", "ingest.fields": "field",
                "evaluate.methods": "method", "finetune.lora.rank": "lora_rank", "finetune.lora.alpha": "lora_alpha",
                "finetune.lora.dropout": "lora_dropout", "finetune.lora.target_modules": "lora_target"}
"""Options whose name is not their field's: the usual flags, and the singular of a repeatable option."""
PAIRS = {"ingest.fields": "ROLE=COLUMN"}
"""How a mapping's items are written (KEY=VALUE unless named here)."""
ARGUMENTS = {"ingest.source"}
"""Fields given as positional arguments."""
STOPPED = "stopped at your request; run the same command again to resume"
STOP_GRACE_S = "CLLM_STOP_GRACE_S"
"""How long a stopped command may take to end (default 120 s: a Jacobi pass or training step, then the records)
before it exits anyway, printing what each thread was doing: a stop that never ends would be a silent hang."""


@app.callback()
def main(context: typer.Context) -> None:
    """Consistency LLMs: Jacobi decoding, trajectory collection, consistency fine-tuning, evaluation."""
    context.call_on_close(stop_on_signals())


def fail(message: str) -> typer.Exit:
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)  # [dask] is no tag
    return typer.Exit(1)


def command(*sections: str, name: str | None = None, precision: bool = True):
    """Register `body(profile, **own_options)` as a command with an option per field of `sections` (dotted paths
    of profile sections: "collect", "model"), plus --config, --set, --work-dir and --precision. The profile is
    resolved and the body run under `one_line_errors`."""

    def register(body: Callable) -> Callable:
        own = [p.replace(kind=p.KEYWORD_ONLY)
               for p in list(inspect.signature(body, eval_str=True).parameters.values())[1:]]
        fields = [option for section in sections for option in section_options(section)]
        common = [_param("config", Path, typer.Option("--config", help="YAML profile from configs/; options "
                                                      "override it.")),
                  _param("set_", list[str], typer.Option("--set", help="SECTION.FIELD=VALUE, repeatable: override "
                                                         "one profile value (YAML syntax), e.g. collect.n_tokens=32.",
                                                         show_default=False)),
                  _param("work_dir", Path, typer.Option(help=Profile.model_fields["work_dir"].description))]
        if precision:
            common.append(_param("precision", str, typer.Option(help=Profile.model_fields["precision"].description)))
        parameters = [*(p for _, p in fields), *common, *own]
        names = [p.name for p in parameters]
        duplicated = {n for n in names if names.count(n) > 1}
        assert not duplicated, f"{body.__name__}: options {duplicated} come from two places; rename one"
        paths = {p.name: path for path, p in fields}

        def run(**given):
            with one_line_errors():
                config = given.pop("config")
                data = read_profile(config) if config else {}
                for item in given.pop("set_") or []:
                    set_value(data, item)
                for key in ("work_dir", "precision"):
                    if given.get(key) is not None:
                        data[key] = given[key]
                    given.pop(key, None)
                for parameter, path in paths.items():
                    value = given.pop(parameter)
                    if value is not None:
                        put(data, path, _parsed(path, value))
                return body(Profile.model_validate(data), **given)

        run.__signature__ = inspect.Signature(parameters)
        run.__annotations__ = {p.name: p.annotation for p in parameters}
        run.__name__, run.__doc__ = body.__name__, body.__doc__
        app.command(name=name or body.__name__.replace("_", "-"))(run)
        return body

    return register


def section_options(path: str) -> list[tuple[str, inspect.Parameter]]:
    """(dotted field path, typer parameter) for every field of the profile section at `path`, nested models
    flattened: `collect` gives collect.n_tokens as --n-tokens."""
    model = _section_model(path)
    found = []
    for field, info in model.model_fields.items():
        dotted = f"{path}.{field}"
        kind = _bare(info.annotation)
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            found += section_options(dotted)
            continue
        name = OPTION_NAMES.get(dotted, field)
        choices = _choices(kind)
        help_text = escape((info.description or "") + (f" [{'|'.join(choices)}]" if choices else ""))  # no markup
        if dotted in ARGUMENTS:
            parameter = _param(name, _cli_type(kind), typer.Argument(help=help_text, show_default=False))
        else:
            option = [f"--{name.replace('_', '-')}"]
            if _cli_type(kind) is bool:
                option = [f"--{name.replace('_', '-')}/--no-{name.replace('_', '-')}"]
            parameter = _param(name, _cli_type(kind), typer.Option(*option, help=help_text, show_default=False))
        found.append((dotted, parameter))
    return found


def _section_model(path: str) -> type[BaseModel]:
    model: type[BaseModel] = Profile
    for part in path.split("."):
        model = _bare(model.model_fields[part].annotation)
    return model


def _bare(annotation):
    """`X | None` -> X."""
    if get_origin(annotation) in (Union, types.UnionType):
        rest = [arg for arg in get_args(annotation) if arg is not type(None)]
        return rest[0] if len(rest) == 1 else annotation
    return annotation


def _choices(kind) -> list[str]:
    if get_origin(kind) is Literal:
        return [str(choice) for choice in get_args(kind)]
    if get_origin(kind) is list:
        return _choices(get_args(kind)[0])
    return []


def _cli_type(kind):
    """What typer parses: choices as text (pydantic names a wrong one in one line), lists and mappings as
    repeatable text (KEY=VALUE for a mapping)."""
    if get_origin(kind) is Literal:
        return str
    if get_origin(kind) in (list, dict):
        return list[str] if get_origin(kind) is dict else list[_cli_type(get_args(kind)[0])]
    return kind


def _param(name: str, kind, info) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[kind | None, info])


def _parsed(path: str, value):
    """A mapping option's KEY=VALUE items as a dict; lists of nothing are no option."""
    if get_origin(_bare(_field_info(path).annotation)) is dict:
        pairs = {}
        for item in value:
            key, sep, column = item.partition("=")
            if not sep or not key or not column:
                flag = OPTION_NAMES.get(path, path.rsplit(".", 1)[1])
                raise UserError(f"--{flag} expects {PAIRS.get(path, 'KEY=VALUE')}, got {item!r}")
            pairs[key] = column
        return pairs
    return value


def _field_info(path: str):
    section, _, field = path.rpartition(".")
    return _section_model(section).model_fields[field]


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Bad input (a `UserError`, a profile that does not validate, failed shards) ends the command with one line
    and exit code 1. Anything else is a bug: its traceback is printed, then one line that says so, exit code 1."""
    try:
        yield
    except ValidationError as error:
        drop_new_work_dir()
        raise fail(describe(error)) from None
    except input_errors() as error:
        drop_new_work_dir()
        raise fail(str(error).splitlines()[0] if str(error) else type(error).__name__) from None
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (stop_on_signals), wherever it landed
        from cllm_core.engine.stopping import request_stop

        request_stop()  # in case it came another way: no thread may keep the process alive
        console.print(f"[bold red]stopped:[/] {STOPPED}", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    except Exception as error:  # noqa: BLE001 - a bug: shown whole, then named in one line
        console.print(escape(traceback.format_exc().rstrip()), highlight=False, soft_wrap=True)
        first = str(error).splitlines()[0] if str(error) else ""
        raise fail(f"{type(error).__name__}{': ' if first else ''}{first} (a bug in cllm-pipeline, not your input: "
                   "the traceback is above; please report it)") from None


def input_errors() -> tuple[type[Exception], ...]:
    """What bad input raises. ShardsFailed counts once its module is loaded (it loads pyarrow: not for --help)."""
    shards = sys.modules.get("cllm_core.data.shards")
    return (UserError,) + ((shards.ShardsFailed,) if shards else ())


def stop_on_signals() -> Callable[[], None]:
    """Make SIGTERM and Ctrl-C ask every long loop to stop (cllm_core.engine.stopping) and interrupt the main thread, so
    a command ends within about one Jacobi pass or training step, with one line; returns what undoes it. During a
    flow Prefect's SIGTERM handler raises in the main thread instead, and the flows pass the request on. Any stop
    request, however it came, arms a deadline (`StopDeadline`)."""
    from cllm_core.engine.stopping import clear_stop, on_stop_request

    clear_stop()
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {signum: signal.signal(signum, _stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    deadline = StopDeadline(float(os.environ.get(STOP_GRACE_S) or 120))
    forget = on_stop_request(deadline.arm)

    def restore() -> None:
        forget()
        deadline.ended.set()
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    return restore


def _stop(signum: int, frame) -> None:
    from cllm_core.engine.stopping import Stopped, request_stop

    request_stop()
    raise Stopped(STOPPED)


class StopDeadline:
    """After a stop request, end the process within `grace` seconds whatever holds it (a thread the request does
    not reach, a lock an interrupted call left taken): one line, every thread's stack, exit code 130. A command
    that ended (`ended` set) while the process goes on (a notebook, a test) is left alone; one whose interpreter
    is still waiting at exit for a thread is not. What it cuts short is whole or ignored (shards, checkpoints and
    models are renamed into place when complete)."""

    def __init__(self, grace: float):
        self.grace, self.ended, self.armed = grace, threading.Event(), False

    def arm(self) -> None:
        if not self.armed:
            self.armed = True
            threading.Thread(target=self._watch, daemon=True, name="stop-deadline").start()

    def _watch(self) -> None:
        time.sleep(self.grace)
        if self.ended.is_set() and threading.main_thread().is_alive():
            return
        err = sys.__stderr__  # the process's own stream: a test's or a notebook's replacement may have no file
        try:
            err.write(f"stopped: still running {self.grace:g} s after the stop request; exiting now ({STOPPED}). "
                      "What each thread was doing:\n")
            err.flush()
            faulthandler.dump_traceback(file=err, all_threads=True)
            err.flush()
        finally:
            os._exit(130)


created: dict = {}
"""The work dir this command created for Prefect's state, and the server it started there (flows/cli/startup.py)."""


def drop_new_work_dir() -> None:
    """A command refused before any work leaves no work dir behind: only Prefect's state would be in it."""
    work_dir, server = created.pop("work_dir", None), created.pop("server", None)
    if work_dir is not None and work_dir.is_dir() and [p.name for p in work_dir.iterdir()] == [".prefect"]:
        if server is not None:
            server.stop()
        shutil.rmtree(work_dir, ignore_errors=True)
