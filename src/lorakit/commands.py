"""What each `lorakit` subcommand does, given its parsed arguments (cli.py parses and dispatches).

Heavy imports (torch, transformers) happen inside the commands so `lorakit --help` starts instantly.
"""

# imports inside functions: torch, transformers, fastapi load in the subcommand that needs them (--help: 0.1 s)

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys


def _load(model_name: str, adapter: str | None, quantize: str | None = None, dtype: str = "fp32",
          device: str = "cpu"):
    """Model (+ adapter, fp32 adapters on the base's device) and tokenizer; `dtype` / `device` as the CLI's
    --dtype / --device (auto: bf16 where the device has fast bf16; the GPU when torch sees one)."""
    from .adapters.model import PeftModel
    from .hardware import compute_dtype_note, dtype_decision, resolve_device_type, resolve_dtype
    from .models.loading import load_model, load_tokenizer

    if adapter and not os.path.isdir(adapter):
        raise FileNotFoundError(f"adapter directory {adapter} does not exist")
    device_type = resolve_device_type(device)
    if dtype == "auto":
        print(compute_dtype_note(dtype_decision(device_type)), file=sys.stderr)
    tokenizer = load_tokenizer(model_name)
    model = load_model(model_name, quantize=quantize, dtype=resolve_dtype(dtype, device_type), device=device_type)
    if adapter:
        model = PeftModel.from_pretrained(model, adapter)
    return model.eval(), tokenizer


def cmd_train(args, overrides: list[str]) -> int:
    from .train.config import load_train_config
    from .train.loop import train

    extra = overrides + (["--resume=true"] if args.resume else []) + (["--overwrite=true"] if args.force else []) \
        + (["--progress=false"] if args.quiet else []) \
        + ([f"--quantize={args.quantize}"] if args.quantize else [])
    cfg = load_train_config(args.config, extra)
    result = train(cfg)
    if result["interrupted"]:
        return 130
    if not result["is_main"]:
        return 0
    history = result["history"]
    if cfg.method == "grpo":
        print_reward_table(history)
    evals = [r["eval_loss"] for r in history if "eval_loss" in r]
    print(f"\ntrained {result['steps']} steps in {result['seconds']:.0f} s; final train loss "
          f"{history[-1]['train_loss']:.3f}" + (f"; held-out loss {evals[0]:.3f} (before) -> {evals[-1]:.3f}"
                                                if evals else ""))
    from .train.memory_check import memory_report

    print(memory_report(result["peak_memory_gb"], result["settings"].get("predicted_peak_gb"), result["device"]))
    print(f"adapter: {result['adapter_dir']}   plot: {os.path.join(cfg.output_dir, 'loss.png')}")
    for prompt, before, after in zip(result.get("prompts", []), result["before"], result.get("after", [])):
        print(f"\n> {prompt}\n  before: {before}\n  after:  {after}")
    return 0


def print_reward_table(history: list[dict]) -> None:
    """GRPO: the held-out rewards (greedy completions) of the first and last evaluation, per function and total."""
    evals = [r for r in history if "eval_reward" in r]
    if len(evals) < 2:
        return
    first, last = evals[0], evals[-1]
    names = ["eval_reward"] + sorted(k for k in first if k.startswith("eval_rewards/"))
    width = max(24, *(len(n) for n in names))
    print(f"\n{'held-out reward (greedy)':<{width}}  {'step ' + str(first['step']):>9}  {'step ' + str(last['step']):>9}")
    for name in names:
        label = "total" if name == "eval_reward" else name[len("eval_rewards/"):-len("/mean")]
        print(f"{label:<{width}}  {first[name]:>9.3f}  {last[name]:>9.3f}")


def cmd_generate(args) -> int:
    from .generation import generate_reply

    model, tokenizer = _load(args.model, args.adapter, dtype=args.dtype, device=args.device)
    print(generate_reply(model, tokenizer, [{"role": "user", "content": args.prompt}], args.max_new_tokens,
                         args.temperature))
    return 0


def cmd_chat(args) -> int:
    import signal
    import threading

    from transformers import TextIteratorStreamer

    from .generation import generate_reply

    model, tokenizer = _load(args.model, args.adapter, dtype=args.dtype, device=args.device)
    messages: list[dict] = []
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = threading.Event()
        thread = threading.Thread(target=generate_reply, args=(model, tokenizer, list(messages), args.max_new_tokens,
                                                              args.temperature, streamer, stop))
        thread.start()
        print("bot> ", end="", flush=True)
        reply = ""
        # Ctrl-C ends this reply (the partial answer stays in the conversation): the handler only sets the event, so
        # no KeyboardInterrupt can land inside the streamer's queue while it holds its lock (which would leave the
        # generating thread blocked on it forever); generation stops after the current token and the stream ends.
        previous = signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
        try:
            for piece in streamer:
                reply += piece
                print(piece, end="", flush=True)
        finally:
            signal.signal(signal.SIGINT, previous)
        if stop.is_set():
            print(" [stopped]", end="", flush=True)
        thread.join()
        print()
        messages.append({"role": "assistant", "content": reply.strip()})
    return 0


