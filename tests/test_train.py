"""The training loop on a tiny model: learning, resume bit-exactness, Ctrl-C, DDP, Trainer interop."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import assert_close_fp32, tiny_llama_for
from conftest import tiny_train_config as _cfg

import lorakit
from lorakit import hardware
from lorakit.train import train
from lorakit.train.setup import lr_lambda


def _adapter(result):
    return {n: p.detach().clone() for n, p in result["model"].named_parameters() if p.requires_grad}


def test_lr_schedule_warms_up_then_decays_to_floor():
    values = [lr_lambda(s, warmup=4, total=20, min_ratio=0.1) for s in range(20)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(values[3:], values[4:])) and abs(values[-1] - 0.1) < 0.01


def test_training_lowers_eval_loss_and_writes_outputs(tmp_path, tiny_tokenizer):
    result = train(_cfg(tmp_path, max_steps=20, eval_every=10), tiny_llama_for(tiny_tokenizer), tiny_tokenizer)
    evals = [r["eval_loss"] for r in result["history"] if "eval_loss" in r]
    assert result["history"][-1]["train_loss"] < result["history"][1]["train_loss"]
    assert len(evals) == 3 and evals[-1] < evals[0]  # step 0 (untrained), 10, 20
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "loss.png", "metrics.jsonl",
                 "config.yaml"):
        assert (tmp_path / name).exists(), name
    header, *lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    settings = json.loads(header)["settings"]
    assert settings["dtype_setting"] == "fp32" and settings["compute_dtype"] == "fp32" and "dtype_decision" not in settings
    assert [json.loads(l)["step"] for l in lines] == list(range(0, 21))
    peaks = [json.loads(l)["peak_memory_gb"] for l in lines[1:]]
    # a high-water mark (the kernel syncs per-thread RSS counters lazily: ~0.1 MB of wobble)
    assert all(later >= earlier - 0.01 for earlier, later in zip(peaks, peaks[1:]))
    assert peaks[-1] <= result["peak_memory_gb"] + 0.01
    assert result["peak_memory_gb"] >= 0.9 * hardware.resident_gb()


def test_the_measured_dtype_decision_is_the_first_line_of_metrics_and_survives_resume(tmp_path, tiny_tokenizer,
                                                                                     monkeypatch):
    """bf16: auto writes what it chose and the rates it measured first in metrics.jsonl; a resumed run rewrites
    the file with its own decision first, then every step once (the charts read only records with a step)."""
    rates = {"fp32": 100.0, "bf16": 350.0}
    monkeypatch.setattr(hardware, "cpu_matmul_rates", lambda: dict(rates))

    def stop_at_3(step, record):
        if step == 3:
            raise KeyboardInterrupt

    train(_cfg(tmp_path, bf16="auto", max_steps=6), tiny_llama_for(tiny_tokenizer), tiny_tokenizer, on_step=stop_at_3)
    first = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    decision = first[0]["settings"]["dtype_decision"]
    assert first[0]["settings"]["dtype_setting"] == "auto" and first[0]["settings"]["compute_dtype"] == "bf16"
    assert decision["compute_dtype"] == "bf16" and decision["gflops"] == rates and decision["cpu"] == hardware.cpu_model()
    assert [r["step"] for r in first[1:]] == [0, 1, 2, 3]
    rates.update(bf16=50.0)  # the resumed process decides (and says) for itself
    train(_cfg(tmp_path, bf16="auto", max_steps=6, resume=True), tiny_llama_for(tiny_tokenizer), tiny_tokenizer)
    resumed = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert resumed[0]["settings"]["compute_dtype"] == "fp32" and resumed[0]["settings"]["dtype_decision"]["gflops"] == rates
    assert [r["step"] for r in resumed[1:]] == [0, 1, 2, 3, 4, 5, 6]
    assert resumed[1:5] == first[1:5]


def test_prompts_are_answered_by_the_base_before_and_the_adapter_after(tmp_path, tiny_tokenizer):
    """The summary's before/after answers (what `lorakit train` prints) are the untrained model's and the trained
    model's greedy answers, at the run's max_new_tokens."""
    from lorakit.generation import answer_prompts

    prompts = ["What tent should I buy?", "Do you ship abroad?"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    model = lambda: tiny_llama_for(tiny_tokenizer, initializer_range=0.3)  # noqa: E731 (peaked logits: no ties)
    result = train(_cfg(tmp_path / "run", max_steps=4, lr=5e-2, prompts=str(tmp_path / "prompts.txt"),
                        max_new_tokens=6), model(), tiny_tokenizer)
    assert result["prompts"] == prompts
    assert result["before"] == answer_prompts(model(), tiny_tokenizer, prompts, 6)
    assert result["after"] == answer_prompts(result["model"], tiny_tokenizer, prompts, 6)
    assert result["after"] != result["before"]  # it trained (lr 5e-2 on a model with peaked logits)


def test_resume_after_interrupt_is_bit_identical(tmp_path, tiny_tokenizer):
    straight = _adapter(train(_cfg(tmp_path / "a", grad_accum=2), tiny_llama_for(tiny_tokenizer), tiny_tokenizer))

    def stop_at_5(step, record):
        if step == 5:
            raise KeyboardInterrupt

    first = train(_cfg(tmp_path / "b", grad_accum=2), tiny_llama_for(tiny_tokenizer), tiny_tokenizer,
                  on_step=stop_at_5)
    assert first["interrupted"] and first["steps"] == 5 and (tmp_path / "b" / "checkpoint.pt").exists()
    assert not (tmp_path / "b" / "adapter").exists()
    resumed = train(_cfg(tmp_path / "b", grad_accum=2, resume=True), tiny_llama_for(tiny_tokenizer), tiny_tokenizer)
    assert resumed["steps"] == 10
    got = _adapter(resumed)
    assert got.keys() == straight.keys()
    for name, value in straight.items():
        assert torch.equal(got[name], value), name


def _interrupt_during_step(model, step_to_interrupt, times=1, signum=None):
    """on_step callback + forward hook: Ctrl-C (a real SIGINT, or `signum`) arrives `times` times inside the first
    forward of optimizer step `step_to_interrupt`, i.e. mid-step, not at a step boundary."""
    import signal

    signum = signum or signal.SIGINT

    state = {"armed": False}

    def on_step(step, record):
        state["armed"] = step == step_to_interrupt - 1

    def hook(module, args):
        if state["armed"]:
            state["armed"] = False
            for _ in range(times):
                signal.raise_signal(signum)

    model.model.embed_tokens.register_forward_pre_hook(hook)  # (a module the fused kernels do not swap)
    return on_step


@pytest.mark.parametrize("lora", [dict(), dict(use_dora=True)], ids=["lora", "dora"])
def test_ctrl_c_mid_step_then_resume_equals_an_uninterrupted_run_with_dropout(tmp_path, tiny_tokenizer, lora):
    lora = dict(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"]) | lora
    straight = train(_cfg(tmp_path / "a", grad_accum=2, lora=lora), tiny_llama_for(tiny_tokenizer), tiny_tokenizer)
    assert not (tmp_path / "a" / "checkpoint.pt").exists()  # a finished run leaves no checkpoint to resume
    model = tiny_llama_for(tiny_tokenizer)
    first = train(_cfg(tmp_path / "b", grad_accum=2, lora=lora), model, tiny_tokenizer,
                  on_step=_interrupt_during_step(model, 6))
    assert first["interrupted"] and first["steps"] == 6  # the step under way when Ctrl-C came was finished
    resumed = train(_cfg(tmp_path / "b", grad_accum=2, resume=True, lora=lora), tiny_llama_for(tiny_tokenizer),
                    tiny_tokenizer)
    expected, got = _adapter(straight), _adapter(resumed)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    records = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records[1:]]  # after the settings line
    assert steps == list(range(0, 11))  # no step written twice


def test_second_ctrl_c_stops_mid_step_without_writing_a_checkpoint(tmp_path, tiny_tokenizer, capsys):
    model = tiny_llama_for(tiny_tokenizer)
    result = train(_cfg(tmp_path, grad_accum=2), model, tiny_tokenizer, on_step=_interrupt_during_step(model, 4, 2))
    assert result["interrupted"] and result["steps"] == 3
    assert not (tmp_path / "checkpoint.pt").exists() and not (tmp_path / "adapter").exists()
    assert "no checkpoint written" in capsys.readouterr().out


def test_sigusr1_asks_for_the_graceful_stop_however_often_it_comes(tmp_path, tiny_tokenizer):
    import signal

    model = tiny_llama_for(tiny_tokenizer)
    result = train(_cfg(tmp_path, grad_accum=2), model, tiny_tokenizer,
                   on_step=_interrupt_during_step(model, 4, 3, signal.SIGUSR1))
    assert result["interrupted"] and result["steps"] == 4  # the step under way finished, then a checkpoint
    assert (tmp_path / "checkpoint.pt").exists()


def test_packing_and_gradient_checkpointing_train(tmp_path, tiny_tokenizer):
    result = train(_cfg(tmp_path, packing=True, gradient_checkpointing=True, max_steps=6, lora=dict(
        r=4, lora_alpha=8, target_modules="all-linear")), tiny_llama_for(tiny_tokenizer), tiny_tokenizer)
    assert result["history"][-1]["train_loss"] < result["history"][1]["train_loss"]


def _write_yaml(path, model_dir, out_dir, **kw):
    import yaml

    cfg = dict(model=model_dir, prompts=None, output_dir=str(out_dir), max_length=64, batch_size=2, max_steps=4,
               lr=5e-3, warmup_steps=1, bf16=False, progress=False, eval_every=100,
               lora=dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    cfg.update(kw)
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _single_and_two_process_adapters(tmp_path, model_dir, port, run_kw=None, **distributed_kw):
    """Train the same config in one process (batch 4) and under torchrun with 2 processes (batch 2 each);
    return both adapters' tensors. Activations are kept in fp32 (the exact reference path): bf16-kept
    activations round values that differ in their last fp32 bits between batch shapes."""
    from safetensors.torch import load_file

    exact = dict(saved_activations="fp32", **(run_kw or {}))
    key = (model_dir, json.dumps(exact, sort_keys=True))
    if key not in _SINGLE_PROCESS:  # the same reference serves DDP and FSDP (a process start is ~8 s)
        single = _write_yaml(tmp_path / "single.yaml", model_dir, tmp_path / "single", batch_size=4, **exact)
        subprocess.run([sys.executable, "-m", "lorakit", "train", single], check=True, env=_env(),
                       capture_output=True)
        _SINGLE_PROCESS[key] = load_file(tmp_path / "single" / "adapter" / "adapter_model.safetensors")
    multi = _write_yaml(tmp_path / "multi.yaml", model_dir, tmp_path / "multi", batch_size=2, **exact,
                        **distributed_kw)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                          "-m", "lorakit", "train", multi], env=_env(), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    return _SINGLE_PROCESS[key], load_file(tmp_path / "multi" / "adapter" / "adapter_model.safetensors")


_SINGLE_PROCESS = {}  # (model dir, run settings) -> the one-process run's adapter tensors


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_two_process_ddp_equals_single_process_with_same_global_batch(tmp_path, tiny_model_dir, method):
    """DPO too: each process's reference forward (adapter off) on its own pairs; metrics summed over processes."""
    pairs = dict(method="dpo", data=os.path.join(os.path.dirname(lorakit.__file__), "data", "demo_preferences.jsonl"))
    a, b = _single_and_two_process_adapters(tmp_path, tiny_model_dir, 29533 if method == "sft" else 29534,
                                            run_kw=pairs if method == "dpo" else None)
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max() < 1e-5, key
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)  # it trained


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path, tiny_model_dir):
    import signal
    import time

    cfg = _write_yaml(tmp_path / "c.yaml", tiny_model_dir, tmp_path / "out", max_steps=100000, save_every=100000)
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "train", cfg], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "out" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):  # settings, step 0, step 1
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "checkpoint saved" in out and (tmp_path / "out" / "checkpoint.pt").exists()
    assert "Traceback" not in err


