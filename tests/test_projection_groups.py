"""q/k/v and gate/up trained as one matmul (projection_groups.py) against each layer's own path: values,
gradients (gradcheck in float64), matmul counts, and the weights handed back as separate tensors."""

import pytest
import torch
from torch import nn

import lorakit
from lorakit.train.loss import CausalLMLoss
from lorakit.train.projection_groups import find_groups, grouped_projections


class Block(nn.Module):
    """q/k/v (q and v with a bias) and gate/up read one input, as in a Llama-style (Qwen2: biased) block."""

    def __init__(self, d=8):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, 6), nn.Linear(d, 4, bias=False), nn.Linear(d, 4)
        self.gate_proj, self.up_proj = nn.Linear(d, 5, bias=False), nn.Linear(d, 5, bias=False)

    def forward(self, x, kv=None):
        kv = x if kv is None else kv
        return torch.cat([self.q_proj(x), self.k_proj(kv), self.v_proj(kv),
                          nn.functional.silu(self.gate_proj(x)) * self.up_proj(x)], dim=-1)


def _adapted_block(dtype=torch.float64):
    torch.manual_seed(0)
    cfg = lorakit.LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"],
                             rank_pattern={"k_proj": 2}, alpha_pattern={"v_proj": 9})  # unequal ranks and scales
    model = lorakit.get_peft_model(Block(), cfg).to(dtype)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    model.train()
    return model


def _adapters(model):
    return [p for n, p in model.named_parameters() if p.requires_grad]


def test_grouped_projections_gradcheck_against_x_and_every_adapter_factor():
    model = _adapted_block()
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    params = _adapters(model)
    with grouped_projections(model) as groups:
        assert len(groups) == 2
        assert torch.autograd.gradcheck(lambda x, *ps: model(x), (x, *params))


def test_grouped_projections_equal_each_layers_own_path_values_and_grads():
    model = _adapted_block()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    results = []
    for grouped in (True, False):
        model.zero_grad()
        xg = x.clone().requires_grad_()
        with grouped_projections(model, enabled=grouped):
            out = model(xg)
            (out * torch.arange(out.shape[-1], dtype=out.dtype)).sum().backward()
        results.append((out.detach(), xg.grad, [p.grad.clone() for p in _adapters(model)]))
    (out_g, gx_g, grads_g), (out_r, gx_r, grads_r) = results
    assert (out_g - out_r).abs().max() < 1e-12 and (gx_g - gx_r).abs().max() < 1e-12
    for a, b in zip(grads_g, grads_r):
        assert (a - b).abs().max() < 1e-12


def test_a_sibling_called_with_another_input_disables_its_group_and_stays_exact():
    model = _adapted_block()
    x, kv = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(2, 3, 8, dtype=torch.float64)
    reference = model(x, kv)
    with grouped_projections(model) as (qkv, gate_up):
        for _ in range(2):
            assert (model(x, kv) - reference).abs().max() < 1e-12
        assert not qkv.enabled and gate_up.enabled  # cross-attention-like use: q/k/v left to their own paths


def test_weights_are_views_of_one_tensor_inside_and_separate_again_after():
    model = _adapted_block()
    block = model.get_base_model()
    before = {n: p.detach().clone() for n, p in block.named_parameters() if "base_layer" in n}
    with grouped_projections(model) as (qkv, _):
        q, k = block.q_proj.base_layer.weight, block.k_proj.base_layer.weight
        assert q.untyped_storage().data_ptr() == qkv.weight.untyped_storage().data_ptr() == \
            k.untyped_storage().data_ptr()
    ptrs = {p.untyped_storage().data_ptr() for n, p in block.named_parameters() if "base_layer" in n}
    assert len(ptrs) == len(before)  # every weight and bias its own storage again (safetensors can save it)
    after = dict(block.named_parameters())
    assert all(torch.equal(after[n], v) and not after[n].requires_grad for n, v in before.items())
    assert all(m.projection_group is None for m in block.modules() if hasattr(m, "projection_group"))