def cmd_eval(args) -> int:
    from .train import data as D
    from .train.loop import evaluate
    from .train.loss import CausalLMLoss

    model, tokenizer = _load(args.model, args.adapter, dtype=args.dtype, device=args.device)
    examples, stats = D.load_examples(args.data, tokenizer, args.max_length)
    loss = evaluate(CausalLMLoss(model), examples, args.batch_size, tokenizer.pad_token_id,
                    next(model.parameters()).device)
    print(f"rows: {len(examples)} ({stats.truncated} truncated)   loss: {loss:.4f}   perplexity: {math.exp(loss):.2f}")
    return 0


def cmd_export(args) -> int:
    import torch

    from . import export

    model, tokenizer = _load(args.model, args.adapter, args.quantize)
    if args.format == "hf":
        dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}.get(args.dtype)
        out = export.export_hf(model, tokenizer, args.out, dtype=dtype, force=args.force)
    elif args.format == "gguf":
        out = export.export_gguf(model, tokenizer, args.out, args.gguf_type, force=args.force,
                                 pretokenizer=args.gguf_pretokenizer)
    else:
        out = export.export_gguf_adapter(model, args.out, force=args.force)
    print(f"wrote {out}")
    return 0


def cmd_serve(args) -> int:
    try:
        from .serve import ServeConfig, serve
        from .studio import add_train_routes
    except ImportError:  # pragma: no cover
        raise ValueError("lorakit serve needs fastapi and uvicorn: pip install 'lorakit[serve]'") from None
    from .hardware import compute_dtype_note, dtype_decision, resolve_device_type

    if args.dtype == "auto":
        print(compute_dtype_note(dtype_decision(resolve_device_type(args.device))), file=sys.stderr)
    serve(ServeConfig(model=args.model, adapters=dict(args.adapter + args.lora_modules),
                      adapter_root=args.adapter_root, prefill_chunk=args.prefill_chunk, kv_cache_gb=args.kv_cache_gb,
                      prefix_cache_gb=args.prefix_cache_gb, max_loras=args.max_loras,
                      max_cpu_loras=args.max_cpu_loras, api_key=args.api_key or os.environ.get("LORAKIT_API_KEY"),
                      admin_api_key=args.admin_api_key or os.environ.get("LORAKIT_ADMIN_API_KEY"),
                      max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms, device=args.device,
                      max_tokens_cap=args.max_tokens_cap, max_prompt_tokens=args.max_prompt_tokens, dtype=args.dtype,
                      max_body_bytes=args.max_body_bytes, playground=not args.no_playground,
                      runs_dir=args.runs or ("runs" if os.path.isdir("runs") or args.allow_training else None),
                      allow_training=args.allow_training, data_root=args.data_root,
                      max_upload_bytes=int(args.max_upload_mb * (1 << 20))),
          host=args.host, port=args.port, extensions=[add_train_routes])
    return 0


def cmd_merge_adapters(args) -> int:
    from . import export
    from .adapters.model import LoraModel
    from .models.loading import load_model

    pairs = args.adapter
    try:
        weights = [float(w) for w in args.weights.split(",")]
    except ValueError:
        raise ValueError(f"--weights must be comma-separated numbers, got {args.weights!r}") from None
    export.check_target(args.out, args.force, "adapter_dir")
    (first, first_path), rest = pairs[0], pairs[1:]
    model = LoraModel.from_pretrained(load_model(args.model), first_path, adapter_name=first)
    for name, path in rest:
        model.load_adapter(path, adapter_name=name)
    model.add_weighted_adapter([n for n, _ in pairs], weights, "__merged__", args.type, svd_rank=args.rank,
                               density=args.density)
    model.save_adapter("__merged__", args.out)
    print(f"wrote {args.out} (r={model.peft_config['__merged__'].r}, {args.type} of {[n for n, _ in pairs]})")
    return 0


