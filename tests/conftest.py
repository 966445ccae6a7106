"""Tiny random models built in fixtures; the embedded real model only in `integration` tests."""

import copy
import os

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

torch.set_num_threads(min(2, torch.get_num_threads()))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_llama(tie=False, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


class ConvNet(nn.Module):
    """Conv2d (3x3 and 1x1), Conv1d, Conv3d and Linear layers, for LoRA on every conv type."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.conv1d = nn.Conv1d(8, 6, 3, stride=2)
        self.conv3d = nn.Conv3d(2, 4, (1, 3, 3))
        self.head = nn.Linear(6 * 7, 5)

    def forward(self, x):
        h = torch.relu(self.conv1(x))  # (B, 8, 16, 16)
        h = self.conv2(h)
        v = self.conv3d(h[:, :4].reshape(h.shape[0], 2, 2, 16, 16))  # (B, 4, 2, 14, 14)
        seq = h.mean(dim=3) + v.mean(dim=(1, 2, 4)).unsqueeze(1)[..., :1]  # (B, 8, 16)
        return self.head(self.conv1d(seq).flatten(1))


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def gpt2():
    return tiny_gpt2()


@pytest.fixture
def convnet():
    torch.manual_seed(0)
    return ConvNet().eval()


@pytest.fixture
def ids():
    torch.manual_seed(1)
    return torch.randint(0, 128, (2, 9))


def clone(model):
    return copy.deepcopy(model)


def randomize_adapters(model, seed=123, scale=0.1):
    """Give every adapter parameter non-trivial values (B starts at zero, which would hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
            elif "trainable_tokens_delta" in name:  # new values of the chosen embedding rows
                p.add_(torch.randn(p.shape, generator=gen) * scale)


def assert_lora_layer_matches_float64(layer, x, grad_out, base_weight, base_bias, rel):
    """A LoRA layer's output and gradients (x, lora_A, lora_B of its "default" adapter) against float64:
    x @ base_weight^T + base_bias + scaling * x A^T B^T, each within `rel` relative norm error."""
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    out = layer(x)
    out.backward(grad_out)
    x64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, A, B))
    ref = x64 @ base_weight.T + base_bias + layer.scaling["default"] * x64 @ A64.T @ B64.T
    ref.backward(grad_out.double())
    for got, want in ((out, ref), (x.grad, x64.grad), (A.grad, A64.grad), (B.grad, B64.grad)):
        assert (got.double() - want.detach()).norm() / want.detach().norm() < rel


def copy_adapters_to_peft(ours, theirs):
    """Load a lorakit model's adapter weights into a PEFT model with the same adapters."""
    result = theirs.load_state_dict({k: v for k, v in ours.state_dict().items()
                                     if "lora_" in k or "trainable_tokens_delta" in k}, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_tiny_tokenizer():
    """A byte-level BPE tokenizer trained on the demo data, with a ChatML template (no downloads)."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lorakit.train.config import DEMO_DATA

    texts = []
    with open(DEMO_DATA) as f:
        for line in f:
            texts += [m["content"] for m in json.loads(line)["messages"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tiny_tokenizer()


def tiny_llama_for(tokenizer, seed=0, initializer_range=0.02, **config):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      initializer_range=initializer_range, **config)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny Llama + tokenizer saved as a transformers directory (usable as --model DIR)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama_for(tiny_tokenizer).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return str(path)


def tiny_train_config(output_dir, **kw):
    """A TrainConfig for tiny-model runs: demo data, 96 tokens, batch 4, 10 steps, fp32, no progress bar."""
    from lorakit.train.config import DEMO_DATA, TrainConfig

    base = dict(data=DEMO_DATA, prompts=None, output_dir=str(output_dir), max_length=96, batch_size=4,
                max_steps=10, lr=5e-3, warmup_steps=2, eval_every=5, save_every=100, bf16=False, progress=False,
                lora=dict(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"]))
    base.update(kw)
    return TrainConfig(**base)


class CountMatmuls(TorchDispatchMode):
    """Counts the matrix products dispatched while active (mm, addmm and in-place addmm_)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.count += 1
        return func(*args, **(kwargs or {}))


# Two fp32 computations of the same function in another operation order (lorakit vs PEFT, merged vs unmerged, fused
# vs reference) differ by rounding: each reduction of n terms is off by up to ~sqrt(n)·eps32 (1.2e-7) of the largest
# magnitude it adds, and a tiny model chains a few dozen of them (n <= 10^4 here: <= 1.2e-5 each). 1e-4 of the
# tensor's largest magnitude covers that on every CPU's kernels, where a wrong formula is off by 1e-3 or more.
# Elementwise relative tolerances do not follow this arithmetic: a near-zero element's rounding is relative to the
# large terms that produced it (an Xeon failed rtol=1e-5 on one element of 48 of an attention gradient).
FP32_REL = 1e-4


def assert_close_fp32(actual, expected, msg=None, rel=FP32_REL):
    """|actual - expected| <= rel x the largest magnitude in either tensor (see FP32_REL)."""
    actual, expected = torch.as_tensor(actual).detach(), torch.as_tensor(expected).detach()
    assert actual.shape == expected.shape, (msg, actual.shape, expected.shape)
    scale = max(actual.abs().max().item(), expected.abs().max().item(), 1e-30) if actual.numel() else 1.0
    error = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    assert error <= rel * scale, f"{msg or ''}: max |difference| {error:.3g} > {rel:g} x largest magnitude {scale:.3g}"


# --- the server tests' model and adapters (test_serve.py, test_playground.py) ---
def _train_adapter(tmp_path_factory, model_dir, answer, name):
    """A tiny adapter that answers every prompt with `answer` (trained for a few seconds)."""
    from lorakit.train import TrainConfig, train

    root = tmp_path_factory.getbasetemp() / "adapters"
    data = root / f"{name}.jsonl"
    root.mkdir(exist_ok=True)
    prompts = ["Tell me something.", "Hello?", "What now?", "Any news?", "Say a thing."]
    data.write_text("".join(
        '{"messages": [{"role": "user", "content": "%s"}, {"role": "assistant", "content": "%s"}]}\n' % (p, answer)
        for p in prompts * 4))
    out = root / f"run-{name}"
    train(TrainConfig(model=model_dir, data=str(data), prompts=None, output_dir=str(out), max_steps=80, lr=1e-2,
                      batch_size=4, warmup_steps=2, val_fraction=0.0, bf16=False, progress=False, save_every=1000,
                      lora=dict(r=8, lora_alpha=16, target_modules="all-linear")))
    os.replace(out / "adapter", root / name)
    return str(root / name)


@pytest.fixture(scope="session")
def serve_model_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny Llama whose output head is large enough to express confident answers."""
    path = tmp_path_factory.mktemp("serve-llama")
    tiny_llama_for(tiny_tokenizer, initializer_range=0.3).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def adapters(tmp_path_factory, serve_model_dir):
    """Two trained adapters under one adapter root: (yes, no) directories."""
    return (_train_adapter(tmp_path_factory, serve_model_dir, "yes yes yes", "yes"),
            _train_adapter(tmp_path_factory, serve_model_dir, "no no no", "no"))
