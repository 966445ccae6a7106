"""Padding-free training batches (kernels/varlen_attention.py): rows laid end to end, attention per row.
Checked against the padded batch (loss and every adapter gradient), the per-row attention against masked
attention (gradcheck, float64), the fallback against transformers' sdpa, and the loop against padding_free: false."""

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from conftest import randomize_adapters, tiny_train_config

import lorakit
from lorakit.kernels import varlen_attention as V
from lorakit.train.loss import TOKEN_MULTIPLE, CausalLMLoss


def _llama(**kw):
    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(**{**dict(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256), **kw})).eval()


def _batch(lengths, seed=1):
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, 96, (len(lengths), width), generator=gen)
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100  # a prompt: no loss on the first two tokens
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _loss_and_grads(model, batch):
    loss = CausalLMLoss(model)(**batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_padding_free_batch_equals_the_padded_batch(family, monkeypatch):
    """Same loss (sum over the same targets) and every adapter gradient (< 1e-5 relative, fp32), GQA and q/k/v
    biases included; attention ran once per row (SDPA calls = layers x rows), not over the packed row."""
    build = _llama if family == "llama" else (lambda: T.Qwen2ForCausalLM(T.Qwen2Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256)).eval())
    torch.manual_seed(0)
    base = build()
    batch = _batch([7, 12, 3, 9])
    results = []
    for padding_free in (False, True):
        model_base = copy.deepcopy(base)
        if padding_free:
            assert V.use_varlen_attention(model_base) and model_base.config._attn_implementation == V.VARLEN
        model = lorakit.get_peft_model(model_base, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        randomize_adapters(model, seed=2, scale=0.1)
        calls = []
        real_sdpa = F.scaled_dot_product_attention
        monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(a[0].shape) or
                            real_sdpa(*a, **k))
        results.append(_loss_and_grads(model, batch))
        monkeypatch.setattr(F, "scaled_dot_product_attention", real_sdpa)
        if padding_free:
            filler = [(-31) % TOKEN_MULTIPLE] if 31 % TOKEN_MULTIPLE else []  # rounds 31 tokens up (unpad_batch)
            assert [c[2] for c in calls] == ([7, 12, 3, 9] + filler) * 2  # per row, per layer
    (loss_pad, grads_pad), (loss_free, grads_free) = results
    assert torch.allclose(loss_free, loss_pad, rtol=1e-6)
    for name, grad in grads_pad.items():
        assert (grads_free[name] - grad).abs().max() <= 1e-5 * grad.abs().max(), name


def test_unpad_batch_layout():
    batch = _batch([3, 5, 2])
    packed = V.unpad_batch(batch["input_ids"], batch["labels"], batch["attention_mask"])
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 0, 1]]
    assert packed["input_ids"].tolist() == [batch["input_ids"][0, :3].tolist() + batch["input_ids"][1, :5].tolist()
                                            + batch["input_ids"][2, :2].tolist()]
    assert [packed["labels"][0, i].item() for i in (0, 3, 8)] == [-100, -100, -100]  # each row's first token
    assert V._segments(packed["position_ids"]) == [3, 5, 2]
    assert V._segments(torch.arange(6)[None]) is None  # one row: no restart, the plain sdpa path


def test_unpad_batch_rounds_up_with_a_filler_segment_that_carries_no_label():
    batch = _batch([3, 5, 2])
    plain = V.unpad_batch(batch["input_ids"], batch["labels"], batch["attention_mask"])
    packed = V.unpad_batch(batch["input_ids"], batch["labels"], batch["attention_mask"], multiple=16)
    assert packed["input_ids"].shape == (1, 16)
    for key in ("input_ids", "labels", "position_ids"):
        assert torch.equal(packed[key][:, :10], plain[key])
    assert packed["labels"][0, 10:].tolist() == [-100] * 6 and packed["position_ids"][0, 10:].tolist() == list(range(6))
    assert V._segments(packed["position_ids"]) == [3, 5, 2, 6]
    assert V.unpad_batch(batch["input_ids"], batch["labels"], batch["attention_mask"], multiple=5)["input_ids"].shape \
        == (1, 10)  # already a multiple: no filler


def test_per_row_attention_gradcheck_against_block_diagonal_masked_attention():
    """float64 gradcheck of the per-row attention; equal to SDPA over the packed row with a block-diagonal causal
    mask (what transformers builds for packed sequences)."""
    torch.manual_seed(0)
    segments = [3, 4, 2]
    total = sum(segments)

    class Attn(torch.nn.Module):
        num_key_value_groups, is_causal, training = 2, True, False

    q = torch.randn(1, 4, total, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, total, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, total, 8, dtype=torch.float64, requires_grad=True)
    positions = torch.cat([torch.arange(n) for n in segments])[None]

    def ours(q, k, v):
        return V.varlen_attention_forward(Attn(), q, k, v, None, scaling=0.3, position_ids=positions)[0]

    torch.autograd.gradcheck(ours, (q, k, v))
    row = torch.repeat_interleave(torch.arange(len(segments)), torch.tensor(segments))
    mask = (row[:, None] == row[None]) & (torch.arange(total)[:, None] >= torch.arange(total)[None])
    reference = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                               attn_mask=mask, scale=0.3).transpose(1, 2)
    assert torch.allclose(ours(q, k, v), reference, atol=1e-12)


