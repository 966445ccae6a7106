"""Fused kernels against their reference paths: values and gradients (gradcheck in float64)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from lorakit.kernels import fused_lora_linear, linear_cross_entropy_sum
from lorakit.kernels.lora_linear import dropout_mask


def _lora_inputs(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, 8, dtype=dtype, generator=g, requires_grad=True)
    W = torch.randn(6, 8, dtype=dtype, generator=g)
    b = torch.randn(6, dtype=dtype, generator=g)
    A = torch.randn(3, 8, dtype=dtype, generator=g, requires_grad=True)
    B = torch.randn(6, 3, dtype=dtype, generator=g, requires_grad=True)
    return x, W, b, A, B


def test_fused_lora_linear_gradcheck():
    x, W, b, A, B = _lora_inputs()
    assert torch.autograd.gradcheck(lambda x, A, B: fused_lora_linear(x, W, b, A, B, 0.7), (x, A, B))
    b.requires_grad_()  # a trained bias (bias="all" / "lora_only")
    assert torch.autograd.gradcheck(lambda x, b, A, B: fused_lora_linear(x, W, b, A, B, 0.7), (x, b, A, B))


def test_fused_lora_linear_with_dropout_gradcheck_under_fixed_mask():
    x, W, b, A, B = _lora_inputs()

    def f(x, A, B):
        torch.manual_seed(3)  # same mask on every evaluation
        return fused_lora_linear(x, W, b, A, B, 0.7, dropout_p=0.3)
    assert torch.autograd.gradcheck(f, (x, A, B))


def test_fused_lora_linear_matches_module_path_values_and_grads():
    x, W, b, A, B = _lora_inputs(torch.float32)
    torch.manual_seed(1)
    fused = fused_lora_linear(x, W, b, A, B, 2.0, dropout_p=0.25)
    torch.manual_seed(1)
    drop, keep = dropout_mask((10, 8), 0.25, "cpu")
    ref = F.linear(x, W, b) + (x * ~drop.view(2, 5, 8) / keep) @ A.T @ B.T * 2.0
    assert (fused - ref).abs().max() < 1e-5
    grads_fused = torch.autograd.grad(fused.square().sum(), (x, A, B))
    grads_ref = torch.autograd.grad(ref.square().sum(), (x, A, B))
    for a, b_ in zip(grads_fused, grads_ref):
        assert torch.allclose(a, b_, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("with_bias", [False, True])
def test_bf16_fused_lora_linear_keeps_updates_smaller_than_the_output_rounding(with_bias):
    # A fresh adapter's update is below half a bf16 unit in the last place of the layer output. Summed in one
    # rounding it survives on average (the rounding error is uncorrelated with it); rounding the base output
    # first and adding the update after drops it deterministically (kept ~0.4 here). Float64 references.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g).bfloat16().requires_grad_()
    W = (torch.randn(128, 64, generator=g) / 8).bfloat16()
    A = torch.randn(4, 64, generator=g) / 8
    B = torch.randn(128, 4, generator=g) * 5e-4
    bias = torch.randn(128, generator=g).bfloat16() if with_bias else None
    grad_out = torch.randn(512, 128, generator=g).bfloat16()
    out = fused_lora_linear(x, W, bias, A, B, 1.0)
    out.backward(grad_out)
    x64, W64, A64, B64, g64 = (t.detach().double() for t in (x, W, A.bfloat16(), B.bfloat16(), grad_out))
    base = x64 @ W64.T + (0 if bias is None else bias.double())

    def kept(result, base, update):  # least-squares share of `update` present in result - base
        return ((result.double() - base) * update).sum() / update.square().sum()
    assert abs(kept(out, base, x64 @ A64.T @ B64.T) - 1) < 0.1
    assert abs(kept(x.grad, g64 @ W64, g64 @ B64 @ A64) - 1) < 0.1


def test_fused_lora_linear_bf16_activations_keep_fp32_adapter_grads():
    x, W, b, A, B = _lora_inputs(torch.float32)
    out = fused_lora_linear(x.detach().bfloat16().requires_grad_(), W.bfloat16(), None, A.float(), B.float(), 1.0)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and A.grad.dtype == torch.float32 and B.grad.dtype == torch.float32


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_linear_cross_entropy_equals_full_logits_reference(chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(11, 5, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randint(0, 11, (7,), generator=g)
    ours = linear_cross_entropy_sum(h, W, y, chunk_rows=chunk)
    ref = F.cross_entropy(h @ W.T, y, reduction="sum")
    assert torch.allclose(ours, ref, atol=1e-8)
    assert torch.autograd.gradcheck(lambda h, W: linear_cross_entropy_sum(h, W, y, chunk), (h, W))


@pytest.mark.parametrize("slice_rows", [1, 4, 64])
def test_vocab_sliced_cross_entropy_for_a_narrow_frozen_head(slice_rows):
    """A frozen head stored narrower than the hidden states (bf16 head, fp32 compute) is walked in vocabulary
    slices with an online log-sum-exp: equal to the full-logits loss on the same (bf16-rounded) weights, and
    gradcheck on the hidden states in float64 (head in fp32 there)."""
    from lorakit.kernels import linear_ce

    g = torch.Generator().manual_seed(0)
    h = torch.randn(9, 6, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(13, 6, dtype=torch.float64, generator=g)
    y = torch.tensor([0, 12, 4, 5, 5, 3, 12, 8, 1])  # first and last vocabulary entries included
    assert torch.autograd.gradcheck(
        lambda h: linear_ce._VocabSlicedCrossEntropy.apply(h, W.float(), y, slice_rows), (h,))
    h32 = h.detach().float().requires_grad_()
    ours = linear_cross_entropy_sum(h32, W.bfloat16(), y)  # dtypes differ -> the sliced path
    ref_h = h32.detach().clone().requires_grad_()
    ref = F.cross_entropy(ref_h @ W.bfloat16().float().T, y, reduction="sum")
    assert abs(ours.item() - ref.item()) <= 1e-5 * ref.item()
    ours.backward(), ref.backward()
    assert torch.allclose(h32.grad, ref_h.grad, atol=1e-5)
    head = torch.nn.Linear(6, 13, bias=True).to(torch.bfloat16)
    x = torch.randn(2, 3, 6)
    expected = x @ head.weight.float().T + head.bias.float()
    assert torch.allclose(linear_ce.sliced_linear(x, head, slice_rows), expected, atol=1e-6)


def test_linear_cross_entropy_bf16_within_stated_tolerance():
    # bf16 logits with fp32 log-sum-exp: within 1 % of the fp32 loss on vocab-sized rows.
    g = torch.Generator().manual_seed(0)
    h, W = torch.randn(64, 32, generator=g), torch.randn(1000, 32, generator=g) * 0.3
    y = torch.randint(0, 1000, (64,), generator=g)
    ref = F.cross_entropy(h @ W.T, y, reduction="sum")
    ours = linear_cross_entropy_sum(h.bfloat16(), W.bfloat16(), y)
    assert abs(ours.item() - ref.item()) / ref.item() < 0.01


def test_linear_cross_entropy_bf16_chunks_match_float64_within_the_rounding_bound():
    """bf16 logits over several chunks (reused logits / upcast buffers, a partial last chunk): loss and both
    gradients against float64 on the same bf16 values, within the bound bf16 rounding allows: each logit rounded
    (half an ulp, 2^-9 relative) moves a row's loss by at most 2 max|d logit| and a probability by
    p * 2 max|d logit|; the probabilities and the gradients are rounded to bf16 once more (2^-9 relative), the
    head's gradient once per chunk."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(10, 16, generator=g).bfloat16().requires_grad_()
    W = (torch.randn(50, 16, generator=g) * 0.5).bfloat16().requires_grad_()
    y = torch.randint(0, 50, (10,), generator=g)
    ours = linear_cross_entropy_sum(h, W, y, chunk_rows=4)  # chunks of 4, 4, 2 rows
    ours.backward()
    h64, W64 = h.detach().double(), W.detach().double()
    logits = h64 @ W64.T
    probs, onehot = logits.softmax(-1), F.one_hot(y, 50).double()
    ulp = 2.0 ** -9
    logit_err = ulp * logits.abs().amax(-1, keepdim=True)  # per row
    assert abs(ours.item() - F.cross_entropy(logits, y, reduction="sum").item()) <= 2 * logit_err.sum().item()
    prob_err = probs * 2 * logit_err + ulp * (probs - onehot).abs()
    grad_h, grad_W = (probs - onehot) @ W64, (probs - onehot).T @ h64
    assert ((h.grad.double() - grad_h).abs() <= prob_err @ W64.abs() + ulp * grad_h.abs()).all()
    # the head's gradient is summed over chunks from bf16 products: one more rounding per chunk's contribution
    chunk_rounding = ulp * (probs - onehot).abs().T @ h64.abs()
    assert ((W.grad.double() - grad_W).abs() <= prob_err.T @ h64.abs() + chunk_rounding + ulp * grad_W.abs()).all()