def test_transformers_trainer_with_defaults_trains_saves_and_resumes_a_peft_adapter(tmp_path, tiny_tokenizer):
    """Trainer's defaults (remove_unused_columns=True: only the columns forward names survive), dict rows, a
    mid-run checkpoint and save_model(): the saved folder is a PEFT adapter that lorakit and PEFT load to the
    trained model's logits, and a run resumed from the checkpoint ends where the uninterrupted one does."""
    import peft
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from lorakit import LoraConfig, PeftModel, get_peft_model

    def build():
        torch.manual_seed(0)
        base = tiny_llama_for(tiny_tokenizer, tie_word_embeddings=True)
        return get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))

    rows = [{"input_ids": tiny_tokenizer(f"row {i} says hello to the trainer")["input_ids"]} for i in range(24)]
    collator = DataCollatorForLanguageModeling(tiny_tokenizer, mlm=False)

    def run(out, steps, resume=None, save="steps"):
        model = build()
        args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4,
                                 learning_rate=1e-2, report_to=[], save_strategy=save, save_steps=2, use_cpu=True,
                                 seed=0, data_seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator)
        trainer.train(resume_from_checkpoint=resume)
        return model, trainer

    plain_model, _ = run(tmp_path / "plain", 2, save="no")
    assert any("lora_B" in n and p.abs().max() > 0 for n, p in plain_model.named_parameters())
    model, trainer = run(tmp_path / "full", 4)
    trainer.save_model(str(tmp_path / "saved"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "saved"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "full" / "checkpoint-2"))
    ids = torch.tensor([rows[0]["input_ids"]])
    with torch.no_grad():
        trained = model.eval()(input_ids=ids).logits
        ours = PeftModel.from_pretrained(build().unload(), str(tmp_path / "saved"))(input_ids=ids).logits
        theirs = peft.PeftModel.from_pretrained(build().unload(), str(tmp_path / "saved"))(input_ids=ids).logits
    torch.testing.assert_close(ours, trained, rtol=0, atol=0)
    assert_close_fp32(theirs, trained)
    resumed, _ = run(tmp_path / "full", 4, resume=str(tmp_path / "full" / "checkpoint-2"))
    with torch.no_grad():
        assert_close_fp32(resumed.eval()(input_ids=ids).logits, trained)


