"""Generation speed (greedy, KV cache) on SmolLM2-135M: base vs merged vs unmerged, lorakit and PEFT.

    python bench/generate.py [--new-tokens 64] [--rounds 5] [--json out.json] [--device cpu|cuda]

Interleaved rounds; the table shows the median tokens/s of each setup.
"""

import argparse
import copy
import json

import torch
from common import copy_lora_weights, machine_name, median_rates, paired_models, randomize_lora_B

from lorakit.models.loading import load_model


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    base = load_model("smollm2-135m", device=args.device)
    ours, theirs = paired_models(base)
    randomize_lora_B(ours, std=0.01)
    copy_lora_weights(ours, theirs)
    ours_merged = copy.deepcopy(ours)
    ours_merged.merge_adapter()
    models = {"base model": base, "lorakit merged": ours_merged, "lorakit unmerged": ours,
              "PEFT unmerged": theirs.eval()}
    prompt = torch.randint(0, base.config.vocab_size, (args.batch, 32)).to(args.device)
    kw = dict(attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=args.new_tokens,
              min_new_tokens=args.new_tokens, pad_token_id=0)
    runs = {name: (lambda m=model: m.generate(input_ids=prompt, **kw)) for name, model in models.items()}
    med, outputs = median_rates(runs, args.rounds, args.batch * args.new_tokens)
    print(f"\ngreedy generation, batch {args.batch}, 32-token prompt + {args.new_tokens} new tokens, fp32; "
          f"{machine_name(args.device)}")
    print(f"{'setup':<20}{'tokens/s':>10}{'vs base':>10}")
    for name in runs:
        print(f"{name:<20}{med[name]:>10.1f}{med[name] / med['base model']:>10.2f}")
    print(f"lorakit unmerged / PEFT unmerged: {med['lorakit unmerged'] / med['PEFT unmerged']:.2f}; "
          f"same tokens: {torch.equal(outputs['lorakit unmerged'], outputs['PEFT unmerged'])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tokens_per_s": med}, f, indent=2)


if __name__ == "__main__":
    main()