def test_fused_training_loss_equals_reference_path_values_and_adapter_grads():
    from conftest import tiny_llama

    import lorakit
    from lorakit.train.loss import CausalLMLoss, fused_head_supported

    model = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(r=4, target_modules="all-linear",
                                                                     lora_dropout=0.0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    assert fused_head_supported(model.get_base_model())
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (3, 12))
    labels = ids.clone()
    labels[:, :5] = -100  # prompt positions carry no loss
    mask = torch.ones_like(ids)
    results = []
    for fused in (True, False):
        model.zero_grad()
        loss = CausalLMLoss(model, fused=fused, chunk_rows=7)(ids, labels, attention_mask=mask)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (loss_f, grads_f), (loss_r, grads_r) = results
    # and both equal transformers' own mean loss times the number of labelled positions
    hf = model(input_ids=ids, attention_mask=mask, labels=labels).loss * (labels[:, 1:] != -100).sum()
    assert abs(loss_f - loss_r) < 1e-4 and abs(loss_r - hf.detach()) < 1e-4
    for name in grads_r:
        assert (grads_f[name] - grads_r[name]).abs().max() < 1e-5, name


def test_dropout_mask_keep_rate_and_independence():
    torch.manual_seed(0)
    drop, keep = dropout_mask((400, 500), 0.1, "cpu")
    mask = ~drop
    assert mask.dtype == torch.bool and abs(keep - 0.9) < 1e-4
    assert abs(mask.float().mean().item() - keep) < 0.003  # 200k draws: 4 sigma ~ 0.0027
    # neighbouring elements (which share a 64-bit draw) are uncorrelated
    m = mask.float().flatten()
    corr = torch.corrcoef(torch.stack([m[:-1], m[1:]]))[0, 1].item()
    assert abs(corr) < 0.01


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_fused_rms_norm_matches_llama_rms_norm(dtype, tol):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from lorakit.kernels.rms_norm import FusedRMSNorm, rms_norm

    torch.manual_seed(0)
    ref_norm = LlamaRMSNorm(16, eps=1e-5).to(dtype)
    with torch.no_grad():
        ref_norm.weight.normal_()
    fused = FusedRMSNorm(copy.deepcopy(ref_norm))  # own weight, so its gradient is its own
    x = torch.randn(3, 5, 16, dtype=dtype, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    a, b = fused(x), ref_norm(x2)
    assert (a.float() - b.float()).abs().max() <= tol
    g = torch.randn_like(a)
    a.backward(g)
    b.backward(g)
    assert (x.grad.float() - x2.grad.float()).abs().max() <= tol * 10
    assert (ref_norm.weight.grad.float() - fused.weight.grad.float()).abs().max() <= tol * 10
    x64 = torch.randn(2, 4, 8, dtype=torch.float64, requires_grad=True)
    w64 = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, 1e-6), (x64, w64))


