"""Does the demo adapter learn the house style and keep what the base model knew?

Trains the demo (`lorakit train` defaults, with overrides), then answers greedily, base vs adapter on the same
model: the 10 held-out demo prompts (house style: greeting + signature) and a general-knowledge probe whose
questions are not in the training data, each scored by the words a right answer contains.

    python bench/demo_facts.py                       # the demo as shipped
    python bench/demo_facts.py --lr=4e-4 --epochs=1     # overrides, as `lorakit train` takes them
    python bench/demo_facts.py --data=/tmp/rows.jsonl # another training file
    python bench/demo_facts.py --greeting-ceiling     # no training: the base model made to open with each greeting

The greeting ceiling answers the probe with the frozen base model after the assistant turn has been started with
one of the demo's greetings (and with alternatives): how many of its own right answers the base model keeps once
an answer opens in the house style, which bounds what an adapter that teaches that opening can be expected to keep.

Prints one table row per run and appends it to bench/demo_facts.json (--greeting-ceiling: a table, written to
bench/demo_greeting_ceiling.json).
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


CANDIDATE_GREETINGS = ["Welcome to Brightwater Outfitters!", "Welcome to Brightwater Outfitters! Great question.",
                       "Welcome to Brightwater Outfitters! Happy to help. Here is the answer."]


def greeting_ceiling(max_new_tokens: int = 64) -> list[dict]:
    """The frozen base model's probe answers with the assistant turn started by each greeting (greedy)."""
    import torch

    sys.path.insert(0, os.path.dirname(DEMO_PROMPTS))  # the demo data's generator: its greetings, one definition
    from make_demo_data import GREETINGS

    from lorakit.chat import render_prompt
    from lorakit.models.loading import load_model, load_tokenizer

    tokenizer, model = load_tokenizer("smollm2-135m"), load_model("smollm2-135m", dtype=torch.float32).eval()
    rows, base = [], None
    for greeting in [""] + GREETINGS + CANDIDATE_GREETINGS:
        right = []
        for question in PROBE:
            text = render_prompt([{"role": "user", "content": question}], tokenizer) + (greeting + " " if greeting else "")
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                     do_sample=False, pad_token_id=tokenizer.pad_token_id)
            right.append(is_right(question, tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)))
        base = base or right
        rows.append({"greeting": greeting or "(none: the base model's own answer)", "right": sum(right),
                     "kept": sum(a and b for a, b in zip(base, right)), "base_right": sum(base),
                     "lost": [q for q, a, b in zip(PROBE, base, right) if a and not b]})
        print(f"| {rows[-1]['greeting']} | {sum(right)}/{len(PROBE)} | {rows[-1]['kept']}/{sum(base)} | "
              f"{'; '.join(rows[-1]['lost'])} |", flush=True)
    return rows


def main() -> None:
    if sys.argv[1:] == ["--greeting-ceiling"]:
        print("| assistant turn opened with | probe right | base-right kept | lost |\n|---|---|---|---|")
        rows = greeting_ceiling()
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_greeting_ceiling.json")
        json.dump({"cpu": cpu_model(), "rows": rows}, open(path, "w"), indent=1, ensure_ascii=False)
        return
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
