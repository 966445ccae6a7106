"""NF4 + double quantization against the published codebook and error figures; NF4Linear; QLoRA."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_lora_layer_matches_float64, randomize_adapters, tiny_llama
from torch import nn

import lorakit
from lorakit.quant.nf4 import (NF4_CODE, NF4Linear, dequantize_nf4, nf4_code_from_quantiles, quantize_model_nf4,
                               quantize_nf4)

# bitsandbytes' published NF4 table (functional.py), copied as a literal reference.
PUBLISHED_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]


def test_code_values_equal_published_table_and_the_papers_construction():
    assert NF4_CODE.tolist() == torch.tensor(PUBLISHED_NF4).tolist()
    assert torch.allclose(nf4_code_from_quantiles(), NF4_CODE, atol=1e-6)


def test_roundtrip_error_on_normal_weights_within_published_bound():
    # bitsandbytes' own test bound for NF4 at block size 64 on randn(1024, 1024):
    # mean absolute error < 0.1 and mean relative error < 0.28.
    torch.manual_seed(0)
    w = torch.randn(1024, 1024)
    back = dequantize_nf4(quantize_nf4(w))
    err = (w - back).abs()
    assert err.mean() < 0.1 and (err / (w.abs() + 1e-8)).mean() < 0.28
    assert err.mean() > 0.05  # it really is 4-bit: not a lossless copy


def test_double_quantization_memory_is_at_most_4_127_bits_per_parameter():
    q = quantize_nf4(torch.randn(4096, 4096))
    # packed codes + int8 absmax + fp32 scale per 256 absmax + one fp32 mean
    assert q.bits_per_parameter() <= 4.127 + 1e-5
    assert q.bits_per_parameter() > 4.12


def test_codes_are_nearest_values_and_odd_sizes_roundtrip():
    torch.manual_seed(1)
    w = torch.randn(7, 13)  # 91 values: padding inside blocks and bytes
    q = quantize_nf4(w)
    back = dequantize_nf4(q)
    assert back.shape == w.shape
    absmax = F.pad(w.reshape(-1), (0, 64 * 2 - 91)).view(-1, 64).abs().amax(1)
    # each value's code is the nearest NF4 value to w / absmax (up to the 8-bit absmax error)
    scaled = back.reshape(-1) / absmax.repeat_interleave(64)[:91]
    nearest = NF4_CODE[(w.reshape(-1, 1) / absmax.repeat_interleave(64)[:91, None] - NF4_CODE).abs().argmin(1)]
    assert (scaled - nearest).abs().max() < 0.02


def test_nf4_linear_forward_equals_linear_with_dequantized_weight_and_grads_only_to_input():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    q = NF4Linear.from_linear(linear, compute_dtype=torch.float32)
    x = torch.randn(5, 64, requires_grad=True)
    out = q(x)
    ref = F.linear(x, dequantize_nf4(q.quantized()), linear.bias)
    assert torch.equal(out, ref)
    out.sum().backward()
    assert x.grad is not None and all(not p.requires_grad for p in q.parameters())
    x2 = x.detach().clone().requires_grad_()
    ref = F.linear(x2, dequantize_nf4(q.quantized()), linear.bias)
    ref.sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-6)


def test_lora_on_nf4_base_trains_only_adapters_and_merges_to_float():
    model = quantize_model_nf4(tiny_llama(), compute_dtype=torch.float32)
    assert sum(isinstance(m, NF4Linear) for m in model.modules()) == 14  # 7 per layer, lm_head kept
    peft_model = lorakit.get_peft_model(model, lorakit.LoraConfig(r=4, target_modules="all-linear"))
    randomize_adapters(peft_model)
    ids = torch.randint(0, 128, (2, 9))
    out = peft_model(input_ids=ids).logits
    out.square().mean().backward()
    grads = {n for n, p in peft_model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    counted = peft_model.get_nb_trainable_parameters()[1]
    assert counted == sum(p.numel() for p in tiny_llama().parameters()) + sum(
        p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    with pytest.raises(ValueError, match="merge_and_unload"):
        peft_model.merge_adapter()
    plain = peft_model.merge_and_unload(requantize=False)
    assert not any(isinstance(m, NF4Linear) for m in plain.modules())
    with torch.no_grad():
        assert (plain(input_ids=ids).logits - expected).abs().max() < 1e-4


def test_requantize_after_merge_reports_extra_error():
    model = quantize_model_nf4(tiny_llama(), compute_dtype=torch.float32)
    peft_model = lorakit.get_peft_model(model, lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    randomize_adapters(peft_model)
    plain = peft_model.merge_and_unload(requantize=True)
    assert sum(isinstance(m, NF4Linear) for m in plain.modules()) == 14
    assert 0.01 < plain.requantization_error < 0.2


def test_streaming_nf4_load_matches_quantizing_a_loaded_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    streamed = lorakit.load_model(tiny_model_dir, quantize="nf4", dtype=torch.float32)
    reference = quantize_model_nf4(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), torch.float32)
    # the streamed model keeps the (unquantized) embeddings and head in bf16 and computes in fp32
    assert streamed.get_input_embeddings().weight.dtype == streamed.get_output_embeddings().weight.dtype \
        == torch.bfloat16
    with torch.no_grad():
        for module in (reference.get_input_embeddings(), reference.get_output_embeddings()):
            module.weight.copy_(module.weight.bfloat16().float())
    ids = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        got, expected = streamed(input_ids=ids).logits, reference(input_ids=ids).logits
    assert got.dtype == torch.float32
    assert (got - expected).abs().max() <= 1e-6 * expected.abs().max()


def test_chunked_quantization_equals_one_pass_and_leaves_the_input_alone(monkeypatch):
    import lorakit.quant.nf4 as nf4

    w = torch.randn(333, 1000, generator=torch.Generator().manual_seed(0))
    original = w.clone()
    whole = nf4.quantize_nf4(w).tensors()
    monkeypatch.setattr(nf4, "QUANTIZE_CHUNK_BLOCKS", 7)  # 5,204 blocks in chunks of 7, the last one partial
    chunked = nf4.quantize_nf4(w).tensors()
    assert all(torch.equal(whole[k], chunked[k]) for k in whole)
    assert torch.equal(w, original)


def test_dense_weight_cache_gives_bit_identical_gradients_and_saves_the_backward_dequantization():
    """With gradient checkpointing each layer's recomputed forward leaves its dense weights for its backward: every
    backward is a cache hit, and loss and adapter gradients are bit-identical to dequantizing again."""
    from lorakit.quant.nf4 import layer_cache_bytes, nf4_weight_cache

    results = []
    for cached in (False, True):
        base = quantize_model_nf4(tiny_llama(), compute_dtype=torch.float32)
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = lorakit.get_peft_model(base, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        randomize_adapters(model)
        model.train()
        ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
        budget = layer_cache_bytes(base, base.config.num_hidden_layers) if cached else 0
        with nf4_weight_cache(budget) as cache:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            hits, misses = cache.hits, cache.misses
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad},
                        hits, misses))
        cache.hits = cache.misses = 0
    (loss0, grads0, _, _), (loss1, grads1, hits, misses) = results
    assert budget == (2 * 32 * 32 + 2 * 16 * 32 + 3 * 64 * 32) * 4  # one decoder layer's 7 projections, fp32
    assert torch.equal(loss0, loss1) and grads0.keys() == grads1.keys()
    assert all(torch.equal(grads0[n], grads1[n]) for n in grads0)
    # 14 projections used 3 times each (forward, recompute, backward): every backward hits, and so does the last
    # layer's recompute (its first forward's weights are still there): 21 dequantizations instead of 42
    assert (hits, misses) == (21, 21)


@pytest.mark.parametrize("compute,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_lora_on_nf4_base_trains_through_the_fused_kernel_and_saves_no_dense_weight(compute, tol):
    """QLoRA training takes the fused LoRA kernel (one rounding of base + update in bf16, kernels/lora_linear.py):
    output and gradients match a float64 reference on the dequantized weight (tol: relative norm error, fp32 /
    bf16 arithmetic; fp32: 64-term sums bounded by 64 x 2^-24 = 4e-6), and no dense (out x in) weight is kept for backward, which dequantizes again."""
    torch.manual_seed(0)
    model = nn.Module()
    model.proj = NF4Linear.from_linear(nn.Linear(64, 48), compute_dtype=compute)
    dense = dequantize_nf4(model.proj.quantized()).double()
    bias = model.proj.bias.double()
    lorakit.get_peft_model(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]))
    layer = model.proj
    randomize_adapters(layer)
    x = torch.randn(6, 64).to(compute).requires_grad_()
    out = layer(x)
    assert type(out.grad_fn).__name__ == "_FusedLoraLinearBackward"
    assert not any(t is not None and t.shape == (48, 64) for t in out.grad_fn.saved_tensors)
    assert_lora_layer_matches_float64(layer, x, torch.randn(6, 48).to(compute), dense, bias, tol)