def test_fused_swiglu_mlp_equals_llama_mlp_and_keeps_one_activation_fewer():
    from conftest import tiny_llama

    from lorakit.kernels.saved_activations import SavedBytes, compressed_activations
    from lorakit.kernels.swiglu import FusedSwiGLUMLP, fuse_swiglu_mlps, swiglu

    model = tiny_llama()
    ref_mlp = model.model.layers[0].mlp
    keys = sorted(model.state_dict())
    assert fuse_swiglu_mlps(model) == 2 and sorted(model.state_dict()) == keys  # same weights, same keys
    fused = model.model.layers[0].mlp
    assert isinstance(fused, FusedSwiGLUMLP) and fused.gate_proj is ref_mlp.gate_proj
    x = torch.randn(3, 5, 32, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    saved = {}
    for name, mlp, inp in (("ref", ref_mlp, x2), ("fused", fused, x)):
        saved[name] = SavedBytes()
        with compressed_activations(torch.float32, min_numel=1, counts=saved[name]):
            out = mlp(inp)
        saved[name + "_out"] = out
    torch.testing.assert_close(saved["fused_out"], saved["ref_out"], rtol=0, atol=1e-6)
    g = torch.randn_like(saved["ref_out"])
    saved["fused_out"].backward(g)
    saved["ref_out"].backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    # the reference saves gate (for silu), silu(gate) and up (for the product); fused: gate and up only
    assert saved["ref"].original - saved["fused"].original == 3 * 5 * 64 * 4
    gate = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    up = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu, (gate, up))


