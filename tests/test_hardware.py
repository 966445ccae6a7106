"""The compute dtype `auto` picks is measured, not read from CPU flags: matmul rates timed once per CPU model /
torch version / thread count, cached, and bf16 chosen only where it beat fp32 by the margin."""

import json

import pytest
import torch

from lorakit import hardware


@pytest.mark.parametrize("rates, bf16", [({"fp32": 110.0, "bf16": 385.0}, True),   # an EPYC with fast bf16
                                         ({"fp32": 248.0, "bf16": 142.0}, False),  # a Xeon listing avx512_bf16
                                         ({"fp32": 100.0, "bf16": 105.0}, False)])  # within the margin
def test_a_timing_table_picks_the_dtype(rates, bf16, monkeypatch):
    assert hardware.fast_bf16("cpu", rates) is bf16
    monkeypatch.setattr(hardware, "cpu_matmul_rates", lambda: rates)
    assert hardware.resolve_bf16("auto") is bf16
    assert hardware.resolve_dtype("auto", "cpu") == (torch.bfloat16 if bf16 else torch.float32)
    assert hardware.resolve_bf16(False) is False and hardware.resolve_dtype("fp32", "cpu") == torch.float32
    decision = hardware.dtype_decision("cpu")
    assert decision["compute_dtype"] == ("bf16" if bf16 else "fp32") and decision["gflops"] == rates
    note = hardware.compute_dtype_note(decision)
    assert note.startswith(f"auto dtype: {'bf16' if bf16 else 'fp32'}") and f"{rates['fp32']:g} GFLOP/s" in note


def test_rates_are_measured_once_and_kept_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []
    monkeypatch.setattr(hardware, "measure_matmul_rates", lambda: calls.append(1) or {"fp32": 90.0, "bf16": 30.0})
    hardware.cpu_matmul_rates.cache_clear()
    try:
        assert hardware.cpu_matmul_rates() == {"fp32": 90.0, "bf16": 30.0}
        table = json.loads((tmp_path / "lorakit" / "calibration.json").read_text())
        (key,) = table
        assert hardware.cpu_model() in key and torch.__version__ in key
        hardware.cpu_matmul_rates.cache_clear()  # a new process: read from the file, not measured again
        assert hardware.cpu_matmul_rates() == {"fp32": 90.0, "bf16": 30.0} and calls == [1]
    finally:
        hardware.cpu_matmul_rates.cache_clear()


