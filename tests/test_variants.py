"""DoRA, VeRA, AdaLoRA, PiSSA/OLoRA: outputs, gradients and files against PEFT; variant-specific math."""

import copy
import json

import peft
import pytest
import torch
from conftest import ConvNet, assert_close_fp32, tiny_gpt2, tiny_llama
from torch import nn

import lorakit
from lorakit import AdaLoraConfig, LoraConfig, VeraConfig, get_peft_model
from lorakit.export import export_gguf_adapter
from lorakit.variants.adalora import RankAllocator, pattern_module

LLAMA_TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


def perturb_adapters(model, seed=7, scale=0.1):
    """Move every adapter parameter off its (often zero / no-op) initial value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * scale)


def peft_name(name: str) -> str:
    """Our parameter name -> PEFT's (PEFT keeps DoRA magnitudes in a module); both start `base_model.model.`."""
    if ".lora_magnitude_vector." in name:
        return name + ".weight"
    return name


def outputs_and_grads(model, inputs, name_map=lambda n: n):
    model.train()
    model.zero_grad()
    out = model(inputs) if isinstance(inputs, torch.Tensor) and inputs.is_floating_point() else model(input_ids=inputs)
    out = out if isinstance(out, torch.Tensor) else out.logits
    (out.float() ** 2).mean().backward()
    grads = {name_map(n): p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), grads


def assert_matches_peft(ours, theirs, inputs, ada=False):
    def ours_to_peft(n):
        n = peft_name(n)
        return n.removesuffix(".weight") if ada and (".lora_A." in n or ".lora_B." in n) else n

    out_a, grads_a = outputs_and_grads(ours, inputs, ours_to_peft)
    out_b, grads_b = outputs_and_grads(theirs, inputs)
    assert_close_fp32(out_a, out_b)
    assert set(grads_a) == set(grads_b), sorted(set(grads_a) ^ set(grads_b))[:6]
    for n in grads_a:
        assert_close_fp32(grads_a[n], grads_b[n], msg=n)


def round_trip(base, ours_config, inputs, tmp_path, peft_kwargs=None, ada=False):
    """ours -> file -> PEFT (equal outputs+grads) -> file -> ours (equal outputs)."""
    ours = get_peft_model(copy.deepcopy(base), ours_config)
    perturb_adapters(ours)
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours", is_trainable=True,
                                            **(peft_kwargs or {}))
    assert_matches_peft(ours, theirs, inputs, ada=ada)
    theirs.save_pretrained(tmp_path / "theirs")
    back = lorakit.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "theirs")).eval()
    ours.eval()
    with torch.no_grad():
        a, b = ours(inputs) if inputs.is_floating_point() else ours(input_ids=inputs).logits, \
            back(inputs) if inputs.is_floating_point() else back(input_ids=inputs).logits
    assert_close_fp32(a, b)
    return ours, theirs


# --- DoRA ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_dora_llama_equals_peft(tmp_path, ids, dropout):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, use_dora=True, lora_dropout=dropout)
    ours = get_peft_model(copy.deepcopy(tiny_llama()), cfg)
    perturb_adapters(ours)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    torch.manual_seed(0)
    a = outputs_and_grads(ours, ids, peft_name)
    torch.manual_seed(0)  # same dropout masks: both draw one mask per layer with nn.Dropout
    b = outputs_and_grads(theirs, ids)
    assert_close_fp32(a[0], b[0])
    for n in b[1]:
        assert_close_fp32(a[1][n], b[1][n], msg=n)


def test_dora_round_trips_on_gpt2_and_conv(tmp_path, ids):
    gpt2 = tiny_gpt2()
    for m in gpt2.modules():  # outputs_and_grads runs in train mode: no base-model dropout
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    round_trip(gpt2, LoraConfig(r=4, target_modules=["c_attn", "c_proj"], use_dora=True,
                                       fan_in_fan_out=True), ids, tmp_path / "gpt2")
    torch.manual_seed(0)
    net, x = ConvNet().eval(), torch.randn(2, 3, 16, 16)
    round_trip(net, LoraConfig(r=2, target_modules=["conv1", "conv2", "conv1d", "conv3d", "head"], use_dora=True),
               x, tmp_path / "conv")


def test_dora_on_embeddings_equals_peft_both_ways(tmp_path, ids):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], use_dora=True)
    ours, _ = round_trip(tiny_llama(), cfg, ids, tmp_path)
    layer = ours.get_base_model().model.embed_tokens
    assert layer.lora_magnitude_vector["default"].shape == (layer.out_features,)  # one magnitude per dimension