def test_right_padded_batches_drop_their_mask_without_changing_loss_or_grads():
    from conftest import tiny_llama

    import lorakit
    from lorakit.train.loss import CausalLMLoss, is_right_padded

    model = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    torch.manual_seed(0)
    ids = torch.randint(1, 128, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0  # right padding, as data.collate makes it
    mask[2, 10:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100
    assert is_right_padded(mask) and not is_right_padded(mask.flip(1))
    # Reference: transformers with the padding mask, summed over labelled positions.
    ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss * (labels[:, 1:] != -100).sum()
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    loss = CausalLMLoss(model)(ids, labels, attention_mask=mask)  # runs mask-free
    loss.backward()
    assert abs(loss.item() - ref.item()) < 1e-4
    for n, g in ref_grads.items():
        assert (model.get_parameter(n).grad - g).abs().max() < 1e-5, n


def _adapter_grads_with(stored_as, counts=None, min_numel=1):
    """Fused training loss and adapter gradients of a tiny fp32 Llama, activations kept as `stored_as`."""
    from conftest import tiny_llama

    import lorakit
    from lorakit.kernels.saved_activations import compressed_activations
    from lorakit.train.loss import CausalLMLoss

    model = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1, generator=torch.Generator().manual_seed(len(n.removeprefix("base_model."))))
    ids = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :5] = -100
    with compressed_activations(stored_as, min_numel=min_numel, counts=counts):
        loss = CausalLMLoss(model)(ids, labels)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_bf16_saved_activations_store_each_tensor_once_at_half_size_and_keep_grads_within_1e_2():
    from lorakit.kernels.saved_activations import SavedBytes

    ref_loss, ref = _adapter_grads_with(torch.float32)
    counts = SavedBytes()
    loss, grads = _adapter_grads_with(torch.bfloat16, counts)
    assert torch.equal(loss, ref_loss)  # the forward is untouched: only what backward reads is rounded
    # every saved float activation is stored at half its size (integer indices are kept as they are),
    # and the normed hidden state that q, k, v (gate, up) all save is stored once: well under half
    assert 0.3 * counts.original < counts.stored < 0.45 * counts.original
    worst = max(((grads[n] - ref[n]).norm() / ref[n].norm()).item() for n in ref)
    assert 1e-6 < worst < 1e-2  # rounded (so not identical), and within the stated tolerance


def test_fp32_saved_activations_are_the_exact_reference_and_parameters_are_never_copied():
    from lorakit.kernels.saved_activations import SavedBytes, compressed_activations

    _, plain = _adapter_grads_with(torch.float32)
    counts = SavedBytes()
    _, kept = _adapter_grads_with(torch.float32, counts)
    assert all(torch.equal(plain[n], kept[n]) for n in plain) and counts.stored == counts.original
    weight = torch.nn.Parameter(torch.randn(64, 64))
    x = torch.randn(8, 64, requires_grad=True)
    counts = SavedBytes()
    with compressed_activations(torch.bfloat16, min_numel=1, counts=counts):
        y = (x @ weight).sum()  # saves x and weight
    y.backward()
    assert counts.original == x.numel() * 4 and counts.stored == x.numel() * 2
    assert torch.allclose(weight.grad, x.detach().bfloat16().float().T @ torch.ones(8, 64))


def test_a_tensor_saved_by_several_functions_is_stored_once_until_it_changes():
    from lorakit.kernels.saved_activations import SavedBytes, compressed_activations

    weights = [torch.nn.Parameter(torch.randn(64, 64)) for _ in range(4)]
    x = torch.randn(8, 64, requires_grad=True)
    counts = SavedBytes()
    with compressed_activations(torch.bfloat16, min_numel=1, counts=counts):
        h = x * 2.0  # a non-leaf activation, like a normed hidden state
        outs = [h @ w for w in weights[:3]]  # three saves of the same h: one bf16 copy
        assert counts.original == 3 * h.numel() * 4 and counts.stored == h.numel() * 2
        with torch.no_grad():
            h.mul_(1.0)  # changed in place (version bump): the next save must not reuse the old copy
        outs.append(h @ weights[3])
    assert counts.stored == 2 * h.numel() * 2
    sum(o.sum() for o in outs[:3]).backward()
    ref = x.detach() * 2.0
    for w in weights[:3]:
        assert torch.allclose(w.grad, ref.bfloat16().float().T @ torch.ones(8, 64))


