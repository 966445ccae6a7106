"""TRL's SFTTrainer with a PEFT LoraConfig, as TRL's documentation writes it, running on lorakit.

    python examples/trl_sft.py [OUT_DIR]        (about 1.5 minutes on 2 CPU cores)

The first line is the only change from a PEFT script: after `lorakit.install_as_peft()`, `import peft` (here and
inside trl / transformers) is lorakit. The model is the embedded SmolLM2-135M-Instruct, the data lorakit's demo
rows (a shop's house style: a greeting and the signature "Happy trails! — The Brightwater Team"). The saved
folder is a PEFT adapter: it loads with `peft.PeftModel.from_pretrained` in the real peft too.
"""

import lorakit

lorakit.install_as_peft()  # before trl / transformers' Trainer are imported

import sys  # noqa: E402
import tempfile  # noqa: E402

import torch  # noqa: E402
from datasets import load_dataset  # noqa: E402
from peft import LoraConfig, PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from lorakit.hardware import fast_bf16  # noqa: E402
from lorakit.models.loading import resolve_model_dir  # noqa: E402
from lorakit.train.config import DEMO_DATA  # noqa: E402

QUESTIONS = ["Do you sell fishing rods?", "What is the capital of Italy?"]


def answer(model, tokenizer, question):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=40, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


# bf16 where bf16 products measured faster than fp32 on this machine: TRL's configs turn bf16 autocast on by default,
# and on a CPU without fast bf16 (AVX2-only EPYC: 1.2 vs 163 GFLOP/s) a step then takes ~50x longer
DTYPE = torch.bfloat16 if fast_bf16() else torch.float32


def main(output_dir):
    model_dir = resolve_model_dir("smollm2-135m")  # the embedded model, dequantized once into ~/.cache/lorakit
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPE)
    dataset = load_dataset("json", data_files=str(DEMO_DATA), split="train")
    args = SFTConfig(output_dir=output_dir, max_steps=20, per_device_train_batch_size=8, learning_rate=1e-3,
                     logging_steps=5, save_strategy="no", report_to=[], use_cpu=True,
                     bf16=DTYPE is torch.bfloat16, seed=0)
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"])
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config)
    print("model class:", type(trainer.model).__module__, type(trainer.model).__name__)
    trainer.model.print_trainable_parameters()
    trainer.train()
    trainer.save_model(output_dir)

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPE),
                                         output_dir).eval()
    for question in QUESTIONS:
        with reloaded.disable_adapter():
            before = answer(reloaded, tokenizer, question)
        print(f"> {question}\n  base:    {before}\n  adapter: {answer(reloaded, tokenizer, question)}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="trl_sft_"))