def test_qlora_training_on_nf4_base_tracks_the_float_run(tmp_path, tiny_tokenizer):
    from lorakit.quant.nf4 import NF4Linear

    kwargs = dict(max_steps=40, lr=2e-2, lora=dict(r=8, lora_alpha=16, target_modules="all-linear"))
    model = lambda: tiny_llama_for(tiny_tokenizer, initializer_range=0.3)  # noqa: E731 (can express confidence)
    full = train(_cfg(tmp_path / "f", **kwargs), model(), tiny_tokenizer)
    quant = train(_cfg(tmp_path / "q", quantize="nf4", **kwargs), model(), tiny_tokenizer)
    assert any(isinstance(m, NF4Linear) for m in quant["model"].modules())
    f_loss, q_loss = full["history"][-1]["train_loss"], quant["history"][-1]["train_loss"]
    assert q_loss < 0.8 * quant["history"][1]["train_loss"]  # it learns
    assert abs(q_loss - f_loss) / f_loss < 0.1  # stated margin: within 10 % of the fp32 run on a tiny model


def test_two_process_fsdp_trains_and_writes_the_full_adapter(tmp_path, tiny_model_dir):
    a, b = _single_and_two_process_adapters(tmp_path, tiny_model_dir, 29535, distributed="fsdp")
    for key in a:
        assert a[key].shape == b[key].shape and (a[key] - b[key]).abs().max() < 1e-4, key


