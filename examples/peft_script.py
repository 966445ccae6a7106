"""A fine-tuning script written the way PEFT's documentation writes one. It runs unchanged on lorakit;
swap the import line for `from peft import ...` and it prints the same numbers
(tests/test_peft_parity.py runs it both ways and compares).

    python examples/peft_script.py [OUT_DIR]
"""

import sys
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit import LoraConfig, PeftModel, TaskType, get_peft_model, get_peft_model_state_dict


def base_model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def main(output_dir):
    peft_config = LoraConfig(task_type=TaskType.CAUSAL_LM, inference_mode=False, r=8, lora_alpha=32,
                             lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(base_model(), peft_config)
    model.print_trainable_parameters()
    print("model class:", type(model).__name__)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    input_ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    model.train()
    for step in range(5):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"step {step} loss {loss.item():.5f}")

    state = get_peft_model_state_dict(model)
    print("adapter tensors:", len(state), "first key:", sorted(state)[0])
    model.save_pretrained(output_dir)

    inference_model = PeftModel.from_pretrained(base_model(), output_dir)
    print("training after from_pretrained:", inference_model.training)
    with torch.no_grad():
        logits = inference_model(input_ids=input_ids).logits
        print(f"adapter logits sum {logits.sum().item():.3f}")
        merged = inference_model.merge_and_unload()
        print(f"merged logits sum {merged(input_ids=input_ids).logits.sum().item():.3f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
