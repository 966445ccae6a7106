"""`lorakit` command line: train, generate, chat, eval, export, serve, calc.

Errors in user input print one line and exit with status 2 (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import textwrap

EXIT_USAGE = 2


def _add_model_args(p: argparse.ArgumentParser, adapter_required: bool) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="model name (smollm2-135m), local transformers directory, or .gguf file")
    p.add_argument("--adapter", required=adapter_required, default=None,
                   help="adapter directory (PEFT format)" + ("" if adapter_required else "; omit for the base model"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA fine-tuning and serving toolkit.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="fine-tune a LoRA adapter (no arguments: the demo)", allow_abbrev=False,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=textwrap.dedent("""\
                           Fine-tune a LoRA adapter. With no arguments: the embedded SmolLM2-135M-Instruct
                           on the bundled demo data. Settings come from defaults, then CONFIG.yaml, then
                           --key=value overrides (dotted for sections), e.g.
                             lorakit train configs/demo.yaml --lr=5e-4 --lora.r=32 --output_dir=runs/x
                           Writes OUT/adapter/, OUT/loss.png, OUT/metrics.jsonl, OUT/config.yaml."""))
    p.add_argument("config", nargs="?", help="YAML file of training settings")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--quantize", choices=["nf4"], default=None, help="QLoRA: frozen base in 4-bit NF4")

    p = sub.add_parser("generate", help="generate a completion for a prompt")
    _add_model_args(p, adapter_required=False)
    p.add_argument("prompt", help="user message (sent through the chat template)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")

    p = sub.add_parser("chat", help="interactive chat, streaming tokens (empty line or Ctrl-D quits)")
    _add_model_args(p, adapter_required=False)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")

    p = sub.add_parser("export", help="merged model (HF or GGUF) or a llama.cpp adapter GGUF",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=textwrap.dedent("""\
                           Formats:
                             hf            merged transformers directory (safetensors, config, tokenizer)
                             gguf          merged model as one GGUF file (tokenizer + chat template inside)
                             gguf-adapter  llama.cpp LoRA adapter GGUF, for use beside the base GGUF"""))
    _add_model_args(p, adapter_required=True)
    p.add_argument("--format", required=True, choices=["hf", "gguf", "gguf-adapter"])
    p.add_argument("--out", required=True, help="output directory (hf) or .gguf file")
    p.add_argument("--dtype", choices=["bf16", "f16", "f32"], default=None, help="hf: weight dtype (default: base's)")
    p.add_argument("--gguf-type", choices=["f32", "f16", "bf16", "q8_0"], default="f16", help="gguf: tensor type")
    p.add_argument("--quantize", choices=["nf4"], default=None, help="base was trained in 4 bits: load it so")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server for a base model and many adapters")
    p.add_argument("--model", default="smollm2-135m", help="model name, transformers directory or .gguf file")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="adapter to load (repeatable)")
    p.add_argument("--adapter-root", default=None, help="POST /v1/adapters may load only from under this directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together")
    p.add_argument("--max-wait-ms", type=float, default=10.0, help="how long a batch waits to fill up")
    p.add_argument("--max-tokens-cap", type=int, default=512, help="upper bound on max_tokens")
    p.add_argument("--max-prompt-tokens", type=int, default=2048)
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)

    p = sub.add_parser("merge-adapters", help="combine adapters into one (linear, cat, svd, ties, dare, ...)")
    p.add_argument("--model", default="smollm2-135m", help="base model the adapters were trained on")
    p.add_argument("--adapter", action="append", required=True, metavar="NAME=DIR", help="adapter (repeatable)")
    p.add_argument("--weights", required=True, help="comma-separated weights, one per adapter")
    p.add_argument("--type", default="svd", help="linear, cat, svd, ties, dare_linear, dare_ties, magnitude_prune, "
                                                  "or their _svd forms")
    p.add_argument("--density", type=float, default=None, help="for ties / dare / magnitude_prune")
    p.add_argument("--rank", type=int, default=None, help="svd: rank of the result (default: largest input rank)")
    p.add_argument("--out", required=True, help="directory for the combined adapter")
    p.add_argument("--force", action="store_true", help="overwrite --out")

    p = sub.add_parser("calc", help="LoRA parameter counts, memory estimates, rank suggestions",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=textwrap.dedent("""\
                           Examples:
                             lorakit calc --shape 4096x4096 --rank 8
                             lorakit calc --arch llama-2-7b --targets q_proj,v_proj --rank 16 --memory-gb 24
                             lorakit calc --arch path/to/config.json --targets all --rank 8 --json
                             lorakit calc --suggest-rank complex --model-size 7e9"""))
    p.add_argument("--shape", help="one matrix, D_OUTxD_IN (e.g. 4096x4096)")
    p.add_argument("--arch", help="built-in architecture name or a config.json path")
    p.add_argument("--targets", default="q_proj,v_proj", help="comma-separated module names, or 'all'")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--tokens", type=int, default=2048, help="tokens per step for the activation estimate")
    p.add_argument("--memory-gb", type=float, default=None, help="say what fits in this much GPU/CPU memory")
    p.add_argument("--suggest-rank", choices=["simple", "medium", "complex"], help="task complexity")
    p.add_argument("--model-size", type=float, default=None, help="parameters, e.g. 7e9 (for --suggest-rank)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("suggest-ranks", help="per-layer ranks for a parameter budget, from an importance probe",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=textwrap.dedent("""                           Spend a LoRA parameter budget across layers: a short AdaLoRA-style probe on your
                           data scores every rank-1 direction of every target, the budget goes to the best.
                           Prints the ranks and writes a `rank_pattern` usable in a training config, e.g.
                             lorakit suggest-ranks --budget 1000000 --out ranks.yaml
                             lorakit train --lora.rank_pattern="$(cat ranks.yaml)" ..."""))
    p.add_argument("--model", default="smollm2-135m", help="model name, local transformers directory, or .gguf")
    p.add_argument("--budget", type=int, required=True, help="total LoRA parameters to spend")
    p.add_argument("--data", default=None, help="probe data (any training format; default: the demo data)")
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                   help="comma-separated module names")
    p.add_argument("--max-rank", type=int, default=32, help="largest rank the probe considers per matrix")
    p.add_argument("--steps", type=int, default=8, help="probe optimizer steps")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--out", default=None, help="write the rank_pattern here (YAML flow mapping)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("eval", help="loss and perplexity of a model/adapter on a data file")
    _add_model_args(p, adapter_required=False)
    p.add_argument("--data", required=True, help="data file (any training format)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    return parser


def _load(model_name: str, adapter: str | None, quantize: str | None = None):
    from .model import PeftModel
    from .models import load_model, load_tokenizer

    if adapter and not os.path.isdir(adapter):
        raise FileNotFoundError(f"adapter directory {adapter} does not exist")
    tokenizer = load_tokenizer(model_name)
    model = load_model(model_name, quantize=quantize)
    if adapter:
        model = PeftModel.from_pretrained(model, adapter)
    return model.eval(), tokenizer


def cmd_train(args, overrides: list[str]) -> int:
    from .train import train
    from .train_config import load_train_config

    extra = overrides + (["--resume=true"] if args.resume else []) + (["--progress=false"] if args.quiet else []) \
        + ([f"--quantize={args.quantize}"] if args.quantize else [])
    cfg = load_train_config(args.config, extra)
    result = train(cfg)
    if result["interrupted"]:
        return 130
    if not result["is_main"]:
        return 0
    history = result["history"]
    evals = [r["eval_loss"] for r in history if "eval_loss" in r]
    print(f"\ntrained {result['steps']} steps in {result['seconds']:.0f} s; final train loss "
          f"{history[-1]['train_loss']:.3f}" + (f"; held-out loss {evals[0]:.3f} (before) -> {evals[-1]:.3f}"
                                                if evals else ""))
    print(f"adapter: {result['adapter_dir']}   plot: {os.path.join(cfg.output_dir, 'loss.png')}")
    for prompt, before, after in zip(result.get("prompts", []), result["before"], result.get("after", [])):
        print(f"\n> {prompt}\n  before: {before}\n  after:  {after}")
    return 0


def cmd_generate(args) -> int:
    import torch

    from .data import render_prompt

    model, tokenizer = _load(args.model, args.adapter)
    ids = tokenizer(render_prompt([{"role": "user", "content": args.prompt}], tokenizer),
                    return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                             do_sample=args.temperature > 0, temperature=args.temperature or None,
                             pad_token_id=tokenizer.pad_token_id)
    print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return 0


def cmd_chat(args) -> int:
    import threading

    import torch
    from transformers import TextIteratorStreamer

    from .data import render_prompt

    model, tokenizer = _load(args.model, args.adapter)
    messages: list[dict] = []
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        ids = tokenizer(render_prompt(messages, tokenizer), return_tensors="pt", add_special_tokens=False).input_ids
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                      do_sample=args.temperature > 0, temperature=args.temperature or None,
                      pad_token_id=tokenizer.pad_token_id, streamer=streamer)
        thread = threading.Thread(target=lambda: torch.no_grad()(model.generate)(**kwargs))
        thread.start()
        print("bot> ", end="", flush=True)
        reply = ""
        for piece in streamer:
            reply += piece
            print(piece, end="", flush=True)
        thread.join()
        print()
        messages.append({"role": "assistant", "content": reply.strip()})
    return 0


def cmd_eval(args) -> int:
    from . import data as D
    from .loss import CausalLMLoss
    from .train import evaluate

    model, tokenizer = _load(args.model, args.adapter)
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
        out = export.export_gguf(model, tokenizer, args.out, args.gguf_type, force=args.force)
    else:
        out = export.export_gguf_adapter(model, args.out, force=args.force)
    print(f"wrote {out}")
    return 0


def cmd_serve(args) -> int:
    try:
        from .serve import ServeConfig, serve
    except ImportError:  # pragma: no cover
        raise ValueError("lorakit serve needs fastapi and uvicorn: pip install 'lorakit[serve]'") from None
    adapters = {}
    for item in args.adapter:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter must look like NAME=DIR, got {item!r}")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"adapter directory {path} does not exist")
        adapters[name] = path
    for name in ("max_batch_size", "max_tokens_cap", "max_prompt_tokens", "max_body_bytes"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    serve(ServeConfig(model=args.model, adapters=adapters, adapter_root=args.adapter_root,
                      max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                      max_tokens_cap=args.max_tokens_cap, max_prompt_tokens=args.max_prompt_tokens,
                      max_body_bytes=args.max_body_bytes), host=args.host, port=args.port)
    return 0


def cmd_merge_adapters(args) -> int:
    from .model import LoraModel
    from .models import load_model

    pairs = [a.partition("=") for a in args.adapter]
    if any(not sep or not name or not path for name, sep, path in pairs):
        raise ValueError("--adapter must look like NAME=DIR")
    try:
        weights = [float(w) for w in args.weights.split(",")]
    except ValueError:
        raise ValueError(f"--weights must be comma-separated numbers, got {args.weights!r}") from None
    if os.path.exists(args.out) and not args.force:
        raise FileExistsError(f"{args.out} exists; pass --force to overwrite")
    (first, _, first_path), rest = pairs[0], pairs[1:]
    model = LoraModel.from_pretrained(load_model(args.model), first_path, adapter_name=first)
    for name, _, path in rest:
        model.load_adapter(path, adapter_name=name)
    model.add_weighted_adapter([n for n, _, _ in pairs], weights, "__merged__", args.type, svd_rank=args.rank,
                               density=args.density)
    model.save_adapter("__merged__", args.out)
    print(f"wrote {args.out} (r={model.peft_config['__merged__'].r}, {args.type} of {[n for n, _, _ in pairs]})")
    return 0


def cmd_calc(args) -> int:
    import json as json_mod

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
        raise ValueError("give --shape, --arch or --suggest-rank (see lorakit calc --help)")
    print(json_mod.dumps(out, indent=2) if args.json else text)
    return 0


def cmd_suggest_ranks(args) -> int:
    import json as json_mod

    import yaml

    from . import data as D
    from .models import load_model, load_tokenizer
    from .peft_io import atomic_path
    from .train_config import DEMO_DATA
    from .variants.rank_probe import suggest_rank_pattern

    for name in ("budget", "max_rank", "steps", "batch_size", "max_length"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
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
    if args.out:
        with atomic_path(args.out) as tmp:
            with open(tmp, "w") as f:
                f.write(yaml.safe_dump(ranks, default_flow_style=True, width=10**6))
    if args.json:
        print(json_mod.dumps({"rank_pattern": ranks, "parameters": spent, "budget": args.budget}, indent=2))
        return 0
    for name, rank in ranks.items():
        print(f"{rank:4d}  {name}")
    print(f"{spent:,} LoRA parameters of a {args.budget:,} budget over {len(ranks)} matrices"
          + (f"; rank_pattern written to {args.out}" if args.out else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line
    args, unknown = parser.parse_known_args([a for a in argv if a != "--debug"])
    args.debug = debug
    if args.command is None:
        parser.print_help()
        return 0
    if unknown and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        if args.command == "train":
            return cmd_train(args, unknown)
        return {"generate": cmd_generate, "chat": cmd_chat, "eval": cmd_eval, "calc": cmd_calc,
                "export": cmd_export, "serve": cmd_serve, "merge-adapters": cmd_merge_adapters,
                "suggest-ranks": cmd_suggest_ranks}[args.command](args)
    except (ValueError, OSError) as e:  # FileNotFoundError / FileExistsError are OSErrors
        if args.debug:
            raise
        print(f"lorakit {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