def test_trim_memory_changes_nothing_but_memory(tmp_path, tiny_tokenizer):
    plain = _adapter(train(_cfg(tmp_path / "a", max_steps=3, trim_memory=False), tiny_llama_for(tiny_tokenizer),
                           tiny_tokenizer))
    trimmed = _adapter(train(_cfg(tmp_path / "b", max_steps=3, trim_memory=True), tiny_llama_for(tiny_tokenizer),
                             tiny_tokenizer))
    assert all(torch.equal(plain[k], trimmed[k]) for k in plain)


def test_bf16_saved_activations_track_the_fp32_run(tmp_path, tiny_tokenizer):
    runs = {}
    for kept in ("fp32", "bf16"):
        result = train(_cfg(tmp_path / kept, max_steps=4, saved_activations=kept), tiny_llama_for(tiny_tokenizer),
                       tiny_tokenizer)
        runs[kept] = (_adapter(result), [h["train_loss"] for h in result["history"] if "train_loss" in h])
    (ref, ref_losses), (got, losses) = runs["fp32"], runs["bf16"]
    assert losses[0] == ref_losses[0]  # step 1's forward is the same; only backward reads rounded values
    assert all(abs(a - b) / b < 1e-3 for a, b in zip(losses, ref_losses))
    drift = max(((got[n] - ref[n]).norm() / ref[n].norm()).item() for n in ref)
    assert 0 < drift < 1e-2


