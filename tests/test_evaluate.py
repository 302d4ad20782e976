"""Stage 4 in the library: the summary's arithmetic on hand-made samples, and a real evaluation of a tiny
model in which Jacobi matches AR exactly and a broken decoder is caught by the exact-match figure."""

import json
import shutil

import pyarrow.parquet as pq
import pytest

from cllm_core import ModelConfig
from cllm_core.evaluation.evaluate import run_evaluation
from cllm_core.evaluation.summary import shortfalls, summarize
from cllm_core.runtime.config import EvalConfig


def sample(prompt, model, method, tokens, forwards, seconds, correct=True, same=True):
    return {"prompt_id": prompt, "model": model, "method": method, "new_tokens": tokens, "forwards": forwards,
            "tokens_per_forward": tokens / forwards, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "fast_forward": tokens - forwards, "stationary": 0, "matches_ar": same, "correct": correct,
            "repetitive": False}


def test_a_model_far_below_the_baselines_accuracy_is_said_once_and_one_close_to_it_not():
    """A collapsed CLLM (LoRA at too high a rate made 2% against 99%) was only a number in the table."""
    samples = [sample(p, "teacher", "ar", 10, 10, 1.0) for p in "abcdefghij"]
    samples += [sample(p, model, method, 10, 5, 1.0, correct=p not in wrong) for p in "abcdefghij"
                for model, wrong in (("near", "a"), ("collapsed", "abcdefgh")) for method in ("ar", "jacobi")]
    lines = shortfalls(summarize(samples), ("teacher", "ar"))
    assert len(lines) == 1 and lines[0].startswith("collapsed answers 20.0% right with ar against teacher's 100.0%")


def test_summary_rows_are_totals_over_prompts_and_speedups_against_the_baseline():
    samples = [sample("a", "teacher", "ar", 10, 10, 1.0), sample("b", "teacher", "ar", 30, 30, 1.0),
               sample("a", "cllm", "jacobi", 10, 2, 0.25, correct=False), sample("b", "cllm", "jacobi", 30, 10, 1.0,
                                                                                  same=False)]
    rows = {(r.model, r.method): r.to_json() for r in summarize(samples)}
    teacher, cllm = rows["teacher", "ar"], rows["cllm", "jacobi"]
    assert teacher["tokens_per_forward"] == 1.0 and teacher["speedup"] == 1.0 and teacher["mean_speedup"] == 1.0
    assert cllm["tokens_per_forward"] == 40 / 12  # total tokens over total forwards, not a mean of ratios
    assert cllm["tokens_per_s"] == 40 / 1.25 and cllm["speedup"] == pytest.approx((40 / 1.25) / (40 / 2.0))
    assert cllm["mean_speedup"] == pytest.approx((4.0 + 1.0) / 2)  # per prompt: 40 vs 10 tok/s, 30 vs 30
    assert cllm["accuracy"] == 0.5 and cllm["exact_match"] == 0.5 and cllm["fast_forward"] == 28


@pytest.fixture
def work(tmp_path, tiny_trajectories):
    shutil.copytree(tiny_trajectories / "prompts", tmp_path / "prompts")
    return tmp_path


