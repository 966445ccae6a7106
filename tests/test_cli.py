"""Every CLI error path: exit status 2 and one clear line on stderr; --help everywhere."""

import json

import pytest

from lorakit.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", ["train", "generate", "chat", "eval", "export", "calc", "serve", "merge-adapters"])
def test_help_on_every_subcommand(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: lorakit {command}" in capsys.readouterr().out


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    return str(path)


def _case_args(tmp_path, tiny_model_dir, data_file):
    bad_rows = tmp_path / "bad.jsonl"
    bad_rows.write_text('{"text": "ok"}\n{"question": 1}\n')
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("lr: [1, 2\n")
    return {
        "unknown setting": (["train", "--learning_rate=1"], "unknown setting(s) ['learning_rate']"),
        "unknown lora setting": (["train", "--lora.rank=4"], "unknown lora setting(s) ['rank']"),
        "bad rank": (["train", "--lora.r=0"], "r must be an integer >= 1, got 0"),
        "bad override syntax": (["train", "--lr"], "must look like --key=value"),
        "missing config": (["train", str(tmp_path / "nope.yaml")], "config file"),
        "invalid yaml": (["train", str(bad_yaml)], "invalid YAML"),
        "missing data": (["train", f"--model={tiny_model_dir}", f"--data={tmp_path}/none.jsonl",
                          f"--output_dir={tmp_path}/m"], "does not exist"),  # not ./runs/demo: `make demo` fills it
        "malformed row": (["train", f"--model={tiny_model_dir}", f"--data={bad_rows}", "--prompts=null",
                           f"--output_dir={tmp_path}/o"], "bad.jsonl:2: row has none of the known fields"),
        "resume without checkpoint": (["train", f"--model={tiny_model_dir}", f"--data={data_file}", "--prompts=null",
                                       "--batch_size=1", "--val_fraction=0", f"--output_dir={tmp_path}/r",
                                       "--resume"], "no checkpoint.pt"),
        "unknown model": (["generate", "--model=gpt-17", "hi"], "unknown model 'gpt-17'"),
        "missing adapter": (["generate", f"--model={tiny_model_dir}", f"--adapter={tmp_path}/none", "hi"],
                            "adapter directory"),
        "eval missing data": (["eval", f"--model={tiny_model_dir}", f"--data={tmp_path}/none.jsonl"],
                              "does not exist"),
        "export existing output": (["export", f"--model={tiny_model_dir}", f"--adapter={_adapter_dir(tmp_path, tiny_model_dir)}",
                                    "--format=hf", f"--out={tmp_path}"], "pass force=True (--force)"),
        "calc without inputs": (["calc"], "give --shape, --arch, --model or --suggest-rank"),
    }


def _adapter_dir(tmp_path, model_dir):
    import lorakit

    out = tmp_path / "adapter"
    model = lorakit.get_peft_model(lorakit.load_model(model_dir), lorakit.LoraConfig(target_modules=["q_proj"]))
    model.save_pretrained(str(out))
    return str(out)


CASES = ["export existing output", "calc without inputs", "unknown setting", "unknown lora setting", "bad rank", "bad override syntax", "missing config",
         "invalid yaml", "missing data", "malformed row", "resume without checkpoint", "unknown model",
         "missing adapter", "eval missing data"]


@pytest.mark.parametrize("case", CASES)
def test_cli_errors_exit_2_with_one_line(capsys, tmp_path, tiny_model_dir, data_file, case):
    argv, message = _case_args(tmp_path, tiny_model_dir, data_file)[case]
    code, _, err = _run(capsys, *argv)
    assert code == 2
    lines = [l for l in err.splitlines() if l.startswith("lorakit")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


def test_unknown_flag_for_other_commands_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--bogus", "hi"])
    assert exit_info.value.code == 2


def test_eval_and_generate_run_on_a_model_dir(capsys, tiny_model_dir, data_file):
    code, out, _ = _run(capsys, "eval", f"--model={tiny_model_dir}", f"--data={data_file}")
    assert code == 0 and "perplexity" in out
    code, out, _ = _run(capsys, "generate", f"--model={tiny_model_dir}", "--max-new-tokens=3", "hi")
    assert code == 0


def test_export_cli_writes_each_format(capsys, tmp_path, tiny_model_dir):
    adapter = _adapter_dir(tmp_path, tiny_model_dir)
    for fmt, out in (("hf", tmp_path / "hf"), ("gguf", tmp_path / "m.gguf"), ("gguf-adapter", tmp_path / "a.gguf")):
        code, stdout, err = _run(capsys, "export", f"--model={tiny_model_dir}", f"--adapter={adapter}",
                                 f"--format={fmt}", f"--out={out}", "--gguf-type=f32", "--gguf-pretokenizer=gpt-2")
        assert code == 0 and out.exists(), err
    # the tiny test tokenizer is in no table of llama.cpp's: without the name, one line naming the option, exit 2
    code, _, err = _run(capsys, "export", f"--model={tiny_model_dir}", f"--adapter={adapter}", "--format=gguf",
                        f"--out={tmp_path / 'refused.gguf'}")
    assert code == 2 and "--gguf-pretokenizer" in err and not (tmp_path / "refused.gguf").exists()


def test_merge_adapters_cli(capsys, tmp_path, tiny_model_dir):
    import lorakit

    a = _adapter_dir(tmp_path, tiny_model_dir)
    code, out, err = _run(capsys, "merge-adapters", f"--model={tiny_model_dir}", f"--adapter=a={a}",
                          f"--adapter=b={a}", "--weights=0.5,0.5", "--type=cat", f"--out={tmp_path}/m")
    assert code == 0, err
    assert lorakit.LoraConfig.from_pretrained(f"{tmp_path}/m").r == 16  # cat of two r=8 adapters
    code, _, err = _run(capsys, "merge-adapters", f"--model={tiny_model_dir}", f"--adapter=a={a}",
                        "--weights=x", f"--out={tmp_path}/m2")
    assert code == 2 and "--weights must be comma-separated numbers" in err


def test_dtype_and_device_options_load_the_base_as_asked(tiny_model_dir, tmp_path, tiny_tokenizer):
    """--dtype: bf16 / fp32 base (auto = bf16 only where this CPU has fast bf16); adapters stay fp32 on the
    base's device; the server's engine takes the same settings."""
    import torch
    from conftest import tiny_llama_for

    import lorakit
    from lorakit.commands import _load
    from lorakit.hardware import fast_bf16
    from lorakit.serve.engine import Engine, ServeConfig

    adapter = lorakit.get_peft_model(tiny_llama_for(tiny_tokenizer), lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    adapter.save_pretrained(str(tmp_path / "a"))
    for dtype, expected in (("bf16", torch.bfloat16), ("fp32", torch.float32),
                            ("auto", torch.bfloat16 if fast_bf16("cpu") else torch.float32)):
        model, _ = _load(tiny_model_dir, str(tmp_path / "a"), dtype=dtype, device="cpu")
        assert model.get_base_model().model.embed_tokens.weight.dtype == expected
        assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    engine = Engine(ServeConfig(model=tiny_model_dir, dtype="fp32", device="cpu"))
    assert next(engine.model.parameters()).dtype == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        ServeConfig(model=tiny_model_dir, dtype="int8")


def test_train_settings_take_a_space_like_an_equals_sign(capsys, tmp_path):
    from lorakit.cli import joined_overrides

    known = {"--resume", "--quiet", "--quantize"}
    assert joined_overrides(["--batch_size", "2", "cfg.yaml", "--lr=1e-3", "--quantize", "nf4", "--resume"],
                            known) == ["--batch_size=2", "cfg.yaml", "--lr=1e-3", "--quantize", "nf4", "--resume"]
    code, _, err = _run(capsys, "train", "--batch_size", "0")  # read as --batch_size=0, not as a config file 0
    assert code == 2 and "batch_size must be an integer >= 1" in err
    code, _, err = _run(capsys, "train", "--lora.r", "-3", str(tmp_path / "missing.yaml"))
    assert code == 2 and "missing.yaml" in err  # the positional config is still the config


def test_finished_run_is_kept_unless_forced_and_its_config_yaml_is_reusable(capsys, tmp_path, tiny_model_dir):
    import yaml

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(8)))
    out = tmp_path / "run"
    argv = ["train", f"--model={tiny_model_dir}", f"--data={data}", "--batch_size=2", "--max_steps=2",
            "--val_fraction=0", "--bf16=false", "--memory_check=false", f"--output_dir={out}", "--quiet"]
    assert _run(capsys, *argv)[0] == 0
    adapter = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    code, _, err = _run(capsys, *argv)
    assert code == 2 and "already holds a trained adapter" in err and "--force" in err
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == adapter  # untouched
    assert _run(capsys, *argv, "--force")[0] == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["resume"] is False and saved["overwrite"] is False
    assert _run(capsys, "train", str(out / "config.yaml"), "--force", "--quiet")[0] == 0  # the run's file reruns it


def test_ctrl_c_in_chat_stops_the_reply_and_returns_to_the_prompt(tmp_path, tiny_tokenizer):
    """In a pseudo-terminal: a reply that would run for 100,000 tokens is interrupted with SIGINT; the process
    prints [stopped] at once and asks for the next message, which it then answers (the session goes on)."""
    import os
    import pty
    import select
    import signal
    import subprocess
    import sys
    import time

    from conftest import tiny_llama_for

    model = tiny_llama_for(tiny_tokenizer)
    model.generation_config.eos_token_id = None  # never ends by itself: only max_new_tokens or Ctrl-C stop it
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "chat", f"--model={tmp_path / 'm'}",
                             "--max-new-tokens=100000", "--dtype=fp32"], stdin=follower, stdout=follower,
                            stderr=follower, close_fds=True,
                            # a shell's background job inherits SIGINT ignored, and Python then never raises
                            # KeyboardInterrupt: give the child the default, as a terminal would
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    os.close(follower)
    seen, consumed = b"", 0  # output so far; how much of it earlier markers matched

    def read_until(marker: bytes, timeout: float) -> bool:
        """True once `marker` appears after the previous match (already read, e.g. in the same chunk as it, or
        arriving within `timeout`)."""
        nonlocal seen, consumed
        end = time.monotonic() + timeout
        while (found := seen.find(marker, consumed)) < 0:
            left = end - time.monotonic()
            ready, _, _ = select.select([leader], [], [], left) if left > 0 else ([], None, None)
            if not ready:  # timed out (a reply streaming without the marker also ends here)
                return False
            try:
                seen += os.read(leader, 4096)
            except OSError:
                return False
        consumed = found + len(marker)
        return True

    try:
        assert read_until(b"you> ", 120), seen[-500:]
        os.write(leader, b"hello\n")
        assert read_until(b"bot> ", 30), seen[-500:]
        time.sleep(2)  # mid-reply
        proc.send_signal(signal.SIGINT)
        started = time.monotonic()
        assert read_until(b"[stopped]", 10) and read_until(b"you> ", 10), seen[-500:]
        assert time.monotonic() - started < 10
        assert proc.poll() is None  # still running: back at the prompt
        os.write(leader, b"\n")  # an empty line quits
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)