@pytest.mark.parametrize("lora", [
    dict(use_dora=True),
    dict(use_rslora=True),
    dict(init_lora_weights="pissa"),
    dict(peft_type="VERA", r=16, d_initial=0.1),
    dict(peft_type="ADALORA", init_r=6, target_r=2, tinit=3, tfinal=4, lora_alpha=8),
], ids=["dora", "rslora", "pissa", "vera", "adalora"])
def test_every_variant_trains_in_the_one_loop_and_its_adapter_reloads(tmp_path, tiny_tokenizer, lora):
    import lorakit

    settings = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]) | lora
    result = train(_cfg(tmp_path, max_steps=16, eval_every=8, lora=settings, lr=1e-2),
                   tiny_llama_for(tiny_tokenizer), tiny_tokenizer)
    evals = [r["eval_loss"] for r in result["history"] if "eval_loss" in r]
    assert evals[-1] < evals[0], evals
    model = result["model"].eval()
    ids = torch.tensor([[5, 9, 17, 33, 2, 8]])
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    # The saved adapter on a fresh copy of the *original* base reproduces the trained model
    # (PiSSA is saved converted to plain LoRA; AdaLoRA truncated to its rank pattern).
    reloaded = lorakit.PeftModel.from_pretrained(tiny_llama_for(tiny_tokenizer), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained, atol=1e-4, rtol=1e-4)
    config = model.peft_config["default"]
    if config.peft_type == "ADALORA":
        assert sum(sum(m) for m in config.rank_pattern.values()) == 2 * 2 * 3  # target_r x layers x targets


@pytest.mark.parametrize("settings, world_size, match", [
    (dict(resume=True, lora=dict(peft_type="ADALORA", init_r=6, target_r=2, target_modules=["q_proj"])), 1,
     "--resume is not supported for ADALORA"),
    (dict(quantize="nf4", lora=dict(init_lora_weights="pissa", target_modules=["q_proj"])), 1,
     "rewrites the base weight"),
    (dict(resume=True, distributed="fsdp"), 2, "--resume is not supported with distributed=fsdp"),
])
def test_refused_runs_are_refused_before_any_model_or_tokenizer_loads(tmp_path, monkeypatch, settings, world_size,
                                                                      match):
    import lorakit.train.setup as setup
    from lorakit.train.distributed import Env

    def must_not_load(*_, **__):
        raise AssertionError("a model or tokenizer was loaded before the run was refused")

    monkeypatch.setattr(setup, "load_model", must_not_load)
    monkeypatch.setattr(setup, "load_tokenizer", must_not_load)
    with pytest.raises(ValueError, match=match):
        cfg = _cfg(tmp_path, model=str(tmp_path / "no-such-model"), **settings)
        if world_size == 1:
            train(cfg)  # the public entry point, single process
        else:  # what each torchrun rank would see
            setup.prepare_run(cfg, Env(rank=0, world_size=world_size))
    assert not (tmp_path / "config.yaml").exists()


