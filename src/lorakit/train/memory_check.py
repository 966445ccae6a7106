"""Before a run loads anything: will it fit in this machine's memory?

The run's predicted peak (calc.predict_run: frozen weights, adapters with their gradients and AdamW states,
activations with or without checkpointing, the chunked loss, transients, the runtime itself) against the memory
available (MemAvailable, or `memory_limit_gb`). A run predicted not to fit is refused before anything is
loaded or written, with the changes that would make it fit (QLoRA, checkpointing, a smaller batch) and their
predicted peaks. bench/scale.py measures the prediction's error per model size.
"""

from __future__ import annotations

import dataclasses

from .. import calc


class MemoryRefusal(ValueError):
    """A run predicted to need more memory than the machine has."""


def available_gb(limit_gb: float | None = None) -> float | None:
    """`limit_gb` when set (memory_limit_gb, --memory-gb), else MemAvailable from /proc/meminfo in GB (None where
    the system does not say)."""
    if limit_gb is not None:
        return limit_gb
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / calc.GB
    except OSError:
        pass
    return None


def run_shape(cfg) -> calc.RunShape:
    """The calculator's view of a TrainConfig (adapter sizes by the LoRA formula, whatever the form; dpo / orpo
    batches hold two sequences per pair)."""
    lora = cfg.lora
    targets = lora.get("target_modules")
    names = [targets] if isinstance(targets, str) else list(targets or [])
    layer_matrices = set(calc.ALIASES.values())  # the per-layer matrix names the calculator sizes
    known = tuple(n for n in names if n in layer_matrices)
    saved = {"bf16": 2, "fp32": 4}.get(cfg.saved_activations)
    rows = cfg.batch_size * (2 if cfg.method != "sft" else 1)  # a preference pair is two sequences
    return calc.RunShape(storage=cfg.quantize, compute="bf16" if cfg.bf16 else "fp32", batch=rows,
                         length=cfg.max_length, rank=int(lora.get("r", 8)), targets=known or None,
                         gradient_checkpointing=cfg.gradient_checkpointing is True, saved_bytes=saved,
                         checkpointed_layers=cfg.checkpoint_layers)


ALTERNATIVES = (  # what a refusal suggests, in order: (setting as the user writes it, the change to the run)
    ("saved_activations: bf16", {"saved_bytes": 2}),  # backward reads bf16-rounded inputs: not exact, but close
    ("gradient_checkpointing: true", {"gradient_checkpointing": True, "checkpointed_layers": None}),
    ("quantize: nf4", {"storage": "nf4"}),
    ("quantize: nf4 + gradient_checkpointing: true", {"storage": "nf4", "gradient_checkpointing": True,
                                                      "checkpointed_layers": None}),
    ("bf16: true", {"compute": "bf16"}),  # slower where the CPU lacks fast bf16, but half the weights
)


def would_fit(arch: calc.Arch, shape: calc.RunShape, available: float) -> list[str]:
    """The changes (each with its predicted peak) that bring the run under `available` GB."""
    options, seen = [], {shape}
    for label, change in ALTERNATIVES:
        changed = dataclasses.replace(shape, **change)
        if changed not in seen and (peak := calc.predict_run(arch, changed)["total"]) <= available:
            options.append(f"{label} ({peak:.1f} GB)")
        seen.add(changed)
    batch = shape.batch // 2
    while batch >= 1:
        peak = calc.predict_run(arch, dataclasses.replace(shape, batch=batch))["total"]
        if peak <= available:
            options.append(f"batch_size: {batch} ({peak:.1f} GB; grad_accum keeps the effective batch)")
            break
        batch //= 2
    return options


def check_fits(model_dir: str, shape: calc.RunShape, limit_gb: float | None) -> tuple[str, float, dict]:
    """A one-line summary of the predicted peak against the memory available (or `limit_gb`), the resident
    memory below which freed heap is kept for reuse (hardware.FreedMemoryCap): the predicted peak plus the
    calculator's error (+20 %), within PLAN_HEADROOM of the memory available. MemoryRefusal, naming what would fit
    instead, when the prediction exceeds the memory available. Third: the predicted components (GB, calc.predict_run).
    """
    arch = calc.get_arch(model_dir)
    predicted = calc.predict_run(arch, shape)
    available = available_gb(limit_gb)
    summary = (f"memory: predicted peak {predicted['total']:.2f} GB ({components(predicted)})"
               + (f" of {available:.1f} GB available" if available is not None else ""))
    if available is None:
        return summary, 1.2 * predicted["total"], predicted
    if predicted["total"] <= available:
        return summary, min(1.2 * predicted["total"], PLAN_HEADROOM * available), predicted
    options = would_fit(arch, shape, available)
    raise MemoryRefusal(
        f"this run cannot fit: its predicted peak is {predicted['total']:.1f} GB (frozen weights "
        f"{predicted['weights']:.1f}, activations {predicted['activations']:.1f}), {available:.1f} GB is available; "
        + (f"would fit: {'; '.join(options)}" if options else "nothing smaller fits: use a smaller model")
        + " (set memory_check: false to start anyway)")


