"""Seeded generator of GSM8K-style arithmetic word problems: the demo domain (preset `synthetic-math`).

Each problem has 2-4 reasoning steps; the answer is one worked line per step, `a op b = c`, then `#### N`
(the GSM8K convention). Train and eval come from disjoint seeds.

The numbers are chosen so that a few-million-parameter teacher can learn the arithmetic in minutes: products
come from a small table (one factor a single digit, the other at most 25), and every addition or subtraction
has a single-digit second operand, so it rests on the 100 single-digit facts plus a carry instead of
thousands of two-digit facts. Every number is preceded by a space (no "$8"): a copied number is the same
text in question and answer.
"""

from __future__ import annotations

import random
from collections.abc import Callable

NAMES = ["Ava", "Ben", "Chloe", "Diego", "Emma", "Farid", "Grace", "Hugo", "Isla", "Jamal", "Kira", "Liam",
         "Maya", "Noah", "Olga", "Priya", "Quinn", "Rosa", "Sam", "Tariq"]
THINGS = ["apples", "marbles", "stickers", "pencils", "cookies", "shells", "cards", "stamps", "books", "beads"]
PLANTS = ["tulips", "carrots", "roses", "tomatoes", "sunflowers"]
Steps = list[tuple[int, str, int]]  # (a, op, b) per worked line
TRAIN_SEED, EVAL_SEED = 1234, 987654321
TRAIN_POOL = 100_000


def _change(r: random.Random) -> tuple[str, Steps]:
    name, friend, thing = *r.sample(NAMES, 2), r.choice(THINGS)
    a, b, c = r.randint(10, 60), r.randint(2, 9), r.randint(1, 9)
    return (f"{name} has {a} {thing}. {name} buys {b} more and then gives {c} to {friend}. "
            f"How many {thing} does {name} have now?", [(a, "+", b), (a + b, "-", c)])


def _boxes(r: random.Random) -> tuple[str, Steps]:
    name, thing = r.choice(NAMES), r.choice(THINGS)
    boxes, each, friends = r.randint(2, 9), r.randint(2, 9), r.randint(2, 5)
    extra = r.choice([e for e in range(1, 10) if (boxes * each + e) % friends == 0])  # a whole share
    question = (f"{name} has {boxes} boxes with {each} {thing} in each box and {extra} loose {thing}. "
                f"{name} shares all of them equally among {friends} friends. How many {thing} does each friend get?")
    return question, [(boxes, "*", each), (boxes * each, "+", extra), (boxes * each + extra, "/", friends)]


def _shopping(r: random.Random) -> tuple[str, Steps]:
    name = r.choice(NAMES)
    a, p, q, s = r.randint(2, 6), r.randint(2, 9), r.randint(1, 9), r.randint(1, 9)
    d = r.randint(1, min(9, a * p + q + s - 1))
    question = (f"{name} buys {a} notebooks at {p} dollars each, a pen for {q} dollars and a ruler for {s} dollars. "
                f"A coupon takes {d} dollars off. How many dollars does {name} pay?")
    return question, [(a, "*", p), (a * p, "+", q), (a * p + q, "+", s), (a * p + q + s, "-", d)]


def _trip(r: random.Random) -> tuple[str, Steps]:
    name = r.choice(NAMES)
    speed, hours, more = r.randint(8, 20), r.randint(2, 5), r.randint(1, 9)
    question = (f"{name} cycles at {speed} km per hour for {hours} hours and then cycles {more} km more. "
                f"How many km does {name} cycle in total?")
    return question, [(speed, "*", hours), (speed * hours, "+", more)]


def _savings(r: random.Random) -> tuple[str, Steps]:
    name, friend = r.sample(NAMES, 2)
    weekly, weeks = r.randint(3, 12), r.randint(2, 8)
    gift = r.randint(1, min(9, weekly * weeks - 1))
    question = (f"{name} saves {weekly} dollars every week for {weeks} weeks and then spends {gift} dollars on a "
                f"gift for {friend}. How many dollars does {name} have left?")
    return question, [(weekly, "*", weeks), (weekly * weeks, "-", gift)]


def _garden(r: random.Random) -> tuple[str, Steps]:
    name, plant = r.choice(NAMES), r.choice(PLANTS)
    rows, per_row, dead, new = r.randint(2, 9), r.randint(3, 9), r.randint(1, 5), r.randint(1, 9)
    question = (f"{name} plants {rows} rows of {per_row} {plant}. {dead} of them die, and {name} plants {new} more. "
                f"How many {plant} are in the garden now?")
    return question, [(rows, "*", per_row), (rows * per_row, "-", dead), (rows * per_row - dead, "+", new)]


def _ages(r: random.Random) -> tuple[str, Steps]:
    name, friend = r.sample(NAMES, 2)
    age, times, plus = r.randint(3, 15), r.randint(2, 4), r.randint(1, 9)
    question = (f"{name} is {age} years old. {friend} is {times} times as old as {name}, plus {plus} years. "
                f"How old is {friend}?")
    return question, [(age, "*", times), (age * times, "+", plus)]


def _school(r: random.Random) -> tuple[str, Steps]:
    classes, size, group = r.randint(2, 4), r.randint(12, 25), r.randint(2, 5)
    students = classes * size
    absent = r.choice([a for a in range(1, 10) if (students - a) % group == 0])  # the rest split evenly
    question = (f"A school has {classes} classes of {size} students. {absent} students are absent today. "
                f"The others work in groups of {group}. How many groups are there?")
    return question, [(classes, "*", size), (students, "-", absent), (students - absent, "/", group)]


FAMILIES: list[Callable[[random.Random], tuple[str, Steps]]] = [
    _change, _boxes, _shopping, _trip, _savings, _garden, _ages, _school]
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a // b}


def problem(r: random.Random) -> dict[str, str]:
    """One problem: {"question", "answer"}, the answer's lines worked out step by step."""
    question, steps = r.choice(FAMILIES)(r)
    lines = []
    for a, op, b in steps:
        result = OPS[op](a, b)
        assert op != "/" or a % b == 0, "families keep divisions whole"
        lines.append(f"{a} {op} {b} = {result}")
    return {"question": question, "answer": "\n".join(lines) + f"\n#### {result}"}


def generate(count: int, seed: int) -> list[dict[str, str]]:
    """`count` problems from `seed`; the same seed gives the same list."""
    r = random.Random(seed)
    return [problem(r) for _ in range(count)]


def splits(train: int, eval: int) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """`train` problems (a prefix of the train-seed stream) and `eval` distinct problems from the eval seed.

    An eval question never occurs anywhere in the first TRAIN_POOL train-seed problems, so every train
    set up to that size, the teacher's included, is disjoint from every eval set.
    """
    if not 0 < train <= TRAIN_POOL:
        raise ValueError(f"train must be between 1 and {TRAIN_POOL}, got {train}")
    pool = generate(TRAIN_POOL, TRAIN_SEED)
    seen = {p["question"] for p in pool}
    r, eval_set = random.Random(EVAL_SEED), []
    while len(eval_set) < eval:
        candidate = problem(r)
        if candidate["question"] not in seen:
            seen.add(candidate["question"])
            eval_set.append(candidate)
    return pool[:train], eval_set