def test_sequence_classification_task_trains_and_peft_loads_the_adapter(tmp_path, tiny_model_dir, tiny_tokenizer):
    """task: seq_cls — {"text", "label"} rows, the model as a classifier with a new score head (saved whole, as
    PEFT's SEQ_CLS does): held-out loss falls, and PEFT loaded with the adapter gives lorakit's logits."""
    import random

    import peft
    from transformers import AutoModelForSequenceClassification

    rng = random.Random(0)
    words = {"pos": ["good", "great", "fine", "nice"], "neg": ["bad", "awful", "poor", "sad"]}
    rows = []
    for _ in range(120):
        label = rng.choice(["pos", "neg"])
        rows.append({"text": " ".join(rng.choice(words[label]) for _ in range(4)), "label": label})
    data = tmp_path / "cls.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg(tmp_path / "out", task="seq_cls", model=tiny_model_dir, data=str(data), max_steps=30, lr=1e-2,
               eval_every=30, lora=dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    result = train(cfg, tokenizer=tiny_tokenizer)
    evals = [r["eval_loss"] for r in result["history"] if "eval_loss" in r]
    assert evals[-1] < 0.5 * evals[0], evals
    assert json.loads((tmp_path / "out" / "labels.json").read_text()) == {"id2label": {"0": "neg", "1": "pos"}}
    ids = tiny_tokenizer(["good nice fine", "bad sad poor"], return_tensors="pt", padding=True)
    ours = result["model"].eval()
    theirs = peft.PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2,
                                                           pad_token_id=tiny_tokenizer.pad_token_id),
        result["adapter_dir"]).eval()
    with torch.no_grad():
        expected = theirs(**ids).logits
        assert_close_fp32(ours(**ids).logits, expected)
    assert expected[0].argmax() == 1 and expected[1].argmax() == 0  # pos, neg


def test_seq2seq_task_trains_t5_and_peft_loads_the_adapter(tmp_path, tiny_tokenizer):
    """task: seq2seq — {"input", "target"} rows on an encoder-decoder model (a tiny T5 saved as a local model
    directory): held-out loss falls, and PEFT loaded with the adapter gives lorakit's logits."""
    import random

    import peft
    from transformers import AutoModelForSeq2SeqLM, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    pad = tiny_tokenizer.pad_token_id
    T5ForConditionalGeneration(T5Config(vocab_size=len(tiny_tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                        num_heads=4, pad_token_id=pad, decoder_start_token_id=pad,
                                        eos_token_id=tiny_tokenizer.eos_token_id)).save_pretrained(tmp_path / "t5")
    tiny_tokenizer.save_pretrained(tmp_path / "t5")
    rng = random.Random(0)
    words = ["red", "blue", "green", "tent", "boot", "map"]
    rows = []
    for _ in range(120):  # the task: say the words in reverse order
        seq = [rng.choice(words) for _ in range(3)]
        rows.append({"input": " ".join(seq), "target": " ".join(reversed(seq))})
    data = tmp_path / "s2s.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg(tmp_path / "out", task="seq2seq", model=str(tmp_path / "t5"), data=str(data), max_steps=60, lr=3e-2,
               eval_every=60, lora=dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q", "v", "wo"]))
    result = train(cfg, tokenizer=tiny_tokenizer)
    evals = [r["eval_loss"] for r in result["history"] if "eval_loss" in r]
    assert evals[-1] < 0.7 * evals[0], evals
    assert json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())["task_type"] == \
        "SEQ_2_SEQ_LM"
    batch = tiny_tokenizer(["red map boot", "tent blue green"], return_tensors="pt", padding=True)
    labels = tiny_tokenizer(text_target=["boot map red", "green blue tent"], return_tensors="pt", padding=True)
    inputs = dict(**batch, labels=labels.input_ids)
    ours = result["model"].eval()
    theirs = peft.PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "t5"),
                                            result["adapter_dir"]).eval()
    with torch.no_grad():
        assert_close_fp32(ours(**inputs).logits, theirs(**inputs).logits)


