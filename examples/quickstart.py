"""lorakit in one screen: adapt the embedded SmolLM2-135M-Instruct, save, reload, merge.

Run with `make demo` (or `python examples/quickstart.py [OUT_DIR]`).
"""

import os
import sys
import tempfile

import torch

from lorakit import LoraConfig, PeftModel, get_peft_model, load_model, load_tokenizer


def main(out_dir: str) -> None:
    torch.manual_seed(0)
    tokenizer = load_tokenizer("smollm2-135m")
    model = get_peft_model(load_model("smollm2-135m"), LoraConfig(
        r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.05))
    model.print_trainable_parameters()

    # A fresh adapter is the identity (B = 0); give B small values so the checks below mean something.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    adapter_dir = os.path.join(out_dir, "adapter")
    model.save_pretrained(adapter_dir)

    reloaded = PeftModel.from_pretrained(load_model("smollm2-135m"), adapter_dir)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is LoRA?"}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        original = model(input_ids=ids).logits
        unmerged = reloaded(input_ids=ids).logits
        reloaded.merge_adapter()
        merged = reloaded(input_ids=ids).logits
    print(f"saved -> reloaded logits, max |diff|: {(unmerged - original).abs().max().item():.2e}")
    print(f"merged vs unmerged logits, max |diff|: {(merged - unmerged).abs().max().item():.2e}")

    adapter_bytes = os.path.getsize(os.path.join(adapter_dir, "adapter_model.safetensors"))
    base_bytes = sum(p.numel() * p.element_size() for p in reloaded.get_base_model().parameters())
    print(f"adapter file: {adapter_bytes:,} bytes; base model weights: {base_bytes:,} bytes "
          f"({100 * adapter_bytes / base_bytes:.2f} %)")
    print(f"adapter written to {adapter_dir}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="lorakit-quickstart-"))
