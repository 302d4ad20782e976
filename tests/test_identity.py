"""Identity by content: a teacher retrained in place invalidates its shards and its CLLM, a store resumes on
another device, below fp32 the batch size is part of a collection, the weights are hashed once."""

import hashlib
import os
import shutil

import pytest
from safetensors.torch import load_file, save_file

from cllm_core import ModelConfig
from cllm_core.data.collect import collection_record, plan
from cllm_core.data.ingest import prompt_id
from cllm_core.runtime import identity
from cllm_core.runtime.config import CollectConfig, FinetuneConfig
from cllm_core.runtime.identity import SIDECAR, seed_of
from cllm_core.runtime.models import model_identity
from cllm_core.training.finetune import finetune

COLLECT = CollectConfig(jacobi={"n_tokens": 4, "max_new_tokens": 12}, batch_size=8, shard_size=8)  # tiny_trajectories'
QUICK = FinetuneConfig(steps=1, batch_size=2, warmup_steps=0, log_every=1, checkpoint_every=100, sample_prompts=0,
                       ar_weight=1.0)


def quiet(line):
    pass


@pytest.fixture
def teacher_dir(tmp_path, tiny_model_dir):
    """A private copy of the tiny model (tests retrain it in place); the copy is the same teacher."""
    return shutil.copytree(tiny_model_dir, tmp_path / "teacher")


@pytest.fixture
def store(tmp_path, tiny_trajectories):
    return str(shutil.copytree(tiny_trajectories / "store", tmp_path / "store"))


@pytest.fixture
def prompts(tiny_trajectories):
    return tiny_trajectories / "prompts/train.parquet"


def retrain_in_place(directory):
    """New weights of the same shapes, written over the old file: the same size, another content."""
    path = directory / "model.safetensors"
    size, tensors = path.stat().st_size, load_file(path)
    save_file({name: tensor * 1.5 for name, tensor in tensors.items()}, path, metadata={"format": "pt"})
    assert path.stat().st_size == size


def test_a_teacher_retrained_in_place_invalidates_its_shards_and_its_cllm(tmp_path, teacher_dir, store, prompts,
                                                                          tiny_model_dir):
    """Regression: the teacher fingerprint hashed only the weight files' sizes, so a teacher retrained into
    the same directory kept its shards (every shard skipped as done) and its fine-tuned CLLM."""
    teacher = ModelConfig(name_or_path=str(teacher_dir))
    assert model_identity(teacher) == model_identity(ModelConfig(name_or_path=str(tiny_model_dir)))
    assert plan(COLLECT, teacher, prompts, store).todo == ()  # a copy of the weights is the same teacher
    assert not finetune(QUICK, teacher, store, tmp_path / "cllm", log=quiet).reused

    retrain_in_place(teacher_dir)
    with pytest.raises(ValueError, match=r"differs in: teacher \(its files changed since: retrained or replaced\)\); "
                                         "use a new store") as error:
        plan(COLLECT, teacher, prompts, store)
    assert "\n" not in str(error.value)
    fresh = plan(COLLECT, teacher, prompts, str(tmp_path / "new-store"))
    assert fresh.done == () and fresh.todo == tuple(range(fresh.shards))
    with pytest.raises(ValueError, match="were collected from another model"):  # not trained on the old ones
        finetune(QUICK, teacher, store, tmp_path / "cllm", log=quiet)


def test_a_store_collected_on_one_device_resumes_on_another(teacher_dir, store, prompts):
    """Regression: the device was part of the teacher fingerprint, so a store collected on cpu was refused
    on cuda. In fp32 neither the device nor the attention kernel changes a trajectory."""
    elsewhere = ModelConfig(name_or_path=str(teacher_dir), device="cpu:0", attn_implementation="eager")
    work = plan(COLLECT, elsewhere, prompts, store)
    assert work.todo == () and work.done == tuple(range(work.shards))


def test_below_fp32_batch_size_precision_and_device_kind_are_part_of_a_collection(teacher_dir, prompts):
    teacher = ModelConfig(name_or_path=str(teacher_dir))

    def config_hash(precision, batch_size=8, device="cpu"):
        model = teacher.model_copy(update={"device": device})
        collect = COLLECT.model_copy(update={"batch_size": batch_size})
        return collection_record(collect, model, prompts, precision=precision)["config_hash"]

    assert config_hash("fp32", 8) == config_hash("fp32", 64) != config_hash("fp32", 8, "meta")  # off a CPU, fp32 too
    assert config_hash("bf16", 8) != config_hash("bf16", 64)
    assert len({config_hash("fp32"), config_hash("bf16"), config_hash("fp16")}) == 3
    record = collection_record(COLLECT, teacher, prompts)  # no reference: the record stores had before it existed
    assert "reference" not in record and "reference" not in record["config"]
    assert config_hash("bf16", 8, "cpu") == config_hash("bf16", 8, "cpu:0") != config_hash("bf16", 8, "meta")


def test_weights_are_hashed_once_and_again_only_when_a_file_changes(teacher_dir, monkeypatch):
    hashed = []
    monkeypatch.setattr(identity, "file_digest", lambda path: hashed.append(os.path.basename(path)) or
                        hashlib.sha256(open(path, "rb").read()).hexdigest())
    teacher = ModelConfig(name_or_path=str(teacher_dir))

    def identify():
        identity._stamped_digest.cache_clear()  # only the sidecar may remember
        hashed.clear()
        return model_identity(teacher)

    first = identify()
    assert "model.safetensors" in hashed and (teacher_dir / SIDECAR).is_file()
    assert identify() == first and hashed == []
    weights = teacher_dir / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # touched, same bytes
    assert identify() == first and hashed == ["model.safetensors"]
    retrain_in_place(teacher_dir)
    assert identify() != first and hashed == ["model.safetensors"]


def test_the_values_people_hold_did_not_move():
    """Prompt ids are content hashes stored in every prompt file and trajectory; the draw seeds decide the
    fine-tuning batches. Routing them through the identity module must not change either."""
    assert prompt_id("What is 2+2?") == hashlib.sha256(b"What is 2+2?").hexdigest()[:16]
    assert seed_of(0, 5, 3) == int.from_bytes(hashlib.sha256(repr((0, 5, 3)).encode()).digest()[:8], "big")
