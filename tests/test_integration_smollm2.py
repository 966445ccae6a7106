"""The embedded SmolLM2-135M-Instruct with lorakit and PEFT side by side (slower: marked integration)."""

import copy

import peft
import pytest
import torch

import lorakit
from lorakit.models.loading import load_model, load_tokenizer, resolve_model_dir

pytestmark = pytest.mark.integration
QUICKSTART = dict(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.05)


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


def test_cache_is_a_plain_transformers_dir_with_tokenizer_and_chat_template():
    directory = resolve_model_dir("smollm2-135m")
    tokenizer = load_tokenizer("smollm2-135m")
    assert directory.endswith("smollm2-135m") and tokenizer.chat_template
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)


def test_quickstart_config_counts_match_peft(smollm2):
    ours = lorakit.get_peft_model(copy.deepcopy(smollm2), lorakit.LoraConfig(**QUICKSTART))
    theirs = peft.get_peft_model(copy.deepcopy(smollm2), peft.LoraConfig(**QUICKSTART))
    assert ours.get_nb_trainable_parameters()[0] == 1_843_200  # 30 x 16 x (1152 + 768 + 768 + 1152)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_adapter_saved_by_lorakit_gives_peft_logits_on_smollm2(smollm2, tmp_path):
    ours = lorakit.get_peft_model(copy.deepcopy(smollm2), lorakit.LoraConfig(**QUICKSTART))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    ours.save_pretrained(tmp_path)
    saved = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert saved.base_model_name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"  # the public name, not a cache path
    ours.eval()  # new adapters start in training mode (dropout live), as in PEFT
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(smollm2), tmp_path).eval()
    ids = torch.randint(0, 49152, (1, 24))
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
        ours.merge_adapter()
        merged = ours(input_ids=ids).logits
    assert (a - b).abs().max() < 1e-4
    assert (merged - a).abs().max() < 1e-3  # fp32 logits of magnitude ~20


def test_the_public_name_resolves_to_the_embedded_model_offline():
    assert resolve_model_dir("HuggingFaceTB/SmolLM2-135M-Instruct") == resolve_model_dir("smollm2-135m")