def test_jacobi_matches_ar_on_every_prompt_and_every_figure_is_written(work, tiny_model_dir):
    teacher = ModelConfig(name_or_path=str(tiny_model_dir))
    config = EvalConfig(jacobi={"n_tokens": 4, "max_new_tokens": 12}, check="exact", warmup=1,
                        methods=["ar", "jacobi", "lookup", "jacobi_lookup", "jacobi_multiblock", "jacobi_recycling"])
    result = run_evaluation(config, {"teacher": teacher}, work / "prompts/eval.parquet", work / "eval",
                            log=lambda line: None)
    rows = {r.method: r.to_json() for r in result.summary}
    assert set(rows) == {"ar", "jacobi", "lookup", "jacobi_lookup", "jacobi_multiblock", "jacobi_recycling"}
    assert {row["exact_match"] for row in rows.values()} == {1.0}
    assert rows["ar"]["tokens_per_forward"] == 1.0 and rows["ar"]["speedup"] == 1.0
    samples = pq.read_table(work / "eval/samples.parquet")
    assert samples.num_rows == 6 * result.prompts and set(samples.column("method").to_pylist()) == set(rows)
    assert json.loads((work / "eval/summary.json").read_text())[0]["model"] == "teacher"
    assert sorted(p.rsplit("/", 1)[-1] for p in result.pictures) == [
        "accuracy_vs_speed.png", "speedup.png", "tokens_per_forward.png", "trajectory-teacher.png"]
    assert all((work / "eval" / name).read_bytes()[:4] == b"\x89PNG" for name in ("speedup.png",))


def test_a_broken_decoder_is_caught_by_the_exact_match_figure(work, tiny_model_dir, monkeypatch):
    import cllm_core.evaluation.evaluate as evaluation

    real = evaluation.jacobi_generate

    def drops_a_token(model, ids, mask, **kwargs):  # a "fast" decoder that silently skips the 3rd token
        out = real(model, ids, mask, **kwargs)
        out.sequences[:, ids.shape[1] + 2] = 5
        return out

    monkeypatch.setattr(evaluation, "jacobi_generate", drops_a_token)
    teacher = ModelConfig(name_or_path=str(tiny_model_dir))
    config = EvalConfig(methods=["ar", "jacobi"], jacobi={"n_tokens": 4, "max_new_tokens": 12}, warmup=0)
    result = run_evaluation(config, {"teacher": teacher}, work / "prompts/eval.parquet", work / "eval",
                            log=lambda line: None)
    jacobi = next(r.to_json() for r in result.summary if r.method == "jacobi")
    assert jacobi["exact_match"] < 1.0


@pytest.mark.parametrize(("case", "expected"), [
    ("no-model", "does not exist"),
    ("not-causal", "is not a causal language model"),
    ("no-prompts", "does not exist; run `cllm ingest` first"),
    ("other-tokenizer", "uses another tokenizer than teacher"),
])
def test_bad_input_is_one_clear_line(work, tiny_model_dir, case, expected):
    teacher = ModelConfig(name_or_path=str(tiny_model_dir))
    models, prompts = {"teacher": teacher, "cllm": teacher}, work / "prompts/eval.parquet"
    if case == "no-model":
        models["cllm"] = ModelConfig(name_or_path=str(work / "nowhere"))
    elif case == "not-causal":
        broken = work / "broken"
        shutil.copytree(tiny_model_dir, broken)
        config = json.loads((broken / "config.json").read_text())
        (broken / "config.json").write_text(json.dumps(config | {"model_type": "vit", "architectures": ["ViTModel"]}))
        models["cllm"] = ModelConfig(name_or_path=str(broken))
    elif case == "no-prompts":
        prompts = work / "none.parquet"
    elif case == "other-tokenizer":
        other = work / "other"
        shutil.copytree(tiny_model_dir, other)
        vocab = json.loads((other / "tokenizer.json").read_text())
        vocab["model"]["vocab"]["zzzz-new-token"] = len(vocab["model"]["vocab"]) + 10_000
        (other / "tokenizer.json").write_text(json.dumps(vocab))
        models["cllm"] = ModelConfig(name_or_path=str(other))
    with pytest.raises((OSError, ValueError)) as error:
        run_evaluation(EvalConfig(jacobi={"n_tokens": 4, "max_new_tokens": 12}), models, prompts, work / "eval",
                       log=lambda x: None)
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_a_block_larger_than_the_budget_is_refused():
    with pytest.raises(ValueError, match=r"n_tokens \(32\) is larger than max_new_tokens \(16\)"):
        EvalConfig(jacobi={"n_tokens": 32, "max_new_tokens": 16})