def test_eval_dropout_and_several_adapters_take_each_layers_own_path():
    model = _adapted_block()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    with grouped_projections(model) as groups:
        with torch.no_grad():
            assert all(g._groupable(x) is None for g in groups)
        assert all(g._groupable(x) == "default" for g in groups)
        model.add_adapter("second", lorakit.LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj"]))
        model.base_model.set_adapter(["default", "second"])
        assert groups[0]._groupable(x) is None
    torch.manual_seed(0)
    drop = lorakit.get_peft_model(Block(), lorakit.LoraConfig(r=2, lora_dropout=0.1,
                                                              target_modules=["q_proj", "k_proj", "v_proj"]))
    drop.train()
    with grouped_projections(drop) as (qkv,):
        assert qkv._groupable(torch.randn(2, 8)) is None


def test_llama_training_step_same_loss_and_grads_with_24_fewer_matmuls_per_layer():
    from conftest import CountMatmuls, tiny_llama

    model = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    model.train()
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (3, 12))
    labels = ids.clone()
    labels[:, :4] = -100
    results = []
    for grouped in (True, False):
        model.zero_grad()
        with grouped_projections(model, enabled=grouped) as groups, CountMatmuls() as counter:
            loss = CausalLMLoss(model, fused=True)(ids, labels)
            loss.backward()
        results.append((len(groups), counter.count, loss.detach(),
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (n_groups, mm_g, loss_g, grads_g), (_, mm_r, loss_r, grads_r) = results
    layers = model.config.num_hidden_layers
    assert n_groups == 2 * layers
    # each fused LoRA linear: 3 matmuls forward, 5 backward (3 where its input needs no gradient: layer 0's q/k/v
    # read the frozen embedding); a group of 3 (q/k/v) or 2 (gate/up) runs as one linear
    assert mm_r - mm_g == 8 * (2 + 1) * layers - 2 * 2
    assert abs(loss_g - loss_r) / loss_r < 1e-6
    for name in grads_r:
        assert torch.allclose(grads_g[name], grads_r[name], rtol=1e-4, atol=1e-6), name


def test_groups_are_found_only_among_plain_linear_siblings():
    from conftest import tiny_gpt2, tiny_llama

    llama = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj", "k_proj",
                                                                                        "v_proj", "up_proj"]))
    assert [[type(m).__name__ for m in g] for g in find_groups(llama)] == [["LoraLinear"] * 3] * 2
    gpt2 = lorakit.get_peft_model(tiny_gpt2(), lorakit.LoraConfig(r=2, target_modules=["c_attn"]))
    assert find_groups(gpt2) == []
    from lorakit.quant.nf4 import quantize_model_nf4

    nf4 = lorakit.get_peft_model(quantize_model_nf4(tiny_llama()), lorakit.LoraConfig(r=2, target_modules="all-linear"))
    assert find_groups(nf4) == []


def test_trained_biases_keep_their_own_parameters_and_gradients():
    """bias="all": q and v train their biases, so the block is not grouped (a group's concatenated bias is frozen);
    every bias gets the gradient of each layer's own path."""
    cfg = lorakit.LoraConfig(r=3, target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"], bias="all")
    model = lorakit.get_peft_model(Block(), cfg)
    assert find_groups(model) == [[model.base_model.model.gate_proj, model.base_model.model.up_proj]]
    x = torch.randn(2, 3, 8)
    with grouped_projections(model):
        model(x).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if "bias" in n}
    model.zero_grad()
    model(x).square().sum().backward()
    assert grads.keys() == {n for n, p in model.named_parameters() if "bias" in n} and len(grads) == 2
    assert all(torch.equal(grads[n], p.grad) for n, p in model.named_parameters() if "bias" in n)


@pytest.mark.parametrize("saved", ["bf16", "fp32"])
def test_train_with_grouped_projections_equals_train_without(tmp_path, saved):
    """The training loop (fused kernels, projections grouped) against fused_kernels: false, 3 steps, fp32 base."""
    from conftest import tiny_train_config

    from lorakit.train import train

    finals = []
    for fused in (True, False):
        cfg = tiny_train_config(tmp_path / f"{fused}", max_steps=3, fused_kernels=fused, saved_activations=saved,
                                group_projections=True,
                                lora=dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
        out = train(cfg, model=__import__("conftest").tiny_llama_for(_tokenizer()), tokenizer=_tokenizer())
        finals.append([r["train_loss"] for r in out["history"] if "train_loss" in r])
    tol = 1e-4 if saved == "fp32" else 1e-2
    for a, b in zip(*finals):
        assert abs(a - b) / b < tol


def _tokenizer():
    from conftest import make_tiny_tokenizer

    return make_tiny_tokenizer()


def test_group_projections_setting_auto_means_a_bf16_base():
    from lorakit.train.config import TrainConfig
    from lorakit.train.distributed import Env
    from lorakit.train.loop import group_projections_enabled

    single = Env()
    assert group_projections_enabled(TrainConfig(bf16=True), single)
    assert not group_projections_enabled(TrainConfig(bf16=False), single)
    assert group_projections_enabled(TrainConfig(bf16=False, group_projections=True), single)
    assert not group_projections_enabled(TrainConfig(bf16=True, fused_kernels=False), single)
    with pytest.raises(ValueError, match="group_projections must be true, false or 'auto', got 'yes'"):
        TrainConfig(group_projections="yes")
