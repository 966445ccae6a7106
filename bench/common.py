"""Shared set-up for the benchmarks: the same adapter weights in lorakit and PEFT."""

import torch


def randomize_lora_B(model, std):
    """Fresh adapters are the identity (B = 0); give B values so the adapter path does real work."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=std)


def copy_lora_weights(ours, theirs):
    """Load lorakit's adapter weights into a PEFT model holding the same adapters."""
    result = theirs.load_state_dict({"base_model." + k: v for k, v in ours.state_dict().items() if "lora_" in k},
                                    strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
