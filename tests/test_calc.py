"""Calculator figures from the LoRA and QLoRA papers and the seed tables."""

import json

import pytest

from lorakit import calc
from lorakit.cli import main


def test_single_matrix_counts():
    assert calc.lora_params(4096, 4096, 8) == 65_536
    assert calc.lora_params(8192, 8192, 32) == 524_288


def test_gpt3_175b_wq_wv_as_in_the_lora_paper():
    arch = calc.get_arch("gpt-3-175b")
    assert calc.model_lora_params(arch, ["Wq", "Wv"], 8) == 37_748_736
    assert calc.model_lora_params(arch, ["Wq", "Wv"], 1) == 4_718_592


def test_smollm2_matches_the_real_model_count():
    arch = calc.get_arch("smollm2-135m")
    assert calc.model_lora_params(arch, ["q_proj", "k_proj", "v_proj", "o_proj"], 16) == 1_843_200
    assert arch.base_params() == 134_515_008  # SmolLM2-135M's parameter count (tied embeddings)


def test_7b_memory_table_reproduces_the_seed_figures():
    est = calc.memory_estimate(calc.get_arch("llama-2-7b"), ["q_proj", "v_proj"], 16)
    assert est["full"]["weights"] + est["full"]["gradients"] + est["full"]["optimizer"] == pytest.approx(56, rel=1e-9)
    assert est["full"]["total"] == pytest.approx(56, rel=0.05)
    assert est["lora"]["total"] == pytest.approx(15, rel=0.05)
    assert est["qlora"]["total"] < 6
    assert calc.fits(est, 24) == {"full": False, "lora": True, "qlora": True}


def test_config_json_is_read(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True}))
    assert calc.get_arch(str(tmp_path)) == calc.get_arch("smollm2-135m")


@pytest.mark.parametrize("complexity,size,rank", [("simple", 1e9, 8), ("simple", 70e9, 8), ("medium", 1e9, 16),
                                                  ("medium", 7e9, 32), ("complex", 3e9, 64), ("complex", 7e9, 128)])
def test_suggest_rank_follows_the_seed_heuristic(complexity, size, rank):
    assert calc.suggest_rank(complexity, size) == {"r": rank, "lora_alpha": 2 * rank}


@pytest.mark.parametrize("call,message", [
    (lambda: calc.lora_params(64, 4096, 128), "rank 128 is larger than the matrix's smaller dimension \\(64\\)"),
    (lambda: calc.lora_params(-5, 10, 1), "d_out must be a positive number, got -5"),
    (lambda: calc.get_arch("llama-9-9b"), "unknown architecture 'llama-9-9b'"),
    (lambda: calc.suggest_rank("hard", 1e9), "task_complexity must be one of"),
    (lambda: calc.suggest_rank("simple", -1), "model_size must be a positive number"),
    (lambda: calc.model_lora_params(calc.get_arch("gpt-3-175b"), ["gate_proj"], 8), "not a matrix"),
])
def test_bad_inputs_are_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_cli_calc_json_and_errors(capsys):
    assert main(["calc", "--arch", "gpt-3-175b", "--targets", "Wq,Wv", "--rank", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["lora_params"] == 37_748_736
    assert main(["calc", "--shape", "4096x4096", "--rank", "8"]) == 0
    assert "65,536 parameters" in capsys.readouterr().out
    assert main(["calc", "--arch", "llama-2-7b", "--memory-gb", "24"]) == 0
    assert "fits in 24 GB: full no, lora yes, qlora yes" in capsys.readouterr().out
    assert main(["calc", "--shape", "10x10", "--rank", "11"]) == 2
    assert "rank 11 is larger" in capsys.readouterr().err
