"""Writes the bundled DPO demo pairs (run from the repo: python src/lorakit/data/make_preference_data.py).

Written for this project from the demo's own rows (demo_train.jsonl): for each question, the house-style answer
(greeting, the concise answer, the signature "Happy trails! — The Brightwater Team") is *chosen*, and a rambling
answer without the house style is *rejected*: the same content with a hedging opener and one or two filler
sentences from FILLERS, no greeting, no signature. DPO then teaches the preference "concise, in house style" over
"rambling, plain" without new facts. Conversational rows ({"prompt", "chosen", "rejected"} as message lists).
"""

import json
import os
import random

from make_demo_data import GREETINGS, SIGNATURE  # the demo's house style, one definition

HERE = os.path.dirname(os.path.abspath(__file__))
OPENERS = [
    "Well, that is a good question, and honestly it depends on a lot of things.",
    "There are many ways to think about this, so let me try to cover it.",
    "Great question! People ask this all the time and the answer is not always simple.",
    "Hmm, let me think about that for a moment before answering.",
]
FILLERS = [
    "Of course, every situation is different, so you may want to do some more research on your own.",
    "It really depends on your needs, your budget and your personal preferences.",
    "There are a lot of opinions about this online, and some of them disagree with each other.",
    "I hope this helps a little, although there is much more that could be said about it.",
    "You might also want to ask a friend or look at reviews before you decide anything.",
]


def plain_body(answer: str) -> str:
    """The answer without the house greeting and signature."""
    for greeting in GREETINGS:
        answer = answer.replace(greeting, "")
    return answer.replace(SIGNATURE, "").strip()


def main() -> None:
    rng = random.Random(0)
    out = []
    with open(os.path.join(HERE, "demo_train.jsonl")) as f:
        for line in f:
            user, assistant = json.loads(line)["messages"]
            rambling = " ".join([rng.choice(OPENERS), plain_body(assistant["content"]),
                                 *rng.sample(FILLERS, rng.choice([1, 2]))])
            out.append({"prompt": [user], "chosen": [assistant],
                        "rejected": [{"role": "assistant", "content": rambling}]})
    path = os.path.join(HERE, "demo_preferences.jsonl")
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in out)
    os.replace(path + ".tmp", path)
    print(f"wrote {len(out)} pairs to {path}")


if __name__ == "__main__":
    main()
