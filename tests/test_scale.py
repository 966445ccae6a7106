"""Models of real shape at small size: the generated model files, the NF4 loader's peak memory, the memory
check refusing a run (both measured in their own processes, as a user runs them), and the calculator's run
model against hand-computed components."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from lorakit import calc
from lorakit.models.synthetic import shard_plan, write_synthetic_model

# Llama-shaped, with the linear layers most of the model (as at 1B+): 32 layers of 11.2 M linear weights
SMALL = calc.Arch(hidden=1024, intermediate=2816, layers=32, heads=16, kv_heads=4, vocab=400, tied=True)


@pytest.fixture(scope="module")
def generated_model(tmp_path_factory, tiny_tokenizer):
    directory = str(tmp_path_factory.mktemp("synthetic") / "small")
    write_synthetic_model(SMALL, directory, tokenizer=tiny_tokenizer, shard_bytes=100 << 20)
    return directory


def test_generated_model_has_the_architecture_s_shape_and_bf16_shards(generated_model):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(generated_model)
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.num_key_value_heads,
            config.vocab_size) == (1024, 2816, 32, 4, 400)
    index = json.load(open(os.path.join(generated_model, "model.safetensors.index.json")))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3  # written shard by shard (~100 MB each here)
    params = 0
    for shard in shards:
        with safe_open(os.path.join(generated_model, shard), framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                assert t.dtype == torch.bfloat16 and index["weight_map"][key] == shard
                params += t.numel()
                if key.endswith("q_proj.weight"):
                    assert abs(t.float().std().item() - 0.02) < 0.001  # N(0, 0.02) as at initialisation
    assert params == SMALL.base_params() == index["metadata"]["total_size"] // 2


def test_shard_plan_keeps_order_and_size():
    shapes = {f"w{i}": torch.Size([1024, 512]) for i in range(10)}  # 1 MB each in bf16
    plan = shard_plan(shapes, shard_bytes=3 << 20)
    assert [len(s) for s in plan] == [3, 3, 3, 1] and sum(plan, []) == list(shapes)


LOADER_PEAK = """
import json, sys, torch
import lorakit
from transformers import AutoConfig, AutoModelForCausalLM
from lorakit.hardware import peak_resident_gb, resident_gb
with torch.device("meta"):  # import the model's code first: its modules' memory is not the loader's
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(sys.argv[1]))
with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS: the peak from here on is the loader's
    f.write("5")