def test_suggest_ranks_recipe_trains_within_its_budget(capsys, tmp_path, tiny_model_dir):
    """The recipe `--help` prints: suggest-ranks --out ranks.yaml, then train ranks.yaml: every adapted matrix is
    one the probe ranked, at its rank, and the trained adapter's parameter count is the budget spent."""
    import yaml
    from safetensors.torch import load_file

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"question {i}", "completion": f"answer {i}"}) + "\n"
                            for i in range(16)))
    code, out, _ = _run(capsys, "suggest-ranks", f"--model={tiny_model_dir}", "--budget=2000", f"--data={data}",
                        "--steps=2", "--max-rank=8", f"--out={tmp_path / 'ranks.yaml'}")
    assert code == 0
    ranks = yaml.safe_load((tmp_path / "ranks.yaml").read_text())["lora"]["rank_pattern"]
    spent = int(out.strip().splitlines()[-1].split(" LoRA")[0].replace(",", ""))
    assert spent <= 2000
    code, _, err = _run(capsys, "train", str(tmp_path / "ranks.yaml"), f"--model={tiny_model_dir}",
                        f"--data={data}", "--batch_size=2", "--max_steps=1", "--val_fraction=0", "--bf16=false",
                        "--memory_check=false", f"--output_dir={tmp_path / 'run'}", "--quiet")
    assert code == 0, err
    weights = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert sum(t.numel() for t in weights.values()) == spent
    trained = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in weights}
    assert trained == set(ranks)
    code, _, err = _run(capsys, "train", f"--model={tiny_model_dir}", f"--data={data}",
                        f"--lora.rank_pattern={ {n: 2 for n in ranks} }", "--max_steps=1", "--batch_size=2",
                        "--val_fraction=0", f"--output_dir={tmp_path / 'run2'}", "--quiet", "--memory_check=false")
    assert code == 0, err  # a value with spaces is a setting, not the config file


def test_cli_output_has_no_transformers_progress_bars(tiny_model_dir):
    import subprocess
    import sys

    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY")}
    proc = subprocess.run([sys.executable, "-m", "lorakit", "generate", f"--model={tiny_model_dir}",
                           "--max-new-tokens=2", "--dtype=fp32", "hi"], capture_output=True, text=True, timeout=120,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    assert "Loading weights" not in proc.stderr and "%|" not in proc.stderr, proc.stderr
