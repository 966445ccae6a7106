"""The GPU path: each fast kernel on CUDA against a float64 CPU reference; training on the GPU
tracks the CPU run. Skipped where torch sees no CUDA GPU (CI's machines); run on a GPU machine."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama_for, tiny_train_config

from lorakit.hardware import attention_backends
from lorakit.kernels import linear_cross_entropy_sum
from lorakit.kernels.lora_linear import fused_lora_linear
from lorakit.kernels.rms_norm import rms_norm
from lorakit.quant.nf4 import dequantize_nf4, quantize_nf4

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def exact_fp32_matmuls():
    """fp32 matmuls in full fp32 (not TF32) so fp32 tolerances mean what they say."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


def rel(a, b):
    return ((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm()).item()


def _lora_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 37, 64, generator=gen)
    w, b = torch.randn(96, 64, generator=gen) / 8, torch.randn(96, generator=gen)
    a, bb = torch.randn(8, 64, generator=gen) / 8, torch.randn(96, 8, generator=gen) / 8
    return x, w, b, a, bb


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fused_lora_linear_on_gpu_matches_float64_reference(dtype, tol):
    x, w, b, a, bb = _lora_inputs()
    grad = torch.randn(3, 37, 96, generator=torch.Generator().manual_seed(1))
    ref_in = [t.double().requires_grad_(i in (0, 3, 4)) for i, t in enumerate((x, w, b, a, bb))]
    ref = F.linear(ref_in[0], ref_in[1], ref_in[2]) + 2.0 * (ref_in[0] @ ref_in[3].T) @ ref_in[4].T
    ref.backward(grad.double())
    xs = x.cuda().to(dtype).requires_grad_()
    A, B = a.cuda().requires_grad_(), bb.cuda().requires_grad_()  # adapters stay fp32
    out = fused_lora_linear(xs, w.cuda().to(dtype), b.cuda().to(dtype), A, B, 2.0)
    out.backward(grad.cuda().to(dtype))
    assert out.dtype == dtype and A.grad.dtype == torch.float32
    assert rel(out, ref) < tol
    for got, want in ((xs.grad, ref_in[0].grad), (A.grad, ref_in[3].grad), (B.grad, ref_in[4].grad)):
        assert 0 <= rel(got, want) < tol


def test_chunked_linear_cross_entropy_on_gpu_equals_full_logits():
    gen = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(300, 32, generator=gen), torch.randn(1000, 32, generator=gen) / 4
    labels = torch.randint(0, 1000, (300,), generator=gen)
    h_ref = hidden.double().requires_grad_()
    ref = F.cross_entropy(h_ref @ weight.double().T, labels, reduction="sum")
    ref.backward()
    h = hidden.cuda().requires_grad_()
    got = linear_cross_entropy_sum(h, weight.cuda(), labels.cuda(), chunk_rows=64)  # 5 chunks, one partial
    got.backward()
    assert rel(got, ref) < 1e-6 and rel(h.grad, h_ref.grad) < 1e-5


def test_rms_norm_on_gpu_matches_float64_reference():
    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(4, 9, 48, generator=gen), torch.rand(48, generator=gen) + 0.5
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    ref = wr * xr * torch.rsqrt(xr.pow(2).mean(-1, keepdim=True) + 1e-5)
    ref.sum().backward()
    xs, ws = x.cuda().requires_grad_(), w.cuda().requires_grad_()
    out = rms_norm(xs, ws, 1e-5)
    out.sum().backward()
    assert rel(out, ref) < 1e-6 and rel(xs.grad, xr.grad) < 1e-5 and rel(ws.grad, wr.grad) < 1e-5


def test_training_attention_avoids_cudnn_and_matches_the_math_kernel():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 4, 57, 64, generator=gen).cuda().bfloat16().requires_grad_() for _ in range(3))
    with profile(activities=[ProfilerActivity.CPU]) as prof, attention_backends("cuda"):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out.float().sum().backward()
    names = {e.key for e in prof.key_averages()}
    assert not any("cudnn" in n for n in names) and any("flash" in n or "efficient" in n for n in names), names
    with sdpa_kernel([SDPBackend.MATH]):
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    assert rel(out, ref) < 1e-2 and q.grad is not None


def test_nf4_quantization_on_gpu_gives_the_cpu_codes():
    w = torch.randn(96, 200, generator=torch.Generator().manual_seed(4))
    cpu, gpu = quantize_nf4(w), quantize_nf4(w.cuda())
    assert gpu.packed.is_cuda and torch.equal(gpu.packed.cpu(), cpu.packed)
    assert torch.equal(gpu.absmax_q.cpu(), cpu.absmax_q)
    assert rel(dequantize_nf4(gpu), dequantize_nf4(cpu)) < 1e-6


@pytest.mark.parametrize("settings,tol", [({}, 1e-4), ({"quantize": "nf4", "bf16": True}, 2e-2)],
                         ids=["fp32", "qlora-bf16"])
def test_training_on_gpu_tracks_the_cpu_run(tmp_path, tiny_tokenizer, settings, tol):
    from lorakit.train import train

    runs = {}
    for device in ("cpu", "cuda"):
        # no dropout: the CPU and the GPU draw different masks
        cfg = tiny_train_config(tmp_path / device, **{**dict(
            max_steps=4, val_fraction=0.0, eval_every=100, saved_activations="fp32", device=device,
            lora=dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])), **settings})
        result = train(cfg, tiny_llama_for(tiny_tokenizer, initializer_range=0.3), tiny_tokenizer)
        params = {n: p.detach().cpu() for n, p in result["model"].named_parameters() if p.requires_grad}
        assert all(p.is_cuda == (device == "cuda") for n, p in result["model"].named_parameters())
        runs[device] = ([h["train_loss"] for h in result["history"]], params)
    (cpu_losses, cpu_params), (gpu_losses, gpu_params) = runs["cpu"], runs["cuda"]
    assert all(abs(g - c) / c < tol for g, c in zip(gpu_losses, cpu_losses)), (gpu_losses, cpu_losses)
    assert max(rel(gpu_params[n], cpu_params[n]) for n in cpu_params if "lora_B" in n) < 10 * tol