def test_varlen_model_equals_sdpa_outside_padding_free_batches(tiny_tokenizer):
    """A switched model computes what sdpa computes for everything else: padded batches with a mask, and
    generation with a KV cache (same greedy tokens)."""
    base = _llama()
    switched = copy.deepcopy(base)
    V.use_varlen_attention(switched)
    batch = _batch([5, 9])
    with torch.no_grad():
        for model in (base, switched):
            model.generation_config.pad_token_id = 0
        expected = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = switched(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert torch.equal(got, expected)
        prompt = batch["input_ids"][:1, :5]
        assert torch.equal(switched.generate(prompt, max_new_tokens=6, do_sample=False),
                           base.generate(prompt, max_new_tokens=6, do_sample=False))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_loop_padding_free_equals_padded(tmp_path, tiny_tokenizer, checkpointing):
    """The loop with padding_free (default) against padding_free: false: same losses over 3 steps (fp32 activations),
    with gradient checkpointing too (the recomputed attention sees the same packed position ids)."""
    from conftest import tiny_llama_for

    from lorakit.train import train

    finals = []
    for padding_free in (True, False):
        cfg = tiny_train_config(tmp_path / str(padding_free), max_steps=3, padding_free=padding_free,
                                saved_activations="fp32", gradient_checkpointing=checkpointing,
                                lora=dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
        model = tiny_llama_for(tiny_tokenizer)
        out = train(cfg, model=model, tokenizer=tiny_tokenizer)
        assert (model.config._attn_implementation == V.VARLEN) == padding_free
        finals.append([r["train_loss"] for r in out["history"] if "train_loss" in r])
    assert len(finals[0]) == 3
    for a, b in zip(*finals):
        assert abs(a - b) / b < 1e-5


def test_row_lengths_are_never_taken_from_an_earlier_tensor():
    """Row lengths are remembered per tensor; a new position-id tensor (even one built where a freed one lived, with
    the same id) is read afresh (the CI failure this guards against: stale lengths from a freed tensor)."""
    for lengths in ([3, 5], [4, 4], [2, 6], [8]):
        positions = torch.cat([torch.arange(n) for n in lengths])[None]
        assert V._segments(positions) == (lengths if len(lengths) > 1 else None)
        del positions
    positions = torch.cat([torch.arange(3), torch.arange(5)])[None]
    assert V._segments(positions) == [3, 5]
    positions[0, 3] = 7  # written in place: the version changes, the lengths are read again
    assert V._segments(positions) is None  # one row now (a single restart at 0)


@pytest.mark.parametrize("rates, fp32", [({"bf16": 17.6, "fp32": 37.3}, True),    # an AVX-512-BF16 EPYC
                                         ({"bf16": 60.0, "fp32": 35.0}, False),   # bf16 attention faster
                                         ({"bf16": 30.0, "fp32": 32.0}, False)])  # within the margin
def test_a_timing_table_picks_the_attention_dtype(rates, fp32, monkeypatch):
    from lorakit.kernels import attention_dtype as A
    from lorakit.train import setup
    from lorakit.train.config import TrainConfig
    from lorakit.train.distributed import Env

    assert A.attention_in_fp32(rates) is fp32
    monkeypatch.setattr(A, "cpu_attention_rates", lambda: rates)
    monkeypatch.setattr(setup, "attention_in_fp32", lambda: A.attention_in_fp32(rates))
    monkeypatch.setattr(setup, "attention_dtype_note", lambda fp32: A.attention_dtype_note(fp32, rates))
    cfg, notes, _, _ = setup.resolve_run_settings(TrainConfig(memory_check=False, bf16=True), Env())
    assert cfg.attention_fp32 is fp32
    assert [n for n in notes if n.startswith("attention: ")] == [
        f"attention: {'fp32 (bf16 inputs cast)' if fp32 else 'bf16'} for padding-free rows (measured on this CPU: "
        f"bf16 {rates['bf16']:g}, cast to fp32 {rates['fp32']:g} GFLOP/s)"]
    for settings in (dict(bf16=False), dict(bf16=True, padding_free=False), dict(bf16=True, attention_fp32=False)):
        cfg, notes, _, _ = setup.resolve_run_settings(TrainConfig(memory_check=False, **settings), Env())
        assert cfg.attention_fp32 is False and not [n for n in notes if n.startswith("attention: ")]
    with pytest.raises(ValueError, match="attention_fp32 must be true, false or 'auto', got 'fp16'"):
        TrainConfig(attention_fp32="fp16")


def test_bf16_rows_marked_for_fp32_attention_are_computed_in_fp32_and_returned_in_bf16():
    """Marked attention modules run each row's SDPA on the bf16 inputs cast to fp32: bit-identical to that
    reference, bf16 out and bf16 gradients in; the unmarked module computes in bf16 (a different rounding)."""
    from lorakit.kernels.attention_dtype import set_attention_dtype

    torch.manual_seed(0)
    segments = [37, 50, 41]

    class Attn(torch.nn.Module):
        num_key_value_groups, is_causal, training = 3, True, True

    marked, plain = Attn(), Attn()
    assert set_attention_dtype(marked, torch.float32) == 1
    q, k, v = (torch.randn(1, heads, sum(segments), 64, dtype=torch.bfloat16, requires_grad=True)
               for heads in (6, 2, 2))
    positions = torch.cat([torch.arange(n) for n in segments])[None]

    def attend(module, q, k, v):
        return V.varlen_attention_forward(module, q, k, v, None, scaling=0.125, position_ids=positions)[0]

    out = attend(marked, q, k, v)
    reference = torch.cat([F.scaled_dot_product_attention(a.float(), b.float(), c.float(), is_causal=True, scale=0.125,
                                                          enable_gqa=True)
                           for a, b, c in zip(q.split(segments, 2), k.split(segments, 2), v.split(segments, 2))], 2)
    assert out.dtype == torch.bfloat16 and torch.equal(out, reference.bfloat16().transpose(1, 2))
    assert not torch.equal(attend(plain, q, k, v), out)
    out.float().square().sum().backward()
    assert q.grad.dtype == torch.bfloat16 and k.grad.dtype == torch.bfloat16 and q.grad.abs().sum() > 0