PLAN_HEADROOM = 0.85  # the checkpointing plan aims at this share of the memory available (calc is +-20 %)


def choose_checkpointing(cfg, model_dir: str | None) -> tuple[bool, int | None, str | None]:
    """`gradient_checkpointing: auto` decided: (gradient_checkpointing, checkpoint_layers, the reason). No layer
    recomputes where the run is predicted to fit in PLAN_HEADROOM of the memory available; else the fewest layers
    whose recomputation makes it fit (each checkpointed layer keeps only its input); else all but the last (the memory
    check then says what else would fit). A run that cannot be sized (no model directory, an unknown architecture,
    memory_check: false) recomputes nothing."""
    if cfg.gradient_checkpointing != "auto":
        return cfg.gradient_checkpointing, cfg.checkpoint_layers, None
    available = available_gb(cfg.memory_limit_gb)
    if model_dir is None or available is None or not cfg.memory_check:
        return False, None, None
    try:
        arch = calc.get_arch(model_dir)
    except calc.ArchUnknown:
        return False, None, None
    shape = run_shape(dataclasses.replace(cfg, gradient_checkpointing=True))
    budget = PLAN_HEADROOM * available
    peaks = [calc.predict_run(arch, dataclasses.replace(shape, checkpointed_layers=k))["total"]
             for k in range(arch.layers)]  # the last layer never needs it: it is rebuilt right after its forward
    layers = next((k for k, peak in enumerate(peaks) if peak <= budget), arch.layers - 1)
    if layers == 0:
        return False, None, None
    fits_note = "" if peaks[layers] <= budget else "; the run does not fit even so: see below"
    return True, layers, (f"gradient checkpointing: {layers} of {arch.layers} layers recompute in backward "
                          f"(predicted peak {peaks[layers]:.2f} GB, {budget:.1f} GB planned; with none "
                          f"{peaks[0]:.2f} GB{fits_note})")


def choose_saved_activations(cfg, model_dir: str | None) -> tuple[str, str | None]:
    """`saved_activations: auto` decided for a run computing in fp32: "fp32" (backward reads exactly what forward
    computed) unless the run is predicted not to fit that way but to fit keeping bf16 copies; with the reason.
    A bf16 run keeps bf16 (its activations are bf16 already); a run that cannot be sized keeps fp32."""
    if cfg.saved_activations != "auto" or cfg.bf16:
        return cfg.saved_activations, None
    available = available_gb(cfg.memory_limit_gb)
    if model_dir is None or available is None or not cfg.memory_check:
        return "fp32", None
    try:
        arch = calc.get_arch(model_dir)
    except calc.ArchUnknown:
        return "fp32", None
    exact = calc.predict_run(arch, run_shape(dataclasses.replace(cfg, saved_activations="fp32")))["total"]
    if exact <= available:
        return "fp32", None
    halved = calc.predict_run(arch, run_shape(dataclasses.replace(cfg, saved_activations="bf16")))["total"]
    if halved > available:  # neither fits: the memory check refuses the exact plan, naming what would fit
        return "fp32", None
    return "bf16", (f"saved activations: bf16 copies (backward reads bf16-rounded inputs): fp32 copies would need "
                    f"{exact:.1f} GB of the {available:.1f} GB available, bf16 {halved:.1f} GB "
                    "(saved_activations: fp32 to insist)")


def components(predicted: dict) -> str:
    """calc.predict_run's components (all but the total), as "weights 0.27, adapters 0.08, ..." (GB)."""
    return ", ".join(f"{name} {value:.2f}" for name, value in predicted.items() if name != "total")


def memory_report(peak_gb: float, predicted: dict | None, device: str = "cpu") -> str:
    """The run's measured peak (resident memory; allocated GPU memory on cuda) beside its arithmetic floor: the
    calculator's components (frozen weights, adapters with gradients and AdamW states, activations of one step, the
    runtime) where the run was sized."""
    line = f"peak memory: {peak_gb:.2f} GB ({'peak allocated GPU' if device == 'cuda' else 'peak resident'} memory)"
    if predicted:
        line += f"; predicted {predicted['total']:.2f} GB ({components(predicted)})"
    return line
