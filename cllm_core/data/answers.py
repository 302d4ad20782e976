"""Final-answer extraction for math tasks, GSM8K convention: the number after `####`."""

from __future__ import annotations

import re

_FINAL = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")


def extract_answer(text: str) -> str | None:
    """The number after the first `####`, normalised: commas and a trailing period or zeros dropped.

    `#### 1,234.` -> "1234", `#### $5.50` -> "5.5", no marker -> None.
    """
    match = _FINAL.search(text)
    if match is None:
        return None
    number = match.group(1).replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    return number.lstrip("+") or "0"


def is_correct(output: str, reference: str) -> bool:
    """Whether the model's final answer equals the reference's (both by `extract_answer`)."""
    got = extract_answer(output)
    return got is not None and got == extract_answer(reference)


def exact_match(output: str, reference: str) -> bool:
    """Whether the output is the reference text, up to surrounding whitespace (SQL, code, short answers)."""
    return output.strip() == reference.strip()


CHECKS = {"math": is_correct, "exact": exact_match}
"""How an output is judged against the dataset's answer, by name (`EvalConfig.check`)."""