def test_dora_starts_as_the_base_model_and_merges_exactly(ids):
    base = tiny_llama()
    with torch.no_grad():
        ref = base(ids).logits
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=LLAMA_TARGETS, use_dora=True))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref, atol=1e-5, rtol=0)
    perturb_adapters(model)
    model.eval()
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        assert (unmerged - ref).abs().max() > 1e-2  # the adapter does something
        model.merge_adapter()
        assert_close_fp32(model(input_ids=ids).logits, unmerged)
        model.unmerge_adapter()
        restored = {n.replace(".base_layer", ""): p for n, p in model.get_base_model().named_parameters()
                    if "lora_" not in n}
        for n, q in base.named_parameters():
            assert_close_fp32(restored[n], q)
        plain = model.merge_and_unload()
        assert_close_fp32(plain(ids).logits, unmerged)


def test_dora_magnitude_is_the_only_change_of_column_norms():
    """The merged DoRA weight has exactly the magnitude vector as its per-output-unit norm."""
    lin = nn.Linear(16, 8)
    model = get_peft_model(nn.Sequential(lin), LoraConfig(r=2, target_modules=["0"], use_dora=True))
    perturb_adapters(model)
    m = model.get_base_model()[0].lora_magnitude_vector["default"].detach().clone()
    model.merge_adapter()
    assert_close_fp32(model.get_base_model()[0].base_layer.weight.norm(dim=1), m)


# --- PiSSA / OLoRA ----------------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_svd_inits_start_at_the_base_model(ids, init):
    base = tiny_llama()
    with torch.no_grad():
        ref = base(ids).logits
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS,
                                                           init_lora_weights=init))
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert layer.lora_B["default"].weight.abs().max() > 0.01  # not a zero init
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_svd_init_factors_equal_peft(init):
    ours = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS,
                                                   init_lora_weights=init))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS,
                                                                init_lora_weights=init))
    a = {n: p for n, p in ours.get_base_model().named_parameters()}
    b = {n.removeprefix("base_model.model."): p for n, p in theirs.named_parameters()}
    for n, p in a.items():
        q = b[n]
        if init == "pissa" and ".lora_" in n:  # singular vectors are defined up to sign: compare B@A per layer
            continue
        assert_close_fp32(p, q, msg=n)
    for layer_name, layer in ours.get_base_model().named_modules():
        if isinstance(layer, lorakit.layers.LoraLinear):
            theirs_layer = theirs.get_base_model().get_submodule(layer_name)
            assert_close_fp32(layer.delta_weight("default"), theirs_layer.get_delta_weight("default"))


def test_pissa_converts_to_a_plain_lora_on_the_original_base(tmp_path, ids):
    base = tiny_llama()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS,
                                                           init_lora_weights="pissa"))
    model.save_pretrained(tmp_path / "init")  # the initial factors, before training
    perturb_adapters(model, scale=0.05)       # stands in for training
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    saved = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] is True and saved["r"] == 8 and saved["lora_alpha"] == 16
    for loader in (lorakit.PeftModel.from_pretrained, peft.PeftModel.from_pretrained):
        converted = loader(copy.deepcopy(base), str(tmp_path / "lora")).eval()
        with torch.no_grad():
            torch.testing.assert_close(converted(input_ids=ids).logits, trained, atol=1e-4, rtol=1e-4)


