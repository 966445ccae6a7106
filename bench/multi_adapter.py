"""Mixed-adapter batch generation on SmolLM2-135M: lorakit vs PEFT's `adapter_names`, one run.

    python bench/multi_adapter.py [--adapters 8] [--new-tokens 32] [--rounds 3] [--json out.json] [--device cpu|cuda]

8 LoRA adapters (r=16 on q,k,v,o,gate,up,down, random weights), one batch of 8 prompts with a
different adapter per row, greedy decoding with the KV cache. Both libraries hold the same
weights; the table shows generated tokens/s (median of interleaved rounds) and whether both
produce the same tokens. Rows: fp32 (how a PEFT user runs it) and a bf16 base for both libraries
(lorakit computes its mixed-batch update in fp32 there, PEFT in bf16), plus the base model alone with no adapters —
the ceiling for any LoRA implementation on the same weights.
"""

import argparse
import copy
import json

import peft
import torch
from common import LORA, copy_lora_weights, machine_name, median_rates, paired_models, randomize_lora_B

import lorakit
from lorakit.models.loading import load_model


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    base = load_model("smollm2-135m", device=args.device)
    names = [f"a{i}" for i in range(args.adapters)]
    ours, theirs = paired_models(base, names[0])
    for name in names[1:]:
        ours.add_adapter(name, lorakit.LoraConfig(**LORA))
        theirs.add_adapter(name, peft.LoraConfig(**LORA))
    randomize_lora_B(ours, std=0.02)
    copy_lora_weights(ours, theirs)
    ours.eval()
    theirs.eval()
    ours16, theirs16 = (copy.deepcopy(m).to(torch.bfloat16) for m in (ours, theirs))
    base = base.eval()
    prompts = torch.randint(0, base.config.vocab_size, (len(names), 24)).to(args.device)
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0,
              attention_mask=torch.ones_like(prompts))
    runs = {"lorakit": lambda: ours.generate(input_ids=prompts, adapter_names=names, **kw),
            "PEFT": lambda: theirs.generate(input_ids=prompts, adapter_names=names, **kw),
            "lorakit bf16": lambda: ours16.generate(input_ids=prompts, adapter_names=names, **kw),
            "PEFT bf16": lambda: theirs16.generate(input_ids=prompts, adapter_names=names, **kw),
            "base alone": lambda: base.generate(input_ids=prompts, **kw)}
    med, outs = median_rates(runs, args.rounds, len(names) * args.new_tokens)
    print(f"\nmixed batch: {len(names)} rows, {len(names)} adapters (r=16, 7 modules), 24-token prompts + "
          f"{args.new_tokens} new tokens, greedy; {machine_name(args.device)}")
    print(f"| {'':<13} | tokens/s | x PEFT fp32 |\n|---|---:|---:|")
    for k in runs:
        print(f"| {k:<13} | {med[k]:8.1f} | {med[k] / med['PEFT']:10.2f} |")
    same = {"fp32": torch.equal(outs["lorakit"], outs["PEFT"]),
            "bf16": torch.equal(outs["lorakit bf16"], outs["PEFT bf16"])}
    print(f"same tokens as PEFT: fp32 {same['fp32']}, bf16 {same['bf16']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tokens_per_s": med, "ratio": med["lorakit"] / med["PEFT"],
                       "ratio_bf16_vs_peft_fp32": med["lorakit bf16"] / med["PEFT"],
                       "ratio_bf16_vs_peft_bf16": med["lorakit bf16"] / med["PEFT bf16"], "same_tokens": same},
                      f, indent=2)


if __name__ == "__main__":
    main()