def test_cpus_a_hypervisor_names_alike_are_cached_apart(tmp_path, monkeypatch):
    """Two machine classes both called "AMD EPYC" (AVX2-only, and AVX-512-BF16) must not share a measurement: a
    cache moved between them would otherwise pick the other CPU's dtype."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    info = "processor\t: {n}\nmodel name\t: AMD EPYC\ncpu family\t: 25\nmodel\t\t: {model}\nflags\t\t: {flags}\n"
    avx2, avx512 = tmp_path / "avx2", tmp_path / "avx512"
    avx2.write_text(info.format(n=0, model=1, flags="fpu sse avx2") + "\n" + info.format(n=1, model=1, flags="x"))
    avx512.write_text(info.format(n=0, model=1, flags="fpu sse avx2 avx512f avx512_bf16"))
    assert hardware.cpu_model(str(avx2)).startswith("AMD EPYC (cpu family 25, model 1, flags ")
    assert hardware.cpu_model(str(avx2)) != hardware.cpu_model(str(avx512))
    assert hardware.cpu_model(str(tmp_path / "absent")) == "unknown"
    by_cpu = {"avx2": {"fp32": 180.0, "bf16": 60.0}, "avx512": {"fp32": 150.0, "bf16": 350.0}}
    seen, measured, real_cpu_model = [], [], hardware.cpu_model
    for machine in ("avx2", "avx512", "avx2"):  # the third start finds its own CPU's entry
        monkeypatch.setattr(hardware, "cpu_model", lambda machine=machine: real_cpu_model(str(tmp_path / machine)))
        monkeypatch.setattr(hardware, "measure_matmul_rates",
                            lambda machine=machine: measured.append(machine) or by_cpu[machine])
        hardware.cpu_matmul_rates.cache_clear()
        try:
            seen.append(hardware.fast_bf16("cpu"))
        finally:
            hardware.cpu_matmul_rates.cache_clear()
    assert seen == [False, True, False] and measured == ["avx2", "avx512"]
    assert len(json.loads((tmp_path / "lorakit" / "calibration.json").read_text())) == 2


def test_a_close_call_is_measured_again_and_keeps_each_dtype_s_best_rate(tmp_path, monkeypatch):
    """A first measurement with the CPU busy during the fp32 products says bf16; the next starts measure again
    (the rates are within 2x), keep each dtype's best rate, choose fp32, and stop measuring after the third."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    measurements = [{"fp32": 40.0, "bf16": 60.0}, {"fp32": 100.0, "bf16": 62.0}, {"fp32": 95.0, "bf16": 64.0}]
    calls = []
    monkeypatch.setattr(hardware, "measure_matmul_rates", lambda: calls.append(1) or measurements[len(calls) - 1])
    seen = []
    try:
        for _ in range(4):  # four process starts
            hardware.cpu_matmul_rates.cache_clear()
            seen.append((hardware.cpu_matmul_rates(), hardware.fast_bf16("cpu")))
    finally:
        hardware.cpu_matmul_rates.cache_clear()
    assert seen == [({"fp32": 40.0, "bf16": 60.0}, True), ({"fp32": 100.0, "bf16": 62.0}, False),
                    ({"fp32": 100.0, "bf16": 64.0}, False), ({"fp32": 100.0, "bf16": 64.0}, False)]
    assert len(calls) == 3
    (entry,) = json.loads((tmp_path / "lorakit" / "calibration.json").read_text()).values()
    assert entry == {"fp32": 100.0, "bf16": 64.0, "measurements": 3}


def test_measured_rates_are_rates():
    rates = hardware.measure_matmul_rates(shapes=((128, 128, 128),), repeats=2)
    assert set(rates) == {"fp32", "bf16"} and all(r > 0 for r in rates.values())


@pytest.mark.parametrize("rank", [0, 1])
def test_auto_dtype_of_a_multi_process_run_is_measured_by_rank_0_and_taken_by_every_rank(rank, monkeypatch):
    """Ranks timing products at once would slow each other and could decide differently: rank 0 measures, every
    rank takes its decision (gather_objects stands in for torch.distributed's all_gather_object here)."""
    from lorakit.train import setup
    from lorakit.train.config import TrainConfig
    from lorakit.train.distributed import Env

    measured = []
    monkeypatch.setattr(hardware, "cpu_matmul_rates", lambda: measured.append(rank) or {"fp32": 90.0, "bf16": 300.0})
    rank_0 = {"compute_dtype": "fp32", "device": "cpu", "gflops": {"fp32": 300.0, "bf16": 90.0}, "cpu": "rank 0's",
              "threads": 2, "bf16_margin": hardware.BF16_MARGIN}  # what rank 0 decided on its own measurement
    monkeypatch.setattr(setup.dist_utils, "gather_objects",
                        lambda value, env: [value if env.rank == 0 else rank_0, None if env.rank == 0 else value])
    cfg, notes, _, settings = setup.resolve_run_settings(TrainConfig(memory_check=False), Env(rank=rank, world_size=2))
    if rank == 0:  # its own measurement: bf16 at 3.3x fp32
        assert cfg.bf16 is True and measured and notes[0].startswith("auto dtype: bf16")
        assert settings["dtype_decision"]["gflops"] == {"fp32": 90.0, "bf16": 300.0}
    else:
        assert cfg.bf16 is False and measured == [] and notes[0] == hardware.compute_dtype_note(rank_0)
        assert settings["dtype_decision"] == rank_0 and settings["compute_dtype"] == "fp32"
