"""A new adapter form is one class plus one registration: nothing in layers/, merging, multi or the
file format changes. Shown with a form defined here: ΔW = s·B diag(g) A, with a trainable gate g (r,)."""

from dataclasses import dataclass

import torch
from conftest import assert_close_fp32, randomize_adapters, tiny_llama

import lorakit
from lorakit.variants import registry
from lorakit.variants.lora import LoraForm
from lorakit.variants.lora_config import LoraConfig


class GatedForm(LoraForm):
    label = "GATED"

    def create(self, layer, name):
        super().create(layer, name)
        layer.add_param("lora_gate", name, torch.ones(layer.adapters[name].r))

    def factors(self, layer, name):
        A, B, s = super().factors(layer, name)
        return layer.lora_gate[name][:, None] * A, B, s


@dataclass
class GatedConfig(LoraConfig):
    peft_type: str = "GATED"
    PEFT_TYPE = "GATED"

    def adapter_form(self, target_shapes):
        return GatedForm(self.init_lora_weights, self.use_rslora)


def test_a_form_added_outside_the_library_works_on_every_path(tmp_path, monkeypatch):
    monkeypatch.setitem(registry.CONFIG_TYPES, "GATED", GatedConfig)  # the one registration line
    targets = ["q_proj", "v_proj", "down_proj"]
    model = lorakit.get_peft_model(tiny_llama(), GatedConfig(r=4, lora_alpha=8, target_modules=targets), "g")
    model.add_adapter("plain", LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    randomize_adapters(model, seed=5, scale=0.3)
    model.set_adapter("g")
    model.eval()
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert layer.lora_gate["g"].requires_grad
    gate, A, B = layer.lora_gate["g"], layer.lora_A["g"].weight, layer.lora_B["g"].weight
    torch.testing.assert_close(layer.delta_weight("g"), 2.0 * B @ torch.diag(gate) @ A)  # s = alpha / r

    ids = torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        assert (unmerged - base).abs().max() > 1e-3  # the form really changes the output
        model.merge_adapter()
        assert_close_fp32(model(input_ids=ids).logits, unmerged)
        model.unmerge_adapter()
        rows = ["g", "plain", None]
        mixed = model(input_ids=ids, adapter_names=rows).logits
        assert_close_fp32(mixed[0], unmerged[0])
        assert_close_fp32(mixed[2], base[2])

    model.save_adapter("g", str(tmp_path / "g"))
    loaded = lorakit.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "g")).eval()
    assert isinstance(loaded.peft_config["default"], GatedConfig)
    with torch.no_grad():
        assert_close_fp32(loaded(input_ids=ids).logits, unmerged)
