"""The `cllm` app: one-line errors, and the profile a command runs with.

A command names the profile sections it reads (`@command("collect", "model")`); every field of those pydantic
models becomes an option (options.py), its description the help, so a new config field is one edit in
cllm_core/runtime/config/. How a command stops on a signal is signals.py's.
`--config`, `--set SECTION.FIELD=VALUE` and `--work-dir` (and `--precision` where a command trains or decodes)
come with every command. Options beat `--set`, which beats the profile, which beats the defaults.
"""

from __future__ import annotations

import inspect
import shutil
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from cllm_core.engine.errors import UserError
from cllm_core.runtime.config import Profile, describe, put, read_profile, set_value
from flows.cli.options import option_parameter, parsed_value, section_options
from flows.cli.signals import STOPPED, stop_on_signals

app = typer.Typer(no_args_is_help=True, add_completion=False)
console = Console()


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
        body_options = [p.replace(kind=p.KEYWORD_ONLY)
               for p in list(inspect.signature(body, eval_str=True).parameters.values())[1:]]
        fields = [option for section in sections for option in section_options(section)]
        common = [
            option_parameter("config", Path, typer.Option("--config", help="YAML profile from configs/; options "
                                                          "override it.")),
            option_parameter("set_", list[str], typer.Option("--set", help="SECTION.FIELD=VALUE, repeatable: override "
                                                             "one profile value (YAML syntax), e.g. "
                                                             "collect.n_tokens=32.", show_default=False)),
            option_parameter("work_dir", Path, typer.Option(help=Profile.model_fields["work_dir"].description))]
        if precision:
            common.append(option_parameter("precision", str,
                                           typer.Option(help=Profile.model_fields["precision"].description)))
        parameters = [*(p for _, p in fields), *common, *body_options]
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
                        put(data, path, parsed_value(path, value))
                return body(Profile.model_validate(data), **given)

        run.__signature__ = inspect.Signature(parameters)
        run.__annotations__ = {p.name: p.annotation for p in parameters}
        run.__name__, run.__doc__ = body.__name__, body.__doc__
        app.command(name=name or body.__name__.replace("_", "-"))(run)
        return body

    return register


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


created: dict = {}
"""The work dir this command created for Prefect's state, and the server it started there (flows/cli/startup.py)."""


def drop_new_work_dir() -> None:
    """A command refused before any work leaves no work dir behind: only Prefect's state would be in it."""
    work_dir, server = created.pop("work_dir", None), created.pop("server", None)
    if work_dir is not None and work_dir.is_dir() and [p.name for p in work_dir.iterdir()] == [".prefect"]:
        if server is not None:
            server.stop()
        shutil.rmtree(work_dir, ignore_errors=True)
