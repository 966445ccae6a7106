"""TRL's DPOTrainer on a PEFT model with `ref_model=None` (the reference is the model with its adapter
disabled), as TRL's documentation writes it, running on lorakit.

    python examples/trl_dpo.py [OUT_DIR]        (about 1.5 minutes on 2 CPU cores)

After `lorakit.install_as_peft()` the script is a PEFT + TRL script. The model is the embedded SmolLM2-135M-Instruct,
the data lorakit's demo preference pairs (the house-style answer chosen, a plain one rejected). TRL sees a PEFT
model, so it disables the adapter for the reference log-probabilities instead of loading a second model.
"""

import lorakit

lorakit.install_as_peft()  # before trl / transformers' Trainer are imported

import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import torch  # noqa: E402
from datasets import load_dataset  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from lorakit.hardware import fast_bf16  # noqa: E402
from lorakit.models.loading import resolve_model_dir  # noqa: E402
from lorakit.train.config import PACKAGE_DATA  # noqa: E402


# bf16 where bf16 products measured faster than fp32 on this machine: TRL's configs turn bf16 autocast on by default,
# and on a CPU without fast bf16 (AVX2-only EPYC: 1.2 vs 163 GFLOP/s) a step then takes ~50x longer
DTYPE = torch.bfloat16 if fast_bf16() else torch.float32


def main(output_dir):
    model_dir = resolve_model_dir("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPE)
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    dataset = load_dataset("json", data_files=os.path.join(PACKAGE_DATA, "demo_preferences.jsonl"), split="train")
    args = DPOConfig(output_dir=output_dir, max_steps=12, per_device_train_batch_size=4, learning_rate=5e-4,
                     beta=0.1, max_length=160, logging_steps=3, save_strategy="no", report_to=[], use_cpu=True,
                     bf16=DTYPE is torch.bfloat16,
                     seed=0)
    trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=dataset, processing_class=tokenizer)
    print("model class:", type(trainer.model).__module__, type(trainer.model).__name__,
          "| reference model loaded:", trainer.ref_model is not None)
    trainer.train()
    rewards = [(h["rewards/chosen"], h["rewards/rejected"]) for h in trainer.state.log_history if "rewards/chosen" in h]
    for chosen, rejected in rewards:
        print(f"reward chosen {chosen:+.3f}  rejected {rejected:+.3f}  margin {chosen - rejected:+.3f}")
    trainer.save_model(output_dir)
    print("saved PEFT adapter to", output_dir)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="trl_dpo_"))