def test_tokens_per_forward_is_exactly_what_fake_models_are_built_to_give(work, tiny_model_dir):
    """A model that always predicts one token confirms a whole block per pass; a successor model fixes one
    token per pass: 12 tokens at n_tokens 4 take 1 + ceil(11 / 4) = 4 and 12 forwards."""
    from cllm_core import load_tokenizer
    from cllm_core.evaluation.evaluate import evaluate
    from tests.fakes import constant, successor

    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)))
    prompts = [{"prompt_id": str(i), "prompt": f"count {i}", "answer": None} for i in range(3)]
    config = EvalConfig(methods=["jacobi"], jacobi={"n_tokens": 4, "max_new_tokens": 12}, warmup=0)
    samples = evaluate({"constant": constant(7), "successor": successor()}, tokenizer, prompts, False, config,
                       log=lambda line: None)
    rows = {r.model: r.to_json() for r in summarize(samples, baseline=("constant", "ar"))}
    assert rows["constant"]["tokens_per_forward"] == 3.0 and rows["constant"]["forwards"] == 3 * 4
    assert rows["successor"]["tokens_per_forward"] == 1.0 and rows["successor"]["new_tokens"] == 3 * 12
    assert rows["constant"]["speedup"] is None  # no AR baseline was run, so no speedup is made up


def test_auto_check_follows_the_ingest_preset(tmp_path):
    from cllm_core.evaluation.evaluate import resolve_check

    prompts = tmp_path / "prompts/eval.parquet"
    prompts.parent.mkdir()
    assert resolve_check(EvalConfig(), prompts) == "exact"  # nothing recorded: compare whole texts
    for source, check in [("synthetic-math", "math"), ("gsm8k", "math"), ("spider", "exact"), ("my.jsonl", "exact")]:
        (prompts.parent / "manifest.json").write_text(json.dumps({"config": {"source": source, "preset": None}}))
        assert resolve_check(EvalConfig(), prompts) == check
    (prompts.parent / "manifest.json").write_text(json.dumps({"config": {"source": "x.jsonl", "preset": "gsm8k"}}))
    assert resolve_check(EvalConfig(), prompts) == "math"
    assert resolve_check(EvalConfig(check="exact"), prompts) == "exact"


def test_a_cllm_is_decoded_at_the_block_size_it_was_trained_for_unless_told_and_evaluation_says_so(
        work, tiny_model_dir):
    cllm = work / "cllm"
    shutil.copytree(tiny_model_dir, cllm)
    settings = json.loads((cllm / "config.json").read_text()) | {"cllm_n_tokens": 3}
    (cllm / "config.json").write_text(json.dumps(settings))
    decoding = {"n_tokens": 3, "max_new_tokens": 12, "init": "random", "carry": False, "seed": 0}
    (cllm / "cllm.json").write_text(json.dumps({"trajectories": {"decoding": decoding}}))
    models = {"teacher": ModelConfig(name_or_path=str(tiny_model_dir)), "cllm": ModelConfig(name_or_path=str(cllm))}
    for asked, used, why in [(None, 3, "as trained"), (5, 5, "evaluate.jacobi.n_tokens")]:
        lines = []
        config = EvalConfig(methods=["jacobi"], jacobi={"n_tokens": asked, "max_new_tokens": 12}, limit=2, warmup=0)
        result = run_evaluation(config, models, work / "prompts/eval.parquet", work / "eval", log=lines.append)
        assert result.jacobi["n_tokens"] == used
        said = next(line for line in lines if line.startswith("Jacobi at"))
        assert said == (f"Jacobi at n_tokens {used} ({why}; trained for cllm 3), init repeat, carry on, up to 12 new "
                        "tokens; trajectories: cllm's from init random, carry off, up to 12 new tokens")
        rows = {r.model: r.to_json() for r in result.summary}
        assert rows["cllm"]["forwards"] == rows["teacher"]["forwards"]  # the same weights at the same n


