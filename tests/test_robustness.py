"""Bad input never ends in a traceback: each finding of the robustness review as a test, and fuzz tests
(hypothesis) over CLI settings, data rows and adapter configs. Counts of outcomes are printed (-s)."""

import collections
import json
import os
import stat

import pytest
from conftest import tiny_llama_for
from conftest import tiny_train_config as _cfg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorakit import cli
from lorakit.train import data as D
from lorakit.train import train
from lorakit.utils import atomic_path

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
OUTCOMES = collections.Counter()


def _run_cli(argv, capsys):
    """(exit status, stderr) of `lorakit ARGV` in this process; a traceback fails the test."""
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err


def _one_line_error(code, err, command, must_name=None):
    assert code == 2, (code, err)
    errors = [line for line in err.splitlines() if "error:" in line]  # (progress bars of loading may precede it)
    assert len(errors) == 1 and errors[0].startswith(f"lorakit {command}: error:"), err
    if must_name is not None:
        assert must_name in err, (must_name, err)


# --- the findings, one test each -------------------------------------------------------------------------
@pytest.mark.parametrize("override,names", [
    ("--max_steps=abc", "max_steps"), ("--lora=5", "lora"), ("--output_dir=null", "output_dir"),
    ("--data=null", "data"), ("--warmup_steps=abc", "warmup_steps"), ("--seed=abc", "seed"),
    ("--lr=[", "--lr"), ("--lora.r=0", "r"), ("--batch_size=true", "batch_size"), ("--progress=maybe", "progress"),
])
def test_bad_training_settings_are_one_line_errors_naming_the_setting(tmp_path, capsys, override, names):
    code, err = _run_cli(["train", f"--model={tmp_path / 'no-model'}", f"--output_dir={tmp_path}", override], capsys)
    _one_line_error(code, err, "train", names)
    assert not os.listdir(tmp_path)  # refused before anything was written


