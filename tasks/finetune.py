"""Prefect task of stage 3: fine-tune the CLLM, streaming losses and Jacobi samples to the MLflow run."""

from __future__ import annotations

from pathlib import Path

from mlflow import MlflowClient
from prefect import get_run_logger, task

from cllm_core.runtime.config import FinetuneConfig, ModelConfig
from cllm_core.runtime.records import CllmRecord
from cllm_core.training.finetune import finetune, read_answers, read_probe
from tasks.progress import log_figures, reporter


@task(name="train-cllm")
def train_cllm(config: FinetuneConfig, model: ModelConfig, store: str, out_dir: Path, prompts_dir: Path,
               run_id: str, precision: str = "auto") -> CllmRecord:
    """Train (or reuse) the CLLM in `out_dir`; every logging step and sample lands in MLflow run `run_id`."""
    client, logger = MlflowClient(), get_run_logger()

    def samples(step: int, found: dict) -> None:
        log_figures(client, run_id, step, found, prefix="sample_")
        client.log_text(run_id, "\n\n---\n\n".join(found["texts"]), f"samples/step-{step:06d}.txt")

    answers = read_answers(prompts_dir / "train.parquet") if config.ar_labels == "ground_truth" else None
    return finetune(config, model, store, out_dir, answers=answers, probe=read_probe(prompts_dir / "eval.parquet"),
                    log=logger.info, warn=logger.warning, precision=precision,
                    on_metrics=lambda step, figures: log_figures(client, run_id, step, figures), on_samples=samples,
                    progress=reporter("fine-tuning", None))  # the terminal's; on_metrics streams to MLflow


@task(name="log-cllm")
def log_cllm(directory: Path, registered_model: str | None, fingerprint: str | None = None) -> dict:
    """Log the CLLM as an MLflow pyfunc that decodes with Jacobi (tasks/cllm_pyfunc.py, with the model directory
    as its artifact) in the active run; register it when named, with how to serve it on the version's page, the
    version tagged with the CLLM's `fingerprint`. A CLLM whose fingerprint a version already carries (a rerun
    that reused it) is not logged or registered again: the run is tagged with that version."""
    import json

    import mlflow
    import torch
    import transformers
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    if registered_model and fingerprint:
        held = registered_version(registered_model, fingerprint)
        if held is not None:
            mlflow.set_tag("cllm.registered_version", held.version)
            return {"model_uri": f"models:/{registered_model}/{held.version}", "registered_model": registered_model,
                    "version": held.version, "reused_version": True}

    n_tokens = json.loads((directory / "config.json").read_text()).get("cllm_n_tokens") or 16
    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "prompt")]),
        outputs=Schema([ColSpec("string", "text"), ColSpec("long", "new_tokens"), ColSpec("long", "forwards"),
                        ColSpec("double", "tokens_per_forward"), ColSpec("double", "seconds")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", 256), ParamSpec("n_tokens", "long", n_tokens),
                            ParamSpec("chat", "boolean", _has_chat_template(directory))]))
    info = mlflow.pyfunc.log_model(
        name="cllm", python_model=str(Path(__file__).with_name("cllm_pyfunc.py")), artifacts={"cllm": str(directory)},
        signature=signature, registered_model_name=registered_model,
        pip_requirements=[f"mlflow=={mlflow.__version__}", f"transformers=={transformers.__version__}",
                          f"torch=={torch.__version__.split('+')[0]}", "pandas"])
    version = info.registered_model_version
    if registered_model and version is not None:  # the model's page and the version's say how to serve it
        client, note = mlflow.MlflowClient(), serving_note(registered_model, version, n_tokens)
        client.update_model_version(registered_model, version, description=note)
        if fingerprint:
            client.set_model_version_tag(registered_model, version, FINGERPRINT_TAG, fingerprint)
        client.set_model_version_tag(registered_model, version, PROMOTION_TAG, "candidate: not evaluated yet")
        mlflow.set_tag("cllm.registered_version", version)
        client.update_registered_model(registered_model, description=note.replace(
            f"models:/{registered_model}/{version}", f"models:/{registered_model}/<version>"))
    return {"model_uri": info.model_uri, "registered_model": registered_model, "version": version}


FINGERPRINT_TAG = "cllm.fingerprint"
PROMOTION_TAG = "cllm.promotion"


def registered_version(name: str, fingerprint: str):
    """The version of registered model `name` that holds the CLLM with this fingerprint, if any."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        versions = mlflow.MlflowClient().search_model_versions(f"name='{name}'")
    except MlflowException:
        return None
    return next((v for v in versions if v.tags.get(FINGERPRINT_TAG) == fingerprint), None)


@task(name="promote-cllm")
def promote_cllm(logged: dict, alias: str, failures: list[str]) -> bool:
    """Give the registered CLLM version the alias users load when its evaluation missed no floor (`failures`
    empty); otherwise leave it a candidate, its `cllm.promotion` tag saying why. Returns whether it got the alias."""
    import mlflow

    name, version = logged.get("registered_model"), logged.get("version")
    if not name or version is None:
        return False
    client = mlflow.MlflowClient()
    if failures:
        client.set_model_version_tag(name, version, PROMOTION_TAG, "candidate: " + "; ".join(failures))
        return False
    client.set_registered_model_alias(name, alias, version)
    client.set_model_version_tag(name, version, PROMOTION_TAG, f"passed its floors: @{alias}")
    return True


def serving_note(name: str, version: int | str, n_tokens: int) -> str:
    """What the registered version's page says: how to load it, serve it and ask it, decoding with Jacobi."""
    uri = f"models:/{name}/{version}"
    return (f"A CLLM: it decodes with Jacobi (block size {n_tokens}), several tokens per forward pass, through the "
            "custom_generate/generate.py its model directory ships.\n\n"
            f"Python: mlflow.pyfunc.load_model('{uri}').predict(pd.DataFrame({{'prompt': ['...']}}), "
            "params={'max_new_tokens': 256})\n\n"
            f"Serve: mlflow models serve -m {uri} --env-manager local -h 127.0.0.1 -p 5001\n\n"
            "Ask: curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' -d "
            "'{\"dataframe_records\": [{\"prompt\": \"...\"}], \"params\": {\"max_new_tokens\": 256}}'\n\n"
            "Each answer: text, new_tokens, forwards, tokens_per_forward, seconds. Params: max_new_tokens, n_tokens, "
            "chat (render with the chat template).\n\n"
            "Hugging Face, without MLflow: AutoModelForCausalLM.from_pretrained(dir).generate(**inputs, "
            "custom_generate=dir, trust_remote_code=True)")


def _has_chat_template(directory: Path) -> bool:
    from transformers import AutoTokenizer

    return bool(AutoTokenizer.from_pretrained(directory).chat_template)