# --- VeRA ---------------------------------------------------------------------------------------------
def test_vera_projections_equal_peft_and_outputs_match(tmp_path, ids):
    cfg = VeraConfig(r=4, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"], projection_prng_key=5)
    ours, theirs = round_trip(tiny_llama(), cfg, ids, tmp_path)
    layer = ours.get_base_model().model.layers[0].mlp.down_proj
    proj = layer.adapters["default"].form.projections
    theirs_layer = theirs.get_base_model().model.layers[0].mlp.down_proj
    torch.testing.assert_close(proj.A, theirs_layer.vera_A["default"], atol=0, rtol=0)
    torch.testing.assert_close(proj.B, theirs_layer.vera_B["default"], atol=0, rtol=0)
    n_trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    # λ_d (r) + λ_b (d_out) per target: q 32, v 16, gate 64, down 32, two layers
    assert n_trainable == 2 * (4 * 4 + 32 + 16 + 64 + 32)


def test_vera_without_saved_projection_regenerates_them(tmp_path, ids):
    cfg = VeraConfig(r=4, target_modules=["q_proj", "v_proj"], save_projection=False, projection_prng_key=11)
    round_trip(tiny_llama(), cfg, ids, tmp_path)
    from safetensors.torch import load_file
    assert not [k for k in load_file(tmp_path / "ours" / "adapter_model.safetensors") if "vera_A" in k]


# --- AdaLoRA ------------------------------------------------------------------------------------------
def ada_config(**kw):
    base = dict(init_r=6, target_r=2, tinit=2, tfinal=3, deltaT=1, total_step=12, lora_alpha=8,
                target_modules=["q_proj", "v_proj", "up_proj"])
    return base | kw


def test_adalora_outputs_and_grads_equal_peft(tmp_path, ids):
    round_trip(tiny_llama(), AdaLoraConfig(**ada_config()), ids, tmp_path, ada=True)


def test_adalora_on_conv2d_equals_peft_and_merges_exactly(tmp_path):
    """PEFT's SVDConv2d: ΔW = s·B diag(E) A reshaped to the kernel; outputs, gradients and files as PEFT's."""
    torch.manual_seed(0)
    net, x = ConvNet().eval(), torch.randn(2, 3, 16, 16)
    config = AdaLoraConfig(**ada_config(target_modules=["conv1", "conv2", "head"]))
    ours, _ = round_trip(net, config, x, tmp_path, ada=True)
    with torch.no_grad():
        merged = copy.deepcopy(ours).merge_and_unload()(x)
        assert_close_fp32(merged, ours(x))
    with pytest.raises(ValueError, match="Conv2d layers with groups=1 only"):
        get_peft_model(ConvNet(), AdaLoraConfig(**ada_config(target_modules=["conv1d"])))


def test_adalora_schedule_reaches_the_target_budget_and_peft_reads_it(tmp_path, ids):
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), AdaLoraConfig(**ada_config()))
    perturb_adapters(model)
    allocator = RankAllocator(model, "default")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(12):
        out = model(input_ids=ids, labels=ids)  # loss includes the orthogonality regulariser, as in PEFT
        out.loss.backward()
        opt.step()
        allocator.update_and_allocate(model, step)
        opt.zero_grad()
        losses.append(out.loss.item())
    config = model.peft_config["default"]
    masks = config.rank_pattern
    n_targets = 2 * 3
    assert len(masks) == n_targets
    assert sum(sum(m) for m in masks.values()) == config.target_r * n_targets  # the budget, exactly
    for key, mask in masks.items():
        E = model.get_base_model().get_submodule(pattern_module(key)).lora_E["default"]
        assert torch.all(E[~torch.tensor(mask)] == 0)  # masked singular values stay zero
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    for loader in (lorakit.PeftModel.from_pretrained, peft.PeftModel.from_pretrained):
        loaded = loader(tiny_llama(), str(tmp_path)).eval()
        with torch.no_grad():
            assert_close_fp32(loaded(input_ids=ids).logits, ref)
    loaded = lorakit.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    assert sum(l.r["default"] for l in loaded.base_model._layers()) == config.target_r * n_targets