def test_yaml_errors_are_one_line_with_line_and_column(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 1e-3\nlora:\n  r: [16\n")
    code, err = _run_cli(["train", str(bad)], capsys)
    _one_line_error(code, err, "train", "line 4")


def test_resume_with_other_adapter_settings_names_the_change(tmp_path, tiny_tokenizer, tiny_model_dir, capsys):
    def stop(step, record):
        raise KeyboardInterrupt

    train(_cfg(tmp_path, max_steps=4, lora=dict(r=4, target_modules=["q_proj"]), model=tiny_model_dir),
          tiny_llama_for(tiny_tokenizer), tiny_tokenizer, on_step=stop)
    assert (tmp_path / "checkpoint.pt").exists()
    code, err = _run_cli(["train", str(tmp_path / "config.yaml"), "--resume", "--lora.r=8", "--progress=false",
                          "--prompts=null"], capsys)
    _one_line_error(code, err, "train", "lora.r")


def test_adapter_config_that_is_not_an_object_and_calc_arch_errors(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "adapter_config.json").write_text("[1, 2]")
    code, err = _run_cli(["generate", f"--model={tiny_model_dir}", f"--adapter={tmp_path}", "hi"], capsys)
    _one_line_error(code, err, "generate", "adapter_config.json")
    listing = tmp_path / "list.json"
    listing.write_text("[1, 2]")
    code, err = _run_cli(["calc", f"--arch={listing}"], capsys)
    _one_line_error(code, err, "calc", str(listing))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    code, err = _run_cli(["calc", f"--arch={broken}"], capsys)
    _one_line_error(code, err, "calc", str(broken))
    code, err = _run_cli(["serve", "--port", "99999"], capsys)
    _one_line_error(code, err, "serve", "99999")


def test_a_data_file_that_is_not_utf8_is_named_with_its_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(D.DataError, match=rf"{path}:2: not UTF-8 text \(byte 0xe9 at column 14\)"):
        D.read_rows(str(path))


def test_export_force_never_deletes_a_directory_of_other_files(tmp_path, capsys):
    from lorakit import export

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an exported model"):
        export.check_target(str(out), True, "model_dir")
    with pytest.raises(FileExistsError, match="not a file"):
        export.check_target(str(out), True, "file")
    assert (out / "notes.txt").read_text() == "mine"
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    export.check_target(str(tmp_path / "model"), True, "model_dir")  # an earlier export: may be replaced


def test_killed_directory_swap_is_repaired_and_leftovers_cleaned(tmp_path):
    target = tmp_path / "adapter"
    # state after a kill between the two renames: the old directory moved aside, the new one not in place,
    # plus a half-written temp file and temp directory of killed writers
    (tmp_path / ".adapter.old").mkdir()
    (tmp_path / ".adapter.old" / "adapter_config.json").write_text("{}")
    (tmp_path / ".adapter.x1.tmp").write_bytes(b"")
    (tmp_path / ".adapter.x2.tmp").mkdir()
    with atomic_path(str(target), directory=True) as tmp:
        assert (target / "adapter_config.json").exists()  # the old one is back before anything new is written
        (open(os.path.join(tmp, "adapter_config.json"), "w")).write('{"new": 1}')
    assert json.loads((target / "adapter_config.json").read_text()) == {"new": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_saved_files_follow_the_umask_not_0600(tmp_path, tiny_tokenizer):
    old = os.umask(0o022)
    try:
        result = train(_cfg(tmp_path, max_steps=2, lora=dict(r=2, target_modules=["q_proj"])),
                       tiny_llama_for(tiny_tokenizer), tiny_tokenizer)
    finally:
        os.umask(old)
    adapter = result["adapter_dir"]
    for path in (adapter, *(os.path.join(adapter, f) for f in os.listdir(adapter)),
                 os.path.join(tmp_path, "config.yaml"), os.path.join(tmp_path, "loss.png")):
        mode = stat.S_IMODE(os.stat(path).st_mode)
        assert mode == (0o755 if os.path.isdir(path) else 0o644), (path, oct(mode))


# --- fuzz -----------------------------------------------------------------------------------------------
SETTING_KEYS = ["max_steps", "lr", "batch_size", "seed", "warmup_steps", "epochs", "bf16", "device", "output_dir",
                "data", "lora", "lora.r", "lora.lora_alpha", "lora.target_modules", "lora.lora_dropout",
                "lora.peft_type", "lora.init_lora_weights", "lora.rank_pattern", "quantize", "max_length",
                "distributed", "trim_memory", "saved_activations", "packing", "eval_every", "nonsense",
                "lora.nonsense"]
YAML_VALUES = st.one_of(
    st.sampled_from(["abc", "null", "true", "-1", "0", "1e400", "[1, 2]", "{a: 1}", "''", "[", "{", "'x", "nan",
                     "-inf", "3.5", "99999999999999999999", "~", "!!python/object:os.system ls", "\x00", "é"]),
    st.text(max_size=12),
    st.integers().map(str),
    st.floats(allow_nan=True).map(str),
)


@FUZZ
@given(key=st.sampled_from(SETTING_KEYS), value=YAML_VALUES)
def test_fuzz_training_settings(tmp_path_factory, capsys, key, value):
    out = tmp_path_factory.mktemp("fuzz")
    code, err = _run_cli(["train", f"--model={out / 'no-model'}", f"--output_dir={out}", "--prompts=null",
                          f"--{key}={value}"], capsys)
    _one_line_error(code, err, "train")
    OUTCOMES["cli settings: one-line error, exit 2"] += 1


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                        max_size=3), max_leaves=6)


@FUZZ
@given(row=st.one_of(JSON_VALUES, st.fixed_dictionaries({"messages": JSON_VALUES}),
                     st.fixed_dictionaries({"prompt": JSON_VALUES, "completion": JSON_VALUES}),
                     st.fixed_dictionaries({"text": JSON_VALUES}),
                     st.fixed_dictionaries({"text": st.text(min_size=1, max_size=30)})),
       raw=st.one_of(st.just(b""), st.binary(max_size=20)))
def test_fuzz_data_rows(tmp_path_factory, tiny_tokenizer, row, raw):
    path = tmp_path_factory.mktemp("rows") / "rows.jsonl"
    path.write_bytes(json.dumps({"text": "a good row"}).encode() + b"\n" + json.dumps(row).encode() + b"\n" + raw)
    try:
        D.load_examples(str(path), tiny_tokenizer, max_length=32)
        OUTCOMES["data rows: accepted"] += 1
    except D.DataError as e:
        assert str(e).startswith(f"{path}:"), e  # names the file and the line
        OUTCOMES["data rows: DataError naming file:line"] += 1


ADAPTER_FIELDS = ["r", "lora_alpha", "target_modules", "lora_dropout", "bias", "peft_type", "init_lora_weights",
                  "rank_pattern", "alpha_pattern", "use_dora", "modules_to_save", "layers_to_transform",
                  "task_type", "trainable_token_indices", "lora_bias", "total_step", "init_r"]


@FUZZ
@given(field=st.sampled_from(ADAPTER_FIELDS), value=JSON_VALUES)
def test_fuzz_adapter_configs(tmp_path_factory, field, value):
    from lorakit.variants.registry import read_config

    path = tmp_path_factory.mktemp("adapter")
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], field: value}
    (path / "adapter_config.json").write_text(json.dumps(config))
    try:
        read_config(str(path))
        OUTCOMES["adapter configs: accepted"] += 1
    except ValueError as e:  # what the CLI reports as a one-line error (a TypeError would be a traceback)
        assert "\n" not in str(e)
        OUTCOMES[f"adapter configs: {type(e).__name__}"] += 1


@pytest.fixture(scope="module", autouse=True)
def _report_outcomes():
    yield
    if OUTCOMES:
        print("\nfuzz outcomes: " + ", ".join(f"{k}: {v}" for k, v in sorted(OUTCOMES.items())))


def test_a_run_whose_weights_cannot_fit_is_refused_before_anything_is_written(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "out"
    code, err = _run_cli(["train", f"--model={tiny_model_dir}", f"--output_dir={out}", "--prompts=null",
                          "--memory_limit_gb=0.00001", "--bf16=false"], capsys)
    _one_line_error(code, err, "train", "cannot fit")
    assert "predicted peak" in err and "use a smaller model" in err  # nothing fits in 10 kB
    assert not out.exists()