def test_saved_activations_setting_is_validated():
    from lorakit.kernels.saved_activations import resolve_saved_activations
    from lorakit.train.config import TrainConfig

    assert resolve_saved_activations("auto", torch.float32) == torch.float32  # exact unless memory needs bf16
    assert resolve_saved_activations("auto", torch.bfloat16) == torch.bfloat16
    assert resolve_saved_activations("fp32", torch.float32) == torch.float32
    with pytest.raises(ValueError, match="saved_activations must be 'auto', 'bf16' or 'fp32', got 'fp16'"):
        TrainConfig(saved_activations="fp16")


def test_linear_cross_entropy_forms_each_chunks_logits_once_per_step():
    """The head's logits are formed once per chunk: forward also forms the gradient (softmax - one-hot) @ W, and
    backward only scales it by the upstream gradient, so forward + backward run 2 matmuls per chunk (3 when
    backward recomputed the logits); under no_grad, 1. The gradient equals the full-logits reference's, also for
    an upstream gradient other than 1 (a mean over targets)."""
    from conftest import CountMatmuls

    from lorakit.kernels.linear_ce import chunk_rows_for

    g = torch.Generator().manual_seed(0)
    h = torch.randn(10, 8, generator=g, requires_grad=True)
    W = torch.randn(50, 8, generator=g)
    y = torch.randint(0, 50, (10,), generator=g)
    with CountMatmuls() as counted:
        (linear_cross_entropy_sum(h, W, y, chunk_rows=4) / 7).backward()  # 3 chunks
    assert counted.count == 6
    ref_h = h.detach().clone().requires_grad_()
    (F.cross_entropy(ref_h @ W.T, y, reduction="sum") / 7).backward()
    assert torch.allclose(h.grad, ref_h.grad, atol=1e-6)
    with torch.no_grad(), CountMatmuls() as counted:
        linear_cross_entropy_sum(h, W, y, chunk_rows=4)
    assert counted.count == 3
    assert chunk_rows_for(49_152) == 512 and chunk_rows_for(128_256) == 192 and chunk_rows_for(10**7) == 64


def test_linear_cross_entropy_with_non_contiguous_hidden_states():
    """Hidden states that are a strided view (a transposed tensor, dense but column-major, and every other row
    of a larger one) give the reference loss and gradient."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(9, 5, dtype=torch.float64, generator=g)
    y = torch.randint(0, 9, (7,), generator=g)
    for base, view in ((torch.randn(5, 7, dtype=torch.float64, generator=g), lambda t: t.T),
                       (torch.randn(14, 5, dtype=torch.float64, generator=g), lambda t: t[::2])):
        leaf, ref = base.clone().requires_grad_(), base.clone().requires_grad_()
        ours = linear_cross_entropy_sum(view(leaf), W, y, chunk_rows=3)
        expected = F.cross_entropy(view(ref) @ W.T, y, reduction="sum")
        (ours * 0.5).backward(), (expected * 0.5).backward()
        assert torch.allclose(ours, expected, atol=1e-10)
        assert torch.allclose(leaf.grad, ref.grad, atol=1e-10)


def test_conv1d_lora_trains_through_the_fused_kernel_with_its_weight_saved_as_is():
    """GPT-2's Conv1D (x @ W + b, W stored (d_in, d_out)) takes the fused kernel with W^T, a view: saved for backward
    as the parameter itself (not packed into a bf16 copy by compressed activations); output and gradients equal a
    float64 reference (fp32 arithmetic, 64-term sums: 1e-5 relative norm error)."""
    from conftest import assert_lora_layer_matches_float64, randomize_adapters
    from transformers.pytorch_utils import Conv1D

    import lorakit
    from lorakit.kernels.saved_activations import compressed_activations

    torch.manual_seed(0)
    model = torch.nn.Module()
    model.c_attn = Conv1D(48, 64)
    torch.nn.init.normal_(model.c_attn.bias)  # Conv1D starts its bias at zero, which would hide a wrong bias path
    lorakit.get_peft_model(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                      fan_in_fan_out=True))
    layer = model.c_attn
    randomize_adapters(layer)
    W, b = layer.base_layer.weight, layer.base_layer.bias
    x = torch.randn(6, 64, requires_grad=True)
    with compressed_activations(min_numel=1):  # activations stored as bf16 copies, the frozen weight as it is
        packed = layer(x).grad_fn
    assert type(packed).__name__ == "_FusedLoraLinearBackward"
    assert any(t is not None and t.shape == (48, 64) and torch.equal(t, W.T) for t in packed.saved_tensors)
    assert_lora_layer_matches_float64(layer, x, torch.randn(6, 48), W.detach().double().T, b.detach().double(), 1e-5)
