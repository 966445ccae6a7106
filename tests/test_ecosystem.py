"""lorakit inside TRL and transformers (issue 45): the scripts of tests/ecosystem_scenarios.py run once on the real
peft and once on lorakit (`install_as_peft()`), each in its own process; per-step losses, saved folders and
logits are compared here. Plus: the switch's import surface, its refusal when the real peft is already imported,
and the one-sentence error TRL gives for a lorakit object without the switch.

Tolerances: the TRL runs train under TRL's default bf16 autocast, where lorakit follows PEFT's order of ops (so
the same roundings); the fp32 runs (sft_fp32, the plain Trainer) go through lorakit's fused kernel, which sums in a
different order than PEFT's two matmuls: float32 rounding, far under the 1e-4 relative the issue allows.
Reloaded folders are compared at 1e-5 absolute on logits of order 1 (float32 evaluation of the same tensors).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

HERE = os.path.dirname(__file__)
SCRIPT = os.path.join(HERE, "ecosystem_scenarios.py")
TRL_AND_TRAINER = ["sft_peft_config", "sft_wrapped_model", "sft_fp32", "dpo_no_ref_model", "kto_peft_config",
                   "grpo_peft_config", "trainer_save_resume_best"]
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}


def run_python(*args, env=None):
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def scenarios(out, *flags):
    os.makedirs(out, exist_ok=True)
    run_python(SCRIPT, str(out), *flags)
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ecosystem")
    results = {"peft": scenarios(root / "peft"), "lorakit": scenarios(root / "lorakit", "--lorakit"),
               "direct": scenarios(root / "direct", "--lorakit-direct", "--only", "trainer_save_resume_best")}
    for kind in ("lorakit", "direct"):  # every folder lorakit wrote, loaded by the real peft
        results[f"{kind}_loaded"] = json.loads(run_python(SCRIPT, "--load-check", str(root / kind / "results.json")))
    return results


def rel(a, b):
    return float(np.max(np.abs(np.array(a) - np.array(b)) / np.abs(np.array(a))))


def gap(a, b):
    return float(np.max(np.abs(np.array(a, dtype=np.float64) - np.array(b, dtype=np.float64))))


@pytest.mark.parametrize("name", TRL_AND_TRAINER)
def test_losses_equal_peft_step_by_step(runs, name):
    theirs, ours = runs["peft"][name], runs["lorakit"][name]
    assert len(ours["losses"]) == len(theirs["losses"]) >= 3
    assert rel(theirs["losses"], ours["losses"]) < 1e-4, (theirs["losses"], ours["losses"])
    assert ours["model_class"] == "lorakit" and theirs["model_class"] == "peft"  # each ran on its library


@pytest.mark.parametrize("name", TRL_AND_TRAINER)
def test_saved_folder_is_an_adapter_that_real_peft_loads_to_the_trained_logits(runs, name):
    ours = runs["lorakit"][name]
    assert ADAPTER_FILES <= set(ours["files"]) and "model.safetensors" not in ours["files"]
    assert set(ours["files"]) == set(runs["peft"][name]["files"])
    assert gap(runs["lorakit_loaded"][name]["saved"], ours["logits"]) < 1e-5
    assert gap(ours["logits"], runs["peft"][name]["logits"]) < 1e-4  # and the trained model is PEFT's


@pytest.mark.parametrize("kind", ["lorakit", "direct"])
def test_trainer_checkpoints_resume_bit_exact_and_reload_the_best(runs, kind):
    """Plain transformers Trainer, with the switch and without it (`import lorakit` only)."""
    ours, loaded = runs[kind]["trainer_save_resume_best"], runs[f"{kind}_loaded"]["trainer_save_resume_best"]
    assert ADAPTER_FILES <= set(ours["checkpoint_files"]) and "model.safetensors" not in ours["checkpoint_files"]
    assert ours["resumed_losses"] == ours["losses"]  # steps 3-6 after resuming from checkpoint-2: bit-exact
    full, resumed = (load_file(os.path.join(ours["dirs"][f"{run}/checkpoint-6"], "adapter_model.safetensors"))
                     for run in ("full", "resumed"))
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
    # load_best_model_at_end (best = highest eval loss here, so not the last checkpoint): the trained model is
    # checkpoint-2's adapter, and visibly not checkpoint-6's
    assert ours["best"] == runs["peft"]["trainer_save_resume_best"]["best"] == "full/checkpoint-2"
    assert gap(loaded["full/checkpoint-2"], ours["logits"]) < 1e-5
    assert gap(loaded["full/checkpoint-6"], ours["logits"]) > 1e-2
    assert rel(runs["peft"]["trainer_save_resume_best"]["losses"], ours["losses"]) < 1e-4


def test_tied_embeddings_and_a_reference_adapter_are_saved_as_peft_saves_them(runs):
    """The tiny base ties lm_head to embed_tokens (as SmolLM2 does); DPO without ref_model adds TRL's 'ref'."""
    for name in TRL_AND_TRAINER:
        assert "model.safetensors" not in runs["lorakit"][name]["files"]
    assert "ref" in runs["lorakit"]["dpo_no_ref_model"]["files"]


def test_transformers_adapter_api_gives_peft_logits(runs):
    theirs, ours = (runs[kind]["transformers_adapter_api"]["cells"] for kind in ("peft", "lorakit"))
    assert ours.keys() == theirs.keys()
    for cell, value in theirs.items():
        if cell in ("active_adapters", "adapter_state_keys"):
            assert ours[cell] == value, cell
        else:
            assert gap(ours[cell], value) < 1e-5, cell
    assert gap(ours["disable_adapters"], ours["base"]) < 1e-6  # the cells differ from each other: a real check
    assert gap(ours["load_adapter"], ours["base"]) > 1e-1 and gap(ours["add_adapter+set_adapter"], ours["base"]) > 1e-2
    assert gap(runs["lorakit_loaded"]["transformers_adapter_api"]["saved"], ours["load_adapter"]) < 1e-5


