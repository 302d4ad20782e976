import os
from pathlib import Path

import pytest
import torch

from benchmarks.tiny_model import save_tiny_model
from cllm_core import SMOLLM2, load_model, load_tokenizer

SLOW_FIXTURES = {"prefect_server", "smollm2", "auth_server",  # real servers, the real model
                 "tiny_trajectories", "teacher_dir"}  # stage runs: trajectories collected, a teacher trained


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items):
    """A test that boots a server, loads SmolLM2 or runs a stage on what another stage made is slow, whether or
    not it says so (`make test-fast` leaves them out: the algorithm on fake and tiny models, configs, CLI)."""
    for item in items:
        if SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)
    # modules that use the session's Prefect server last, whole (their module fixtures set up once): the server
    # boots meanwhile (pytest_collection_finish). Under pytest-xdist (`make test`: -n 2 --dist loadgroup) they are
    # one group, run by one worker, while the other takes the rest: they mostly wait on servers and subprocesses.
    served = {item.module.__name__ for item in items if "prefect_server" in item.fixturenames}
    items.sort(key=lambda item: item.module.__name__ in served)
    for item in items:
        if item.module.__name__ in served:
            item.add_marker(pytest.mark.xdist_group("prefect"))


def pytest_ignore_collect(collection_path, config):
    """With slow tests left out (`-m "not slow"`), a module marked slow as a whole (the Prefect layer) is not
    even imported: importing Prefect and MLflow costs about 9 s on 2 cores, a sixth of the fast tiers."""
    if config.getoption("markexpr") == "not slow" and collection_path.name.startswith("test_") \
            and collection_path.suffix == ".py" and "\npytestmark = pytest.mark.slow" in collection_path.read_text():
        return True
    return None


@pytest.fixture(autouse=True, scope="session")
def _threads():
    """Both cores for one process; one each for pytest-xdist's two workers (oversubscribed threads spin)."""
    torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama saved with SmolLM2's tokenizer: an ordinary model directory, built offline."""
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def smollm2():
    return load_model(SMOLLM2), load_tokenizer(SMOLLM2)


@pytest.fixture(scope="session")
def tiny_trajectories(tmp_path_factory, tiny_model_dir):
    """Stages 1 and 2 on the tiny model: 12 prompts' Jacobi trajectories (n_tokens 4) in a shard store."""
    import json

    from cllm_core import ModelConfig
    from cllm_core.data.collect import collect
    from cllm_core.data.ingest import ingest
    from cllm_core.runtime.config import CollectConfig, IngestConfig

    directory = tmp_path_factory.mktemp("trajectories")
    source = directory / "q.jsonl"
    source.write_text("".join(json.dumps({"question": f"Add {i} and {i + 3}" + " again" * (i % 3), "answer": str(i)})
                              + "\n" for i in range(16)))
    teacher = ModelConfig(name_or_path=str(tiny_model_dir))
    ingest(IngestConfig(source=str(source), template="plain", eval_fraction=0.2), teacher, directory / "prompts",
           log=lambda line: None)
    collect(CollectConfig(jacobi={"n_tokens": 4, "max_new_tokens": 12}, batch_size=8, shard_size=8), teacher,
            directory / "prompts/train.parquet", str(directory / "store"), log=lambda line: None)
    return directory


def pytest_collection_finish(session):
    """Start the session's Prefect server as soon as the tests are known, if any of them needs it: it boots in its
    own process (20-45 s on 2 cores) while the tests before the first that uses it run."""
    if not os.environ.get("PYTEST_XDIST_WORKER") \
            and any("prefect_server" in item.fixturenames for item in session.items):
        PREFECT["server"] = _start_prefect_server()


def pytest_configure(config):
    """Under pytest-xdist the controller, which collects nothing, starts the server before its workers exist and
    hands them its URL: whichever worker draws the Prefect group finds it booted (or booting)."""
    distributed = getattr(config.option, "numprocesses", None) and not os.environ.get("PYTEST_XDIST_WORKER")
    if distributed and config.getoption("markexpr") != "not slow":
        PREFECT["server"] = _start_prefect_server()
        os.environ[SHARED_SERVER] = PREFECT["server"].url


def pytest_unconfigure(config):
    if SHARED_SERVER in os.environ and not os.environ.get("PYTEST_XDIST_WORKER"):
        PREFECT.pop("server").stop()


PREFECT: dict = {}
SHARED_SERVER = "CLLM_TESTS_PREFECT_API_URL"


def _start_prefect_server():
    """The API server `cllm` starts for itself (flows/server.py), its database in a temporary $PREFECT_HOME."""
    import tempfile

    from flows.server import TemporaryServer

    home, before = tempfile.mkdtemp(prefix="cllm-tests-prefect-"), os.environ.get("PREFECT_HOME")
    os.environ["PREFECT_HOME"] = home  # what the server's process inherits
    try:
        return TemporaryServer(Path(home))
    finally:
        if before is None:
            del os.environ["PREFECT_HOME"]
        else:
            os.environ["PREFECT_HOME"] = before


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server for the session's flows, started with the session; its API URL, for the
    `cllm` subprocesses that should use it too. Tests that need a server of their own start one."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if os.environ.get(SHARED_SERVER):  # a pytest-xdist worker: the controller's server
        from tests.servers import wait_healthy

        wait_healthy(f"{os.environ[SHARED_SERVER]}/health", seconds=180)
        with temporary_settings({PREFECT_API_URL: os.environ[SHARED_SERVER]}):
            yield os.environ[SHARED_SERVER]
        return
    server = PREFECT.pop("server", None) or _start_prefect_server()
    try:
        server.wait(timeout=180)
        with temporary_settings({PREFECT_API_URL: server.url}):
            yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def migrated_mlflow_db(tmp_path_factory):
    """An empty MLflow SQLite store, migrated once: a new store's migrations cost about 3 s on 2 cores."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow") / "template.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def tracking(tmp_path, migrated_mlflow_db, monkeypatch) -> str:
    """A test's own MLflow store (a copy of the migrated empty one) in $MLFLOW_TRACKING_URI; its URI."""
    import shutil

    db = tmp_path / "mlflow.db"
    shutil.copy(migrated_mlflow_db, db)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    return f"sqlite:///{db}"


@pytest.fixture
def tiny_pipeline_profile(tmp_path, tiny_model_dir) -> dict:
    """A whole-pipeline profile on the tiny model: 12 local prompts, n_tokens 4, 3 fine-tuning steps."""
    import json

    source = tmp_path / "q.jsonl"
    source.write_text("".join(json.dumps({"question": f"Add {i} and {i + 3}", "answer": str(2 * i + 3)}) + "\n"
                              for i in range(12)))
    return {"work_dir": str(tmp_path / "work"), "model": {"name_or_path": str(tiny_model_dir)},
            "ingest": {"source": str(source), "template": "plain", "eval_fraction": 0.25},
            "collect": {"jacobi": {"n_tokens": 4, "max_new_tokens": 12}, "batch_size": 8, "shard_size": 8},
            "finetune": {"steps": 3, "batch_size": 4, "ar_weight": 1.0},
            "evaluate": {"methods": ["ar", "jacobi"], "jacobi": {"n_tokens": 4, "max_new_tokens": 12}, "warmup": 0,
                         # a 3-step CLLM of a random model proves the path, not quality: no floors to pass
                         "promote": {"min_answer_agreement": None, "max_accuracy_drop": None, "min_speedup": None}}}