def test_adalora_orthogonality_regulariser_equals_peft(ids):
    ours = get_peft_model(tiny_llama(), AdaLoraConfig(**ada_config()))
    perturb_adapters(ours)
    theirs = peft.get_peft_model(tiny_llama(), peft.AdaLoraConfig(**ada_config(), task_type="CAUSAL_LM"))
    sd = {peft_name(n).removesuffix(".weight") if ".lora_" in n else n: p for n, p in ours.state_dict().items()}
    result = theirs.load_state_dict({k: v for k, v in sd.items() if ".lora_" in k}, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys[:3]
    ours_loss = ours(input_ids=ids, labels=ids).loss  # both add the regulariser inside forward
    theirs_loss = theirs(input_ids=ids, labels=ids).loss
    assert_close_fp32(ours_loss, theirs_loss)
    with torch.no_grad():
        plain = ours.get_base_model()(input_ids=ids, labels=ids).loss
    assert ours.regularization_loss().item() > 0.1
    assert_close_fp32(ours_loss - plain, 0.5 * ours.regularization_loss())


# --- invalid combinations fail before anything is built -------------------------------------------
@pytest.mark.parametrize("make,match", [
    (lambda: get_peft_model(nn.Sequential(nn.MultiheadAttention(8, 2)), LoraConfig(r=2, target_modules=["0"],
                                                                                    use_dora=True)), "DoRA"),
    (lambda: get_peft_model(tiny_llama(), VeraConfig(target_modules=["embed_tokens"])), "VERA adapters support"),
    (lambda: get_peft_model(tiny_llama(), AdaLoraConfig(target_modules=["q_proj"])), "total_step"),
    (lambda: get_peft_model(tiny_llama(), LoraConfig(target_modules=["embed_tokens"], init_lora_weights="olora")),
     "Linear"),
    (lambda: AdaLoraConfig(init_r=4, target_r=8, total_step=10), "target_r"),
    (lambda: AdaLoraConfig(tinit=5, tfinal=5, total_step=10), "budgeting phase"),
    (lambda: AdaLoraConfig(use_dora=True), "AdaLoRA"),
    (lambda: VeraConfig(use_dora=True), "VeRA"),
    (lambda: VeraConfig(d_initial=0), "d_initial"),
])
def test_invalid_variant_combinations(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_failed_variant_injection_leaves_the_model_untouched():
    model = tiny_llama()
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError):
        get_peft_model(model, VeraConfig(r=4, target_modules=["q_proj", "embed_tokens"]))
    assert not any("lora" in type(m).__name__.lower() for m in model.modules())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_adapter_arithmetic_and_gguf_export_refuse_or_handle_variants(tmp_path, ids):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        model.resize_adapter("default", 2)
    with pytest.raises(ValueError, match="DoRA"):
        export_gguf_adapter(model, str(tmp_path / "a.gguf"))
    model.add_adapter("v", VeraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="VERA"):  # PEFT's AdaLoraModel raises TypeError; VeraModel has no method
        model.add_weighted_adapter(["v"], [1.0], "w", combination_type="linear")


@pytest.mark.parametrize("config", [VeraConfig(r=4, target_modules=["q_proj", "v_proj"]),
                                    AdaLoraConfig(**ada_config(target_modules=["q_proj", "v_proj"]))],
                         ids=["vera", "adalora"])
def test_mixed_batches_serve_vera_and_adalora_rows(ids, config):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("x", config)
    perturb_adapters(model, seed=1)
    model.set_adapter("x")
    perturb_adapters(model, seed=2)
    model.eval()
    rows = ["x", None, "default", "x"]
    batch = ids.repeat(2, 1)
    with torch.no_grad():
        mixed = model(input_ids=batch, adapter_names=rows).logits
        for i, name in enumerate(rows):
            if name is None:
                with model.disable_adapter():
                    alone = model(input_ids=batch[i:i + 1]).logits
            else:
                model.set_adapter(name)
                alone = model(input_ids=batch[i:i + 1]).logits
            assert_close_fp32(mixed[i:i + 1], alone)


@pytest.mark.parametrize("config", [
    VeraConfig(r=4, target_modules=["q_proj", "down_proj"]),
    AdaLoraConfig(**ada_config()),
    LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights="olora"),
    LoraConfig(r=4, target_modules=["q_proj", "down_proj"], use_dora=True, use_rslora=True),
    LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"], use_dora=True),
], ids=["vera", "adalora", "olora", "dora-rslora", "dora-embedding"])
def test_merged_equals_unmerged_for_every_variant(ids, config):
    model = get_peft_model(tiny_llama(), config)
    perturb_adapters(model)
    model.eval()
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        model.merge_adapter()
        assert_close_fp32(model(input_ids=ids).logits, unmerged)
        model.unmerge_adapter()
        assert_close_fp32(model(input_ids=ids).logits, unmerged)
        plain = model.merge_and_unload()
        assert not any(isinstance(m, lorakit.LoraLayer) for m in plain.modules())
        assert_close_fp32(plain(ids).logits, unmerged)


def test_adalora_and_lora_adapters_share_a_layer_and_keep_peft_file_keys(tmp_path, ids):
    """AdaLoRA stores bare matrices (PEFT's `lora_A.<name>`), LoRA modules (`lora_A.<name>.weight`); either
    order of adding them to one layer works, and the AdaLoRA file is unchanged by the LoRA neighbour."""
    model = get_peft_model(tiny_llama(), AdaLoraConfig(**ada_config(target_modules=["q_proj"])))
    perturb_adapters(model, seed=1)
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "alone")
    model.add_adapter("lora", LoraConfig(r=4, target_modules=["q_proj"]))
    perturb_adapters(model, seed=2)  # changes every adapter parameter, AdaLoRA's too: reload it
    model.load_adapter(str(tmp_path / "alone"), adapter_name="again")
    model.set_adapter("again")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, atol=1e-6, rtol=1e-6)
    model.save_pretrained(tmp_path / "both", selected_adapters=["again"])
    from safetensors.torch import load_file
    alone = load_file(tmp_path / "alone" / "adapter_model.safetensors")
    again = load_file(tmp_path / "both" / "again" / "adapter_model.safetensors")
    assert sorted(alone) == sorted(again) and all(torch.equal(alone[k], again[k]) for k in alone)
