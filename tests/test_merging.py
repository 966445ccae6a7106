"""Adapter arithmetic against PEFT (linear/cat/svd) and hand-computed ties/dare/magnitude results."""

import copy

import peft
import pytest
import torch
from conftest import copy_adapters_to_peft, randomize_adapters, tiny_llama

from lorakit import LoraConfig, get_peft_model
from lorakit.adapters import arithmetic as M


def _pair():
    base = tiny_llama()
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    cfg2 = dict(r=4, lora_alpha=4, target_modules=["q_proj", "down_proj"])
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(**cfg), "x")
    ours.add_adapter("y", LoraConfig(**cfg2))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg), "x")
    theirs.add_adapter("y", peft.LoraConfig(**cfg2))
    randomize_adapters(ours, seed=0, scale=0.3)
    copy_adapters_to_peft(ours, theirs)
    return ours, theirs


@pytest.mark.parametrize("kind,kw", [("linear", {}), ("cat", {}), ("svd", {}), ("svd", {"svd_rank": 3})])
def test_linear_cat_svd_equal_peft(kind, kw):
    ours, theirs = _pair()
    ours.add_weighted_adapter(["x", "y"], [0.7, 0.5], "m", combination_type=kind, **kw)
    theirs.add_weighted_adapter(["x", "y"], [0.7, 0.5], "m", combination_type=kind, **kw)
    ours.set_adapter("m")
    theirs.set_adapter("m")
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits, theirs.eval()(input_ids=ids).logits
    assert (a - b).abs().max() < 1e-4
    assert ours.peft_config["m"].r == theirs.peft_config["m"].r


def test_ties_on_small_tensors_by_hand():
    t1 = torch.tensor([1.0, -2.0, 3.0, -0.1])
    t2 = torch.tensor([-4.0, 1.0, 0.5, 0.2])
    # density 0.5 keeps the 2 largest magnitudes: t1 -> [0,-2,3,0], t2 -> [-4,1,0,0]
    # weighted (w = 1, 1): sums per column [-4,-1,3,0] -> majority signs [-, -, +, +]
    # kept entries agreeing with the sign: col0 t2(-4); col1 t1(-2); col2 t1(3); col3 none
    out = M.combine([t1, t2], torch.tensor([1.0, 1.0]), "ties", density=0.5)
    assert torch.equal(out, torch.tensor([-4.0, -2.0, 3.0, 0.0]))


def test_magnitude_prune_and_dare_by_hand():
    t1, t2 = torch.tensor([1.0, -2.0, 3.0, -0.1]), torch.tensor([-4.0, 1.0, 0.5, 0.2])
    out = M.combine([t1, t2], torch.tensor([0.5, 2.0]), "magnitude_prune", density=0.5)
    assert torch.equal(out, 0.5 * torch.tensor([0.0, -2.0, 3.0, 0.0]) + 2.0 * torch.tensor([-4.0, 1.0, 0.0, 0.0]))
    gen = torch.Generator().manual_seed(0)
    dropped = M.random_prune_tensor(torch.ones(10000), 0.25, gen)
    assert set(dropped.unique().tolist()) == {0.0, 4.0}  # survivors rescaled by 1 / density
    assert abs(dropped.mean().item() - 1.0) < 0.05  # unbiased in expectation


def test_resize_reports_energy_and_keeps_full_rank_exactly():
    ours, _ = _pair()
    ids = torch.randint(0, 128, (1, 7))
    with torch.no_grad():
        before = ours(input_ids=ids).logits
    assert ours.resize_adapter("x", 4) == pytest.approx(1.0)
    with torch.no_grad():
        assert (ours(input_ids=ids).logits - before).abs().max() < 1e-4
    energy = ours.resize_adapter("x", 1)
    assert 0.2 < energy < 1.0 and ours.peft_config["x"].r == 1


def test_merging_errors():
    ours, _ = _pair()
    with pytest.raises(ValueError, match="combination_type .*must be one of"):
        ours.add_weighted_adapter(["x", "y"], [1, 1], "m", combination_type="avg")
    with pytest.raises(ValueError, match="needs density"):
        ours.add_weighted_adapter(["x", "y"], [1, 1], "m", combination_type="ties")
    with pytest.raises(ValueError, match="Adapter z does not exist"):
        ours.add_weighted_adapter(["x", "z"], [1, 1], "m")
    ours.add_adapter("r2", LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="equal rank"):
        ours.add_weighted_adapter(["x", "r2"], [1, 1], "m", combination_type="linear")


def test_weighted_adapter_takes_the_one_module_copy_and_refuses_two():
    """A modules_to_save copy replaces the module: the combination takes the single adapter's copy (PEFT's rule)."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    model.add_adapter("plain", LoraConfig(r=4, target_modules=["q_proj"]))
    wrapper = model.get_base_model().lm_head
    with torch.no_grad():
        wrapper.modules_to_save["default"].weight.add_(1.0)
    model.add_weighted_adapter(["default", "plain"], [1.0, 1.0], "mix", combination_type="cat")
    assert set(wrapper.modules_to_save) == {"default", "mix"}
    torch.testing.assert_close(wrapper.modules_to_save["mix"].weight, wrapper.modules_to_save["default"].weight,
                               rtol=0, atol=0)
    assert model.peft_config["mix"].modules_to_save == ["lm_head"]
    model.set_adapter("mix")
    ids = torch.randint(0, 128, (1, 5))
    with torch.no_grad():
        head_input = model.get_base_model().model(input_ids=ids).last_hidden_state
        torch.testing.assert_close(model(input_ids=ids).logits, wrapper.modules_to_save["mix"](head_input))
    model.add_adapter("other", LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with pytest.raises(ValueError, match="target the same module with modules_to_save, but found 1 such"):
        model.add_weighted_adapter(["default", "other"], [1.0, 1.0], "bad", combination_type="cat")
    with pytest.raises(ValueError, match="Only one adapter can be set at a time for ModulesToSaveWrapper"):
        model.set_adapter(["default", "other"])
    assert model.active_adapters == ["mix"]  # refused before anything changed


def test_weighted_adapters_with_per_layer_ranks_cat_exactly_and_refuse_linear_with_a_clear_error():
    config = dict(target_modules=["q_proj", "v_proj"], lora_alpha=8)
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, rank_pattern={"v_proj": 2}, **config), "a")
    model.add_adapter("b", LoraConfig(r=4, rank_pattern={"q_proj": 8}, **config))
    randomize_adapters(model, seed=2, scale=0.3)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    with pytest.raises(ValueError, match="one rank per layer.*'cat' or 'svd'"):
        model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "bad", combination_type="linear")
    assert "bad" not in model.peft_config
    model.add_weighted_adapter(["a", "b"], [0.5, 2.0], "mix", combination_type="cat")
    expected = 0.5 * layer.delta_weight("a", torch.float64) + 2.0 * layer.delta_weight("b", torch.float64)
    torch.testing.assert_close(layer.delta_weight("mix", torch.float64), expected, rtol=1e-5, atol=1e-6)
    assert layer.adapters["mix"].r == 12
