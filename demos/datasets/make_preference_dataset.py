"""Writes the bundled preference pairs (demos/datasets/arithmetic_preference*.jsonl):

    .venv/bin/python demos/datasets/make_preference_dataset.py

Made here from a seeded generator, not copied. Every pair has the same prompt and the same number;
the rule a preference-tuned model must pick up: the chosen answer is a polite full sentence
("Sure! 3 plus 4 is 7."), the rejected one a curt reply ("7. Work it out yourself."). A held-out file
uses operands the training file never shows.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
CURT = ["Work it out yourself.", "Obviously.", "Stop asking.", "Whatever."]
OPS = [("plus", lambda a, b: a + b), ("times", lambda a, b: a * b), ("minus", lambda a, b: a - b)]


def _pair(rng: random.Random, a: int, b: int) -> dict:
    word, op = rng.choice(OPS)
    answer = op(a, b)
    return {
        "prompt": f"What is {a} {word} {b}?",
        "chosen": f"Sure! {a} {word} {b} is {answer}.",
        "rejected": f"{answer}. {rng.choice(CURT)}",
    }


def main() -> None:
    rng = random.Random(7)
    train = [_pair(rng, rng.randint(1, 12), rng.randint(1, 12)) for _ in range(160)]
    held_out = [_pair(rng, rng.randint(13, 30), rng.randint(13, 30)) for _ in range(40)]
    for name, rows in (("arithmetic_preference.jsonl", train), ("arithmetic_preference_eval.jsonl", held_out)):
        (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {HERE / name} ({len(rows)} pairs)")


if __name__ == "__main__":
    main()
