"""Seeded generator of GSM8K-style arithmetic word problems: the demo domain (preset `synthetic-math`).

Each problem has 2-4 reasoning steps over small numbers; the answer is one worked line per step,
`a op b = c`, then `#### N` (the GSM8K convention). Train and eval come from disjoint seeds.
"""

from __future__ import annotations

import random
from collections.abc import Callable

NAMES = ["Ava", "Ben", "Chloe", "Diego", "Emma", "Farid", "Grace", "Hugo", "Isla", "Jamal", "Kira", "Liam",
         "Maya", "Noah", "Olga", "Priya", "Quinn", "Rosa", "Sam", "Tariq"]
THINGS = ["apples", "marbles", "stickers", "pencils", "cookies", "shells", "cards", "stamps", "books", "beads"]
PLANTS = ["tulips", "carrots", "roses", "tomatoes", "sunflowers"]
TRAIN_SEED, EVAL_SEED = 1234, 987654321


def _change(r: random.Random) -> tuple[str, list[tuple[int, str, int]]]:
    name, friend, thing = *r.sample(NAMES, 2), r.choice(THINGS)
    a, b = r.randint(5, 60), r.randint(2, 40)
    c = r.randint(1, a + b)
    return (f"{name} has {a} {thing}. {name} buys {b} more and then gives {c} to {friend}. "
            f"How many {thing} does {name} have now?", [(a, "+", b), (a + b, "-", c)])


def _boxes(r: random.Random) -> tuple[str, list[tuple[int, str, int]]]:
    name, thing = r.choice(NAMES), r.choice(THINGS)
    boxes, each, extra, friends = r.randint(2, 9), r.randint(2, 12), r.randint(1, 20), r.randint(2, 6)
    total = boxes * each + extra
    extra += (-total) % friends  # make the share whole
    total = boxes * each + extra
    question = (f"{name} has {boxes} boxes with {each} {thing} in each box and {extra} loose {thing}. "
                f"{name} shares all of them equally among {friends} friends. How many {thing} does each friend get?")
    return question, [(boxes, "*", each), (boxes * each, "+", extra), (total, "/", friends)]


def _shopping(r: random.Random) -> tuple[str, list[tuple[int, str, int]]]:
    name = r.choice(NAMES)
    a, p, b, q = r.randint(2, 6), r.randint(2, 9), r.randint(2, 6), r.randint(2, 9)
    cost = a * p + b * q
    paid = (cost // 10 + 1 + r.randint(0, 3)) * 10
    question = (f"{name} buys {a} notebooks at ${p} each and {b} pens at ${q} each. {name} pays with ${paid}. "
                f"How much change does {name} get?")
    return question, [(a, "*", p), (b, "*", q), (a * p, "+", b * q), (paid, "-", cost)]


def _trip(r: random.Random) -> tuple[str, list[tuple[int, str, int]]]:
    name = r.choice(NAMES)
    speed, hours, more = r.randint(20, 90), r.randint(2, 5), r.randint(5, 60)
    question = (f"{name} drives at {speed} km per hour for {hours} hours and then drives {more} km more. "
                f"How many km does {name} drive in total?")
    return question, [(speed, "*", hours), (speed * hours, "+", more)]


def _savings(r: random.Random) -> tuple[str, list[tuple[int, str, int]]]:
    name, friend = r.sample(NAMES, 2)
    weekly, weeks = r.randint(3, 25), r.randint(2, 8)
    gift = r.randint(1, weekly * weeks)
    question = (f"{name} saves ${weekly} every week for {weeks} weeks and then spends ${gift} on a gift for "
                f"{friend}. How many dollars does {name} have left?")
    return question, [(weekly, "*", weeks), (weekly * weeks, "-", gift)]


def _garden(r: random.Random) -> tuple[str, list[tuple[int, str, int]]]:
    name, plant = r.choice(NAMES), r.choice(PLANTS)
    rows, per_row, new = r.randint(2, 9), r.randint(3, 12), r.randint(1, 15)
    dead = r.randint(1, rows * per_row - 1)
    question = (f"{name} plants {rows} rows of {per_row} {plant}. {dead} of them die, and {name} plants {new} more. "
                f"How many {plant} are in the garden now?")
    return question, [(rows, "*", per_row), (rows * per_row, "-", dead), (rows * per_row - dead, "+", new)]


def _ages(r: random.Random) -> tuple[str, list[tuple[int, str, int]]]:
    name, friend = r.sample(NAMES, 2)
    age, times, plus = r.randint(3, 15), r.randint(2, 4), r.randint(1, 9)
    question = (f"{name} is {age} years old. {friend} is {times} times as old as {name}, plus {plus} years. "
                f"How old is {friend}?")
    return question, [(age, "*", times), (age * times, "+", plus)]


def _school(r: random.Random) -> tuple[str, list[tuple[int, str, int]]]:
    classes, size, group = r.randint(2, 6), r.randint(15, 30), r.randint(2, 5)
    students = classes * size
    absent = r.randint(1, 9)
    absent += (students - absent) % group  # the rest split into whole groups
    question = (f"A school has {classes} classes of {size} students. {absent} students are absent today. "
                f"The others work in groups of {group}. How many groups are there?")
    return question, [(classes, "*", size), (students, "-", absent), (students - absent, "/", group)]


FAMILIES: list[Callable[[random.Random], tuple[str, list[tuple[int, str, int]]]]] = [
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
    """Train and eval sets from disjoint seeds; eval questions that also occur in train are dropped."""
    train_set = generate(train, TRAIN_SEED)
    seen = {p["question"] for p in train_set}
    return train_set, [p for p in generate(eval, EVAL_SEED) if p["question"] not in seen]