def test_seq2seq_rows_need_input_and_target(tmp_path, tiny_tokenizer):
    from lorakit.train import data as D

    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"input": "a b"}) + "\n")
    with pytest.raises(D.DataError, match=r"bad.jsonl:1: a seq2seq row needs non-empty \"input\" and \"target\""):
        D.load_seq2seq_examples(str(path), tiny_tokenizer, 32)
    path.write_text(json.dumps({"input": "a b", "target": "b a"}) + "\n" + json.dumps({"input": "c d e f"}) + "\n")
    with pytest.raises(D.DataError, match="bad.jsonl:2:"):
        D.load_seq2seq_examples(str(path), tiny_tokenizer, 32)
    path.write_text(json.dumps({"input": "a b c", "target": "c b a"}) + "\n")
    (example,), stats = D.load_seq2seq_examples(str(path), tiny_tokenizer, 32)
    batch = D.collate([example, D.Seq2SeqExample([5], [6, 7, 8, 9])], 0)
    assert batch["labels"].shape == (2, 4) and batch["input_ids"].shape == (2, max(len(example.input_ids), 1))
    assert batch["labels"][1].tolist() == [6, 7, 8, 9] and (batch["labels"][0, len(example.labels):] == -100).all()
    assert batch["attention_mask"][1].tolist() == [1] + [0] * (batch["input_ids"].shape[1] - 1)


