"""The pure math against independent references."""

import math

import pytest
import torch
import torch.nn.functional as F

from lorakit import functional as LF


def test_scaling_plain_and_rslora():
    assert LF.lora_scaling(32, 16) == 2.0
    assert LF.lora_scaling(32, 16, use_rslora=True) == 32 / math.sqrt(16)


def test_linear_delta_applied_as_weight_equals_low_rank_path():
    torch.manual_seed(0)
    A, B, x = torch.randn(3, 10), torch.randn(7, 3), torch.randn(4, 10)
    delta = LF.linear_delta(A, B, 0.5)
    assert torch.allclose(x @ delta.T, 0.5 * (x @ A.T) @ B.T, atol=1e-6)
    assert torch.equal(LF.linear_delta(A, B, 0.5, fan_in_fan_out=True), delta.T)


def test_embedding_delta_is_lookup_of_low_rank_path():
    torch.manual_seed(0)
    A, B = torch.randn(3, 20), torch.randn(6, 3)  # A: (r, num_embeddings), B: (dim, r)
    idx = torch.tensor([0, 5, 19])
    delta = LF.embedding_delta(A, B, 2.0)
    assert delta.shape == (20, 6)
    assert torch.allclose(delta[idx], 2.0 * F.embedding(idx, A.T) @ B.T, atol=1e-6)


@pytest.mark.parametrize("dims,kernel", [(1, (3,)), (2, (3, 3)), (2, (1, 1)), (3, (1, 3, 3))])
def test_conv_delta_as_weight_equals_two_convolutions(dims, kernel):
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    torch.manual_seed(0)
    A = torch.randn(2, 4, *kernel)
    B = torch.randn(5, 2, *([1] * dims))
    x = torch.randn(1, 4, *([6] * dims))
    delta = LF.conv_delta(A, B, 1.5)
    assert delta.shape == (5, 4, *kernel)
    assert torch.allclose(conv(x, delta), 1.5 * conv(conv(x, A), B), atol=1e-5)


def test_merge_then_unmerge_restores_weight():
    torch.manual_seed(0)
    W, d = torch.randn(16, 16), torch.randn(16, 16) * 0.01
    assert (LF.unmerge(LF.merge(W, d), d) - W).abs().max() < 1e-6


def test_merge_keeps_weight_dtype_and_adds_in_fp32():
    W = torch.randn(4, 4).bfloat16()
    d = torch.randn(4, 4)
    merged = LF.merge(W, d)
    assert merged.dtype == torch.bfloat16
    assert torch.equal(merged, (W.float() + d).bfloat16())
