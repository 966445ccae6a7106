"""Does the demo adapter learn the house style and keep what the base model knew?

Trains the demo (`lorakit train` defaults, with overrides), then answers greedily, base vs adapter on the same
model: the 10 held-out demo prompts (house style: greeting + signature) and a general-knowledge probe whose
questions are not in the training data, each scored by the words a right answer contains.

    python bench/demo_facts.py                       # the demo as shipped
    python bench/demo_facts.py --lr=4e-4 --epochs=1     # overrides, as `lorakit train` takes them
    python bench/demo_facts.py --data=/tmp/rows.jsonl # another training file

Prints one table row per run and appends it to bench/demo_facts.json.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

from lorakit.hardware import cpu_model
from lorakit.train.config import DEMO_PROMPTS, load_train_config
from lorakit.train.loop import train

# question -> lowercase words any right answer contains (one of each tuple)
PROBE = {
    "What is the capital of Italy?": ("rome",),
    "What is 9 times 8?": ("72", "seventy-two", "seventy two"),
    "Who wrote Pride and Prejudice?": ("austen",),
    "What is the smallest planet in our solar system?": ("mercury",),
    "What is the largest mammal?": ("whale",),
    "What is the chemical formula of water?": ("h2o", "h₂o"),
    "Who painted The Starry Night?": ("van gogh",),
    "What is the capital of Germany?": ("berlin",),
    "How many sides does a hexagon have?": ("six", "6"),
    "Who discovered penicillin?": ("fleming",),
    "Which planet is known as the Red Planet?": ("mars",),
    "What is the square root of 81?": ("nine", "9"),
    "What gas do plants absorb from the air?": ("carbon dioxide", "co2"),
    "Who was the first president of the United States?": ("washington",),
    "What is the capital of Canada?": ("ottawa",),
    "How many days are in a week?": ("seven", "7"),
}
GREETING, SIGNATURE = "welcome to brightwater", "the brightwater team"


def is_right(question: str, answer: str) -> bool:
    return any(word in answer.lower() for word in PROBE[question])


def in_house_style(answer: str) -> bool:
    text = answer.lower()
    return text.startswith(GREETING) and SIGNATURE in text


def run(overrides: list[str]) -> dict:
    with open(DEMO_PROMPTS) as f:
        held_out = [line.strip() for line in f if line.strip()]
    probe = [q for q in PROBE if q not in held_out]
    with tempfile.TemporaryDirectory() as tmp:
        prompts = os.path.join(tmp, "prompts.txt")
        with open(prompts, "w") as f:
            f.writelines(p + "\n" for p in held_out + probe)
        cfg = load_train_config(overrides=[f"--output_dir={tmp}/run", f"--prompts={prompts}"] + overrides)
        start = time.perf_counter()
        summary = train(cfg)
        seconds = time.perf_counter() - start
    answers = dict(zip(summary["prompts"], zip(summary["before"], summary["after"])))
    questions = [q for q in answers if q in PROBE]
    base_right = [q for q in questions if is_right(q, answers[q][0])]
    return {
        "overrides": " ".join(overrides) or "(demo as shipped)", "cpu": cpu_model(),
        "house_style": sum(in_house_style(answers[p][1]) for p in held_out), "held_out": len(held_out),
        "probe": len(questions), "base_right": len(base_right),
        "after_right": sum(is_right(q, answers[q][1]) for q in questions),
        "kept": sum(is_right(q, answers[q][1]) for q in base_right),
        "lost": [q for q in base_right if not is_right(q, answers[q][1])],
        "seconds": round(seconds, 1), "answers": answers,
    }


def main() -> None:
    result = run(sys.argv[1:])
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_facts.json")
    results = json.load(open(path)) if os.path.exists(path) else []
    json.dump(results + [result], open(path, "w"), indent=1, ensure_ascii=False)
    print("| settings | held-out in house style | probe: base right | after right | base-right kept | lost |")
    print("|---|---|---|---|---|---|")
    for r in results + [result]:
        print(f"| {r['overrides']} | {r['house_style']}/{r['held_out']} | {r['base_right']}/{r['probe']} | "
              f"{r['after_right']}/{r['probe']} | {r['kept']}/{r['base_right']} | {'; '.join(r['lost'])} |")


if __name__ == "__main__":
    main()