def test_auto_checkpointing_recomputes_only_the_layers_the_memory_budget_needs(tmp_path, tiny_model_dir,
                                                                              tiny_tokenizer):
    """gradient_checkpointing: auto picks the fewest layers whose recomputation brings the predicted peak under the
    planned share of the memory limit (none where everything fits); those layers recompute, the others keep their
    activations, and training gives the adapter of a run without checkpointing (same arithmetic)."""
    import dataclasses

    from lorakit import calc
    from lorakit.train.distributed import Env
    from lorakit.train.memory_check import PLAN_HEADROOM, check_fits, choose_checkpointing, run_shape
    from lorakit.train.setup import resolve_run_settings

    base_cfg = _cfg(tmp_path / "plan", model=tiny_model_dir, max_steps=3, lora=dict(r=4, lora_alpha=8,
                                                                                    lora_dropout=0.0,
                                                                                    target_modules="all-linear"))
    arch = calc.get_arch(tiny_model_dir)
    shape = run_shape(dataclasses.replace(base_cfg, gradient_checkpointing=True))
    peaks = [calc.predict_run(arch, dataclasses.replace(shape, checkpointed_layers=k))["total"] for k in range(3)]
    assert peaks[0] > peaks[1] < peaks[2]  # checkpointing the last layer too only adds its input
    plans = {}
    for name, limit in [("roomy", 2 * peaks[0] / PLAN_HEADROOM), ("tight", (peaks[0] + peaks[1]) / 2 / PLAN_HEADROOM),
                        ("too small", peaks[1] / 2 / PLAN_HEADROOM)]:
        plans[name] = choose_checkpointing(dataclasses.replace(base_cfg, memory_limit_gb=limit), tiny_model_dir)
    assert plans["roomy"] == (False, None, None)
    assert plans["tight"][:2] == (True, 1) and "1 of 2 layers recompute" in plans["tight"][2]
    assert plans["too small"][:2] == (True, 1) and "does not fit even so" in plans["too small"][2]
    cfg, notes, _, _ = resolve_run_settings(dataclasses.replace(base_cfg, memory_limit_gb=(peaks[0] + peaks[1]) / 2
                                                             / PLAN_HEADROOM), Env())
    assert (cfg.gradient_checkpointing, cfg.checkpoint_layers) == (True, 1) and "1 of 2 layers" in notes[0]
    # freed heap is kept for reuse up to the predicted peak + the calculator's 20 %, within the planned share
    plain_cfg = dataclasses.replace(base_cfg, gradient_checkpointing=False)
    for limit in (10 * peaks[0], 1.1 * peaks[0]):
        kept = check_fits(tiny_model_dir, run_shape(plain_cfg), limit)[1]
        assert kept == pytest.approx(min(1.2 * peaks[0], PLAN_HEADROOM * limit), rel=1e-12)

    partial = train(dataclasses.replace(base_cfg, memory_limit_gb=(peaks[0] + peaks[1]) / 2 / PLAN_HEADROOM),
                    tokenizer=tiny_tokenizer)
    layers = partial["model"].get_base_model().model.layers
    assert [layer.gradient_checkpointing for layer in layers] == [True, False]
    plain = train(dataclasses.replace(base_cfg, output_dir=str(tmp_path / "plain"), gradient_checkpointing=False),
                  tokenizer=tiny_tokenizer)
    ours, theirs = _adapter(partial), _adapter(plain)
    for name, value in theirs.items():
        assert_close_fp32(ours[name], value, name)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_logged_losses_equal_peft_with_transformers_trainer_on_the_same_batches(tmp_path, tiny_tokenizer, grad_accum):
    """The train_loss lorakit logs is the quantity PEFT + transformers' Trainer logs for the same batch: the mean
    next-token loss over every labelled token of the optimizer step (all its micro-batches), prompt tokens masked.
    Both start from the same PEFT adapter file (B = 0), see the same rows in the same order, with the same AdamW,
    warmup-free cosine to 10 % and clipping, in fp32. A mean of per-row or per-micro-batch means would differ by
    percents on these rows (their lengths vary 3x); what remains is fp32 rounding, compounded over 6 steps."""
    import peft
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from lorakit.train import data as D
    from lorakit.train.config import DEMO_DATA
    from lorakit.train.loop import batch_order

    steps, batch, max_length, seed = 6, 4, 192, 0
    lora = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    start = peft.get_peft_model(tiny_llama_for(tiny_tokenizer), peft.LoraConfig(**lora))
    with torch.no_grad():  # A and B both non-zero, so step 1 already trains through the adapter
        for name, p in start.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02, generator=torch.Generator().manual_seed(1))
    start.save_pretrained(tmp_path / "start")

    ours = train(_cfg(tmp_path / "ours", max_steps=steps, batch_size=batch, grad_accum=grad_accum, lr=5e-3,
                      warmup_steps=0, max_length=max_length, val_fraction=0.0, seed=seed, lora=lora,
                      init_adapter=str(tmp_path / "start")), tiny_llama_for(tiny_tokenizer), tiny_tokenizer)
    logged = [r["train_loss"] for r in ours["history"]]

    examples, _ = D.load_examples(DEMO_DATA, tiny_tokenizer, max_length)
    order = [i for m in range(steps * grad_accum) for i in batch_order(len(examples), m, batch, seed)]
    rows = [{"input_ids": examples[i].input_ids, "labels": examples[i].labels} for i in order]
    lengths = [sum(label != D.IGNORE for label in row["labels"]) for row in rows]
    assert max(lengths) > 2 * min(lengths)  # a mean of per-row means would differ here
    theirs = peft.PeftModel.from_pretrained(tiny_llama_for(tiny_tokenizer), str(tmp_path / "start"), is_trainable=True)
    args = TrainingArguments(output_dir=str(tmp_path / "theirs"), max_steps=steps, per_device_train_batch_size=batch,
                             gradient_accumulation_steps=grad_accum, learning_rate=5e-3, lr_scheduler_type=
                             "cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=0,
                             weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, report_to=[], save_strategy="no",
                             use_cpu=True, seed=seed, train_sampling_strategy="sequential",
                             remove_unused_columns=False)
    collator = DataCollatorForSeq2Seq(tiny_tokenizer, padding=True, label_pad_token_id=D.IGNORE)
    trainer = Trainer(model=theirs, args=args, train_dataset=rows, data_collator=collator)
    trainer.train()
    reference = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(reference) == len(logged) == steps
    assert reference[-1] < reference[0]  # it trained
    for step, (got, expected) in enumerate(zip(logged, reference), 1):
        assert abs(got - expected) <= 1e-3 * abs(expected), (step, got, expected)
