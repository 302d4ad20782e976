"""The demo domain: seeded GSM8K-style problems whose worked answers are right."""

import re

import pytest

from data.synthetic_math import FAMILIES, OPS, TRAIN_POOL, TRAIN_SEED, generate, splits


def test_same_seed_same_problems_other_seed_other_problems():
    assert generate(50, 7) == generate(50, 7)
    assert generate(50, 7) != generate(50, 8)


def test_every_answer_is_worked_correctly_in_two_to_four_steps_ending_with_the_gsm8k_marker():
    for item in generate(2000, 3):
        *lines, final = item["answer"].split("\n")
        assert 2 <= len(lines) <= 4
        results = []
        for line in lines:
            a, op, b, result = re.fullmatch(r"(\d+) ([-+*/]) (\d+) = (-?\d+)", line).groups()
            assert OPS[op](int(a), int(b)) == int(result) and int(result) >= 0
            assert op != "/" or int(a) % int(b) == 0
            results.append(int(result))
        assert final == f"#### {results[-1]}"


def test_problems_vary_across_families_and_names():
    items = generate(400, 5)
    assert len({item["question"].split(" ")[0] for item in items}) > 10
    assert len({item["question"] for item in items}) > 390
    assert len(FAMILIES) == 8


@pytest.mark.slow  # draws the whole train pool
def test_eval_split_is_disjoint_from_the_whole_train_pool_and_has_distinct_questions():
    train, eval_ = splits(3000, 300)
    assert len(train) == 3000 and len(eval_) == 300
    pool = {p["question"] for p in generate(TRAIN_POOL, TRAIN_SEED)}
    assert not pool & {p["question"] for p in eval_}
    assert len({p["question"] for p in eval_}) == 300
    assert splits(10, 5)[1] == eval_[:5]