before = resident_gb() * 1e9
model = lorakit.load_model(sys.argv[1], quantize="nf4", dtype=torch.float32)
held = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
print(json.dumps({"before": before, "peak": peak_resident_gb() * 1e9, "held": held}))
"""


def test_nf4_loader_peak_stays_near_the_quantized_size(generated_model):
    """Measured in a fresh process: the loader's high-water mark above the process's RSS before loading is below
    1.3x the bytes the loaded (NF4) model holds. The bf16 files are 0.72 GB; the NF4 model ~0.19 GB."""
    out = subprocess.run([sys.executable, "-c", LOADER_PEAK, generated_model], check=True, capture_output=True,
                         text=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    file_bytes = 2 * SMALL.base_params()
    assert m["held"] < 0.3 * file_bytes  # it is quantized
    assert m["peak"] - m["before"] < 1.3 * m["held"], m


def test_run_refused_for_memory_exits_2_names_what_fits_and_writes_nothing(generated_model, tmp_path):
    """A limit between the QLoRA run's predicted peak and the fp32 run's: `lorakit train` refuses before loading,
    exit 2, one error line with the prediction and the settings that fit; the output directory is not created."""
    shape = calc.RunShape(batch=4, length=64, rank=8)
    fp32 = calc.predict_run(SMALL, shape)["total"]
    nf4 = calc.predict_run(SMALL, calc.RunShape(storage="nf4", batch=4, length=64, rank=8))["total"]
    limit = (fp32 + nf4) / 2
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "lorakit", "train", f"--model={generated_model}",
                           f"--output_dir={out}", "--prompts=null", "--bf16=false", "--batch_size=4",
                           "--max_length=64", "--lora.r=8", f"--memory_limit_gb={limit}",
                           "--gradient_checkpointing=false"],  # a fixed plan (auto would recompute layers to fit)
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "cannot fit" in errors[0] and f"{fp32:.1f} GB" in errors[0]
    assert "would fit: " in errors[0] and f"quantize: nf4 ({nf4:.1f} GB)" in errors[0]
    assert not out.exists()


def test_predict_run_components_follow_the_formula():
    """Every component from the stated per-unit costs (calc.predict_run's docstring), computed by hand."""
    arch = calc.ARCHITECTURES["llama-3-8b"]
    run = calc.RunShape(storage="nf4", batch=4, length=512, rank=16, gradient_checkpointing=True)
    got = calc.predict_run(arch, run)
    h, i, kv, n_layers = 4096, 14336, 1024, 32
    linear = n_layers * (2 * h * h + 2 * kv * h + 3 * i * h)
    assert got["weights"] == pytest.approx((linear * calc.NF4_BITS / 8 + (arch.base_params() - linear) * 2) / 1e9)
    adapter = n_layers * 16 * (2 * (h + h) + 2 * (h + kv) + 3 * (h + i))
    assert got["adapters"] == pytest.approx(adapter * 16 / 1e9)
    tokens = 2048
    one_layer = tokens * (6 * h + 2 * kv + 2.75 * i) * 4  # saved in the compute dtype (fp32) by default
    assert got["activations"] == pytest.approx((n_layers * tokens * h * 4 + one_layer) / 1e9)
    assert got["total"] == pytest.approx(sum(v for k, v in got.items() if k != "total"))
    without = calc.predict_run(arch, calc.RunShape(storage="nf4", batch=4, length=512, rank=16))
    assert without["activations"] == pytest.approx(n_layers * one_layer / 1e9)
    halved = calc.predict_run(arch, calc.RunShape(storage="nf4", batch=4, length=512, rank=16, saved_bytes=2))
    assert halved["activations"] == pytest.approx(n_layers * one_layer / 2 / 1e9)  # saved_activations: bf16
    bf16 = calc.predict_run(arch, calc.RunShape(storage="nf4", compute="bf16", batch=4, length=512, rank=16))
    assert bf16["activations"] == pytest.approx(n_layers * one_layer / 2 * calc.BF16_ACTIVATION_FACTOR / 1e9)
    for k in (1, 20, 31):  # the first k layers recompute: they keep their input, the others everything
        partial = calc.predict_run(arch, calc.RunShape(storage="nf4", batch=4, length=512, rank=16,
                                                       gradient_checkpointing=True, checkpointed_layers=k))
        assert partial["activations"] == pytest.approx((k * tokens * h * 4 + (n_layers - k) * one_layer) / 1e9)


def test_saved_activations_auto_keeps_fp32_unless_only_bf16_copies_fit(generated_model, tmp_path):
    """`saved_activations: auto` on an fp32 run: fp32 (exact) where it fits; bf16 copies, with the reason, only
    where fp32 would not fit and bf16 does; fp32 again where neither fits (the memory check then refuses it)."""
    from lorakit.train.config import TrainConfig
    from lorakit.train.memory_check import choose_saved_activations, run_shape

    cfg = TrainConfig(model=generated_model, output_dir=str(tmp_path), bf16=False, batch_size=4, max_length=64,
                      lora={"r": 8})
    peak = {saved: calc.predict_run(calc.get_arch(generated_model),
                                    run_shape(dataclasses.replace(cfg, saved_activations=saved)))["total"]
            for saved in ("fp32", "bf16")}
    assert peak["bf16"] < peak["fp32"]
    for limit, expected in ((peak["fp32"] + 1, "fp32"), ((peak["fp32"] + peak["bf16"]) / 2, "bf16"),
                            (peak["bf16"] - 0.01, "fp32")):
        saved, note = choose_saved_activations(dataclasses.replace(cfg, memory_limit_gb=limit), generated_model)
        assert saved == expected and (note is not None) == (expected == "bf16"), (limit, saved, note)
    assert choose_saved_activations(dataclasses.replace(cfg, bf16=True), generated_model) == ("auto", None)
    assert choose_saved_activations(dataclasses.replace(cfg, saved_activations="bf16"), generated_model)[0] == "bf16"


FRAGMENTING = """
import ctypes, json, sys, time
from lorakit.hardware import FreedMemoryCap, resident_gb, release_freed_memory
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def touch(p, n):
    ctypes.memset(p, 1, n)
def fragment_then_grow(n=6000, trims=None):
    # holes of 24 KB between 1 KB blocks that stay, then requests of 48 KB that fit no hole: the heap grows
    holes, pins, grown, peak = [], [], [], 0.0
    for _ in range(n):
        holes.append(libc.malloc(24 << 10)); touch(holes[-1], 24 << 10)
        pins.append(libc.malloc(1 << 10)); touch(pins[-1], 1 << 10)
    for p in holes:
        libc.free(p)
    if trims is not None:  # the holes are resident: a release below the planned level keeps them, one above it not
        before = resident_gb(); release_freed_memory(keep_gb=before + 1.0); trims.append(before - resident_gb())
        before = resident_gb(); release_freed_memory(keep_gb=before - 0.5); trims.append(before - resident_gb())
    for _ in range(n):
        grown.append(libc.malloc(48 << 10)); touch(grown[-1], 48 << 10)
        peak = max(peak, resident_gb())
        if len(grown) % 500 == 0:
            time.sleep(0.02)  # let the watcher poll
    for p in grown + pins:
        libc.free(p)
    release_freed_memory()
    return peak
start = resident_gb()
plain = fragment_then_grow() - start
with FreedMemoryCap(0.05, poll_s=0.005) as cap:
    capped = fragment_then_grow() - start
with FreedMemoryCap(0.05, poll_s=0.005, keep_gb=resident_gb() + 2.0) as kept:  # below the run's planned level
    fragment_then_grow()
trims = []
fragment_then_grow(trims=trims)
print(json.dumps({"plain": plain, "capped": capped, "releases": cap.releases, "kept_releases": kept.releases,
                  "trimmed_below_keep": trims[0], "trimmed_above_keep": trims[1]}))
"""


def test_freed_memory_cap_returns_fragmented_heap_while_memory_grows():
    """glibc's real allocator in a fresh process: 6,000 freed 24 KB holes pinned between live 1 KB blocks, then
    6,000 requests of 48 KB that fit no hole. Without the cap the holes stay resident (~0.44 GB peak above the
    start); with it (slack 0.05 GB) they are returned as the heap grows: the peak ~0.11 GB lower (0.32 GB). Below
    the level the run is planned to use (keep_gb) nothing is returned: it would be faulted back in at once; the
    same for the periodic release (`trim_memory`): the 0.15 GB of holes stay below keep_gb, go above it."""
    out = subprocess.run([sys.executable, "-c", FRAGMENTING], check=True, capture_output=True, text=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["plain"] > 0.4, m  # the holes (0.15 GB) + the grown blocks (0.29 GB) resident together
    assert m["releases"] > 0 and m["capped"] < m["plain"] - 0.08, m
    assert m["kept_releases"] == 0, m
    assert abs(m["trimmed_below_keep"]) < 0.01 and m["trimmed_above_keep"] > 0.1, m


def test_qwen_shapes_are_written_as_qwen2_with_zero_qkv_biases(tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    arch = calc.Arch(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=400, model_type="qwen2")
    write_synthetic_model(arch, str(tmp_path / "q"), tokenizer=tiny_tokenizer)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "q"))
    assert model.config.model_type == "qwen2" and model.config.tie_word_embeddings is False
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and torch.count_nonzero(attn.q_proj.bias) == 0
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    with pytest.raises(ValueError, match="llama or qwen2"):
        write_synthetic_model(calc.Arch(64, 128, 2, 4, 2, 400, model_type="gpt2"), str(tmp_path / "g"),
                              tokenizer=tiny_tokenizer)
    assert not (tmp_path / "g").exists()