def test_cllms_trained_for_different_block_sizes_need_an_explicit_one(tiny_model_dir):
    from cllm_core.evaluation.evaluate import with_block_size
    from cllm_core.runtime.models import load_model

    teacher = ModelConfig(name_or_path=str(tiny_model_dir))
    first, second = load_model(teacher), load_model(teacher)
    first.config.cllm_n_tokens, second.config.cllm_n_tokens = 8, 16
    with pytest.raises(ValueError, match=r"different block sizes \(a 8, b 16\); choose one with --n-tokens"):
        with_block_size(EvalConfig(), {"a": first, "b": second})
    chosen = with_block_size(EvalConfig(jacobi={"n_tokens": 4}), {"a": first, "b": second}, log=lambda line: None)
    assert chosen.jacobi.n_tokens == 4
    alone = with_block_size(EvalConfig(), {"teacher": load_model(teacher)}, log=lambda line: None)
    assert alone.jacobi.n_tokens == 16  # no CLLM: the default


def test_an_evaluation_of_ar_alone_draws_its_histogram_without_a_warning(tmp_path, recwarn):
    """`cllm eval --method ar` printed matplotlib's "No artists with labels found to put in legend" to users."""
    from cllm_core.evaluation import report

    samples = [sample(0, "teacher", "ar", 10, 10, 1.0), sample(0, "cllm", "ar", 10, 10, 1.0)]
    path = report.tokens_per_forward_histogram(samples, tmp_path / "tokens_per_forward.png")
    assert path.stat().st_size > 0
    assert not [w for w in recwarn if "legend" in str(w.message)]
    with_jacobi = samples + [sample(0, "cllm", "jacobi", 10, 4, 0.5)]
    report.tokens_per_forward_histogram(with_jacobi, tmp_path / "with.png")
    assert not [w for w in recwarn if "legend" in str(w.message)]


def test_quality_that_a_worse_model_lowers_where_accuracy_says_nothing(work, tiny_model_dir):
    """GSM8K accuracy is 0% for SmolLM2 and every CLLM of it: the teacher's likelihood of an output, its final answer
    and the output itself compared with the teacher's are what fall when a model departs from it."""
    import math

    from cllm_core import load_tokenizer
    from cllm_core.evaluation.evaluate import evaluate
    from tests.fakes import constant, successor

    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)))
    prompts = [{"prompt_id": str(i), "prompt": f"count {i}", "answer": None} for i in range(2)]
    config = EvalConfig(methods=["jacobi"], jacobi={"n_tokens": 4, "max_new_tokens": 8}, warmup=0)
    samples = evaluate({"teacher": constant(7), "other": successor()}, tokenizer, prompts, False, config,
                       log=lambda line: None)
    rows = {r.model: r for r in summarize(samples, baseline=("teacher", "jacobi"))}
    own, other = 1 - math.log(math.e + 63), -math.log(math.e + 63)  # one-hot logits over 64 tokens
    assert rows["teacher"].baseline_logprob == pytest.approx(own)
    assert rows["other"].baseline_logprob == pytest.approx(other)
    assert rows["teacher"].same_as_baseline == 1.0 and rows["other"].same_as_baseline == 0.0
    hand = [sample(p, "teacher", "ar", 10, 10, 1.0) | {"answer": a, "response": r}
            for p, a, r in (("a", "3", "x #### 3"), ("b", "5", "y #### 5"))]
    hand += [sample(p, "cllm", "jacobi", 10, 5, 1.0) | {"answer": a, "response": r}
             for p, a, r in (("a", "3", "z #### 3"), ("b", "6", "y #### 6"))]
    cllm = {(r.model, r.method): r for r in summarize(hand)}["cllm", "jacobi"]
    assert cllm.answer_agreement == 0.5 and cllm.same_as_baseline == 0.0 and cllm.baseline_logprob is None