# --- the switch itself -------------------------------------------------------------------------------------------

SURFACE = """
import importlib, importlib.metadata, json, lorakit
lorakit.install_as_peft()
import peft
from peft import (PeftConfig, PeftModel, PeftMixedModel, LoraConfig, PeftType, PrefixTuningConfig,
                  PromptLearningConfig, get_peft_model, inject_adapter_in_model, get_peft_model_state_dict,
                  set_peft_model_state_dict, prepare_model_for_kbit_training)
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from peft.utils.other import fsdp_auto_wrap_policy, AuxiliaryTrainingWrapper
from peft.functional import delete_adapter
from peft.utils.transformers_weight_conversion import build_peft_weight_mapping
import trl, transformers.trainer
from transformers.utils import is_peft_available
try:
    PrefixTuningConfig(num_virtual_tokens=4)
    prefix = None
except NotImplementedError as e:
    prefix = str(e)
print(json.dumps({"version": peft.__version__, "metadata": importlib.metadata.version("peft"),
                  "peft_model": PeftModel.__module__, "lora_layer": LoraLayer.__module__,
                  "config": LoraConfig.__module__, "available": is_peft_available(), "prefix": prefix,
                  "real_peft_loaded": any(getattr(m, "__file__", None) and "site-packages/peft" in m.__file__
                                          for m in list(__import__("sys").modules.values()) if m)}))
"""


def site_packages_listing():
    import site

    return {p: sorted(os.listdir(p)) for p in site.getsitepackages() if os.path.isdir(p)}


def test_install_as_peft_answers_what_trl_and_transformers_import_without_touching_disk():
    before = site_packages_listing()
    got = json.loads(run_python("-c", SURFACE).strip().splitlines()[-1])
    assert got["peft_model"].startswith("lorakit.") and got["lora_layer"].startswith("lorakit.")
    assert got["config"].startswith("lorakit.") and got["available"] and not got["real_peft_loaded"]
    from packaging.version import Version
    from transformers.integrations.peft import MIN_PEFT_VERSION

    assert got["version"] == got["metadata"] and Version(got["version"]) >= Version(MIN_PEFT_VERSION)
    assert got["prefix"] and "prefix tuning" in got["prefix"].lower() and "lorakit" in got["prefix"]
    assert site_packages_listing() == before


def test_environment_switch_runs_an_unchanged_peft_script():
    out = run_python("-c", "import lorakit, peft, json; print(json.dumps([peft.PeftModel.__module__, "
                           "peft.__lorakit__]))", env={"LORAKIT_AS_PEFT": "1"})
    module, flag = json.loads(out.strip().splitlines()[-1])
    assert module.startswith("lorakit.") and flag is True


def test_an_unchanged_script_runs_on_lorakit_through_the_runner(runs, tmp_path):
    """`python -m lorakit.as_peft SCRIPT ARGS`: the scenario script with no lorakit flag, as a PEFT user has it."""
    run_python("-m", "lorakit.as_peft", SCRIPT, str(tmp_path), "--only", "sft_peft_config")
    with open(tmp_path / "results.json") as f:
        got = json.load(f)["sft_peft_config"]
    assert got["model_class"] == "lorakit"
    assert rel(runs["peft"]["sft_peft_config"]["losses"], got["losses"]) < 1e-4


def test_install_as_peft_refuses_when_the_real_peft_is_imported():
    code = ("import peft, lorakit\ntry:\n    lorakit.install_as_peft()\nexcept RuntimeError as e:\n    print('REFUSED', e)\n"
            "import sys; print('STILL', sys.modules['peft'].__file__)")
    out = run_python("-c", code)
    assert "REFUSED install_as_peft(): the real peft package is already imported" in out
    assert "site-packages/peft" in out.split("STILL", 1)[1]  # nothing was swapped


def tiny_base(tiny_tokenizer):
    from conftest import tiny_llama_for

    return tiny_llama_for(tiny_tokenizer)


def test_trl_without_the_switch_names_install_as_peft_for_a_lorakit_config(tiny_tokenizer):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    import lorakit

    rows = Dataset.from_list([{"text": "hello there"}] * 4)
    args = SFTConfig(output_dir="unused", report_to=[], use_cpu=True, max_steps=1)
    with pytest.raises(TypeError, match=r"lorakit config \(LoraConfig\).*lorakit\.install_as_peft\(\)") as err:
        SFTTrainer(model=tiny_base(tiny_tokenizer), args=args, train_dataset=rows, processing_class=tiny_tokenizer,
                   peft_config=lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    assert "\n" not in str(err.value)  # one sentence, not TRL's traceback


def test_trl_without_the_switch_names_install_as_peft_for_a_lorakit_model(tiny_tokenizer):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    import lorakit

    model = lorakit.get_peft_model(tiny_base(tiny_tokenizer), lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    rows = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}] * 4)
    args = DPOConfig(output_dir="unused", report_to=[], use_cpu=True, max_steps=1)
    with pytest.raises(TypeError, match=r"DPOTrainer was given a lorakit model .*install_as_peft\(\)"):
        DPOTrainer(model=model, ref_model=None, args=args, train_dataset=rows, processing_class=tiny_tokenizer)