def cmd_calc(args) -> int:
    from . import calc

    if args.suggest_rank:
        if args.model_size is None:
            raise ValueError("--suggest-rank needs --model-size (parameters, e.g. 7e9)")
        out = calc.suggest_rank(args.suggest_rank, args.model_size)
        text = f"suggested r = {out['r']}, lora_alpha = {out['lora_alpha']} (alpha = 2r)"
    elif args.shape:
        try:
            d_out, d_in = (int(v) for v in args.shape.lower().split("x"))
        except ValueError:
            raise ValueError(f"--shape must look like 4096x4096, got {args.shape!r}") from None
        out = {"shape": [d_out, d_in], "r": args.rank, "lora_params": calc.lora_params(d_out, d_in, args.rank)}
        text = f"LoRA r={args.rank} on a {d_out}x{d_in} matrix: {out['lora_params']:,} parameters"
    elif args.model:
        out, text = _predict_training_run(args)
    elif args.arch:
        arch = calc.get_arch(args.arch)
        targets = sorted(arch.matrices()) if args.targets == "all" else [t for t in args.targets.split(",") if t]
        out = calc.report(args.arch, targets, args.rank, args.tokens, args.memory_gb)
        lines = [f"{args.arch}: {out['base_params']:,} base parameters; LoRA r={args.rank} on {', '.join(targets)}: "
                 f"{out['lora_params']:,} trainable ({out['trainable_percent']:.3f} %)",
                 f"memory (GB, {args.tokens} tokens/step, checkpointing): "
                 + "   ".join(f"{m} {row['total']:.1f}" for m, row in out["memory_gb"].items())]
        if args.memory_gb is not None:
            lines.append(f"fits in {args.memory_gb:g} GB: " + ", ".join(
                f"{m} {'yes' if ok else 'no'}" for m, ok in out["fits_in"].items() if m != "memory_gb"))
        text = "\n".join(lines)
    else:
        raise ValueError("give --shape, --arch, --model or --suggest-rank (see lorakit calc --help)")
    print(json.dumps(out, indent=2) if args.json else text)
    return 0


def _predict_training_run(args) -> tuple[dict, str]:
    """`lorakit calc --model`: the predicted peak of a training run, by component (memory_check's model)."""
    from . import calc
    from .models.loading import resolve_model_dir
    from .train.memory_check import available_gb

    arch = calc.get_arch(args.model if args.model.endswith(".json") else resolve_model_dir(args.model))
    targets = None if args.targets == "all" else tuple(t for t in args.targets.split(",") if t)
    shape = calc.RunShape(storage=args.quantize, compute="bf16" if args.bf16 else "fp32", batch=args.batch_size,
                          length=args.max_length, rank=args.rank, targets=targets,
                          gradient_checkpointing=args.gradient_checkpointing)
    predicted = calc.predict_run(arch, shape)
    available = available_gb(args.memory_gb)
    out = {"model": args.model, "base_params": arch.base_params(), "run": dataclasses.asdict(shape),
           "predicted_peak_gb": predicted, "available_gb": available}
    text = (f"{args.model}: {arch.base_params() / 1e9:.2f} B base parameters; predicted peak "
            f"{predicted['total']:.2f} GB\n  " + "\n  ".join(f"{name:<12}{value:7.2f} GB" for name, value in
                                                             predicted.items() if name != "total")
            + (f"\n{'fits' if predicted['total'] <= available else 'does not fit'} in {available:.1f} GB"
               if available is not None else ""))
    return out, text


def cmd_suggest_ranks(args) -> int:
    import yaml

    from .models.loading import load_model, load_tokenizer
    from .train import data as D
    from .train.config import DEMO_DATA
    from .train.rank_probe import suggest_rank_pattern
    from .utils import atomic_path

    tokenizer = load_tokenizer(args.model)
    examples, _ = D.load_examples(args.data or DEMO_DATA, tokenizer, args.max_length)
    batches = [D.collate(examples[i:i + args.batch_size], tokenizer.pad_token_id)
               for i in range(0, min(len(examples), args.steps * args.batch_size), args.batch_size)]
    model = load_model(args.model)
    targets = [t for t in args.targets.split(",") if t]
    ranks = suggest_rank_pattern(model, args.budget, batches, targets, max_rank=args.max_rank,
                                 probe_steps=args.steps)
    sizes = {n: m.in_features + m.out_features for n, m in model.named_modules() if n in ranks}
    spent = sum(r * sizes[n] for n, r in ranks.items())
    if args.out:  # a training config: exactly these targets, at these ranks (nothing else at the default r)
        with atomic_path(args.out) as tmp:
            with open(tmp, "w") as f:
                f.write(f"# lorakit suggest-ranks --budget {args.budget}: {spent:,} LoRA parameters\n")
                f.write(yaml.safe_dump({"lora": {"target_modules": sorted(ranks), "rank_pattern": ranks}},
                                       sort_keys=False, width=10**6))
    if args.json:
        print(json.dumps({"rank_pattern": ranks, "parameters": spent, "budget": args.budget}, indent=2))
        return 0
    for name, rank in ranks.items():
        print(f"{rank:4d}  {name}")
    print(f"{spent:,} LoRA parameters of a {args.budget:,} budget over {len(ranks)} matrices"
          + (f"; training config written to {args.out} (lorakit train {args.out} ...)" if args.out else ""))
    return 0
