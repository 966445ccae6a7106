"""Writes the bundled GRPO demo prompts (run from the repo: python src/lorakit/data/make_grpo_data.py).

Small arithmetic with a verifiable answer: "What is 17 + 25?" asking for the number inside <answer></answer> tags.
The `answer` column is what the exact_answer reward compares with. Training and held-out prompts use disjoint
(a, op, b) triples. Conversational rows ({"prompt": [user message], "answer": "42"}).
"""

import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
INSTRUCTION = "Give the result inside <answer></answer> tags, for example <answer>7</answer>."


def rows(seed: int = 0) -> list[dict]:
    triples = [(a, op, b) for a in range(2, 40) for b in range(2, 40) for op in "+-" if op == "+" or a > b]
    random.Random(seed).shuffle(triples)
    out = []
    for a, op, b in triples:
        result = a + b if op == "+" else a - b
        out.append({"prompt": [{"role": "user", "content": f"What is {a} {op} {b}? {INSTRUCTION}"}],
                    "answer": str(result)})
    return out


def write(path: str, items: list[dict]) -> None:
    with open(path, "w") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")


if __name__ == "__main__":
    everything = rows()
    write(os.path.join(HERE, "grpo_arithmetic.jsonl"), everything[:600])
    write(os.path.join(HERE, "grpo_arithmetic_eval.jsonl"), everything[600:650])
