"""`lorakit` command line: train, generate, chat, eval, export, serve, calc.

Errors in user input print one line and exit with status 2 (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

from . import commands
from .utils import check_positive_int

EXIT_USAGE = 2


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
        check_positive_int("value", value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    return value


def port_number(text: str) -> int:
    """argparse type: a TCP port, 1-65535."""
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in 1..65535, got {value}")
    return value


def name_and_dir(text: str) -> tuple[str, str]:
    """argparse type: NAME=DIR (an adapter name and its directory, which must exist)."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"must look like NAME=DIR, got {text!r}")
    if not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"adapter directory {path} does not exist")
    return name, path


def _add_runtime_args(p: argparse.ArgumentParser, default_dtype: str = "auto") -> None:
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default=default_dtype,
                   help="base model dtype (auto: bf16 where the CPU/GPU has fast bf16, else fp32; adapters stay fp32)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the model runs (auto: the GPU when one is visible)")


def _add_model_args(p: argparse.ArgumentParser, adapter_required: bool) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="model name (smollm2-135m), local transformers directory, or .gguf file")
    p.add_argument("--adapter", required=adapter_required, default=None,
                   help="adapter directory (PEFT format)" + ("" if adapter_required else "; omit for the base model"))


def _add_train_command(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a LoRA adapter (no arguments: the demo)", allow_abbrev=False,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=textwrap.dedent("""\
                           Fine-tune a LoRA adapter. With no arguments: the embedded SmolLM2-135M-Instruct
                           on the bundled demo data. Settings come from defaults, then CONFIG.yaml, then
                           --key=value (or --key value) overrides (dotted for sections), e.g.
                             lorakit train configs/demo.yaml --lr=5e-4 --lora.r=32 --output_dir=runs/x
                           Preference training on {"prompt", "chosen", "rejected"} rows (TRL's formats):
                             lorakit train configs/dpo_demo.yaml     (--method=dpo|orpo, --beta=0.1,
                             --loss_type=sigmoid|ipo|hinge|robust, --init_adapter DIR to start from an adapter)
                           Writes OUT/adapter/, OUT/loss.png, OUT/metrics.jsonl, OUT/config.yaml."""))
    p.add_argument("config", nargs="?", help="YAML file of training settings")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--force", action="store_true", help="replace a finished run already in OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--quantize", choices=["nf4"], default=None, help="QLoRA: frozen base in 4-bit NF4")


def _add_generate_command(sub) -> None:
    p = sub.add_parser("generate", help="generate a completion for a prompt")
    _add_model_args(p, adapter_required=False)
    p.add_argument("prompt", help="user message (sent through the chat template)")
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    _add_runtime_args(p)


def _add_chat_command(sub) -> None:
    p = sub.add_parser("chat", help="interactive chat, streaming tokens (empty line or Ctrl-D quits)")
    _add_model_args(p, adapter_required=False)
    p.add_argument("--max-new-tokens", type=positive_int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    _add_runtime_args(p)


def _add_export_command(sub) -> None:
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
    p.add_argument("--gguf-pretokenizer", default=None, metavar="NAME",
                   help="gguf: llama.cpp's pre-tokenizer name (e.g. llama-bpe, qwen2, smollm, gpt-2), for a tokenizer "
                        "llama.cpp's converter does not recognise (default: found as that converter finds it)")
    p.add_argument("--quantize", choices=["nf4"], default=None, help="base was trained in 4 bits: load it so")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")


def _add_serve_command(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server for a base model and many adapters")
    p.add_argument("--model", default="smollm2-135m", help="model name, transformers directory or .gguf file")
    p.add_argument("--adapter", action="append", default=[], type=name_and_dir, metavar="NAME=DIR",
                   help="adapter to load (repeatable)")
    p.add_argument("--lora-modules", nargs="+", default=[], type=name_and_dir, metavar="NAME=DIR",
                   help="vLLM's spelling of --adapter: adapters to register at start")
    p.add_argument("--adapter-root", default=None,
                   help="the load endpoints read only under this directory; a request naming an adapter not loaded "
                        "yet loads DIR/NAME from here")
    p.add_argument("--host", default="127.0.0.1", help="127.0.0.1: this machine only; 0.0.0.0: every interface")
    p.add_argument("--port", type=port_number, default=8000)
    p.add_argument("--max-batch-size", type=positive_int, default=16, help="rows decoded together (continuous)")
    p.add_argument("--max-wait-ms", type=float, default=0.0,
                   help="an idle server waits this long for companions of its first request")
    p.add_argument("--prefill-chunk", type=positive_int, default=128,
                   help="prompt tokens prefilled per step, between decoding steps")
    p.add_argument("--kv-cache-gb", type=float, default=2.0,
                   help="memory for keys/values (batch + prefix cache); requests beyond it wait")
    p.add_argument("--prefix-cache-gb", type=float, default=0.5, help="of --kv-cache-gb, for shared prompt prefixes")
    p.add_argument("--max-loras", type=positive_int, default=8, help="distinct adapters in one batch")
    p.add_argument("--max-cpu-loras", type=positive_int, default=64,
                   help="adapters kept in memory (least recently used unloaded, reloaded on demand)")
    p.add_argument("--api-key", default=None,
                   help="Bearer key for every endpoint but /health (default: $LORAKIT_API_KEY)")
    p.add_argument("--admin-api-key", default=None,
                   help="Bearer key for loading/unloading adapters (default: the --api-key)")
    p.add_argument("--max-tokens-cap", type=positive_int, default=512, help="upper bound on max_tokens")
    p.add_argument("--max-prompt-tokens", type=positive_int, default=2048)
    p.add_argument("--max-body-bytes", type=positive_int, default=1 << 20)
    p.add_argument("--runs", default=None, metavar="DIR",
                   help="training runs shown in the playground (default: runs/ when it exists)")
    p.add_argument("--no-playground", action="store_true", help="no browser page at / (the API only)")
    p.add_argument("--allow-training", action="store_true", help="the Train view may upload data and start "
                   "`lorakit train` runs under --runs (default runs/); without it the training routes answer 403")
    p.add_argument("--data-root", default=None, metavar="DIR", help="data training may read (default RUNS/data)")
    p.add_argument("--max-upload-mb", type=float, default=64.0, help="largest data file upload (413 above it)")
    _add_runtime_args(p)


def _add_merge_adapters_command(sub) -> None:
    p = sub.add_parser("merge-adapters", help="combine adapters into one (linear, cat, svd, ties, dare, ...)")
    p.add_argument("--model", default="smollm2-135m", help="base model the adapters were trained on")
    p.add_argument("--adapter", action="append", required=True, type=name_and_dir, metavar="NAME=DIR",
                   help="adapter (repeatable)")
    p.add_argument("--weights", required=True, help="comma-separated weights, one per adapter")
    p.add_argument("--type", default="svd", help="linear, cat, svd, ties, dare_linear, dare_ties, magnitude_prune, "
                                                  "or their _svd forms")
    p.add_argument("--density", type=float, default=None, help="for ties / dare / magnitude_prune")
    p.add_argument("--rank", type=positive_int, default=None, help="svd: rank of the result (default: largest input rank)")
    p.add_argument("--out", required=True, help="directory for the combined adapter")
    p.add_argument("--force", action="store_true", help="overwrite --out")


def _add_calc_command(sub) -> None:
    p = sub.add_parser("calc", help="LoRA parameter counts, memory estimates, rank suggestions",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=textwrap.dedent("""\
                           Examples:
                             lorakit calc --shape 4096x4096 --rank 8
                             lorakit calc --arch llama-2-7b --targets q_proj,v_proj --rank 16 --memory-gb 24
                             lorakit calc --arch path/to/config.json --targets all --rank 8 --json
                             lorakit calc --suggest-rank complex --model-size 7e9
                             lorakit calc --model path/to/model --targets all --rank 16 --quantize nf4 \\
                                 --batch-size 4 --max-length 512 --gradient-checkpointing   # a training run's peak"""))
    p.add_argument("--shape", help="one matrix, D_OUTxD_IN (e.g. 4096x4096)")
    p.add_argument("--model", help="a model (name, directory or config.json): predict a lorakit training run's peak "
                                   "memory, as `lorakit train` does before it starts")
    p.add_argument("--quantize", choices=["nf4"], default=None, help="--model: frozen base in NF4 (QLoRA)")
    p.add_argument("--bf16", action="store_true", help="--model: base and compute in bf16 (default fp32)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="--model: rows per micro-batch")
    p.add_argument("--max-length", type=positive_int, default=256, help="--model: tokens per row")
    p.add_argument("--gradient-checkpointing", action="store_true", help="--model: recompute activations")
    p.add_argument("--arch", help="built-in architecture name or a config.json path")
    p.add_argument("--targets", default="q_proj,v_proj", help="comma-separated module names, or 'all'")
    p.add_argument("--rank", type=positive_int, default=8)
    p.add_argument("--tokens", type=positive_int, default=2048, help="tokens per step for the activation estimate")
    p.add_argument("--memory-gb", type=float, default=None, help="say what fits in this much GPU/CPU memory")
    p.add_argument("--suggest-rank", choices=["simple", "medium", "complex"], help="task complexity")
    p.add_argument("--model-size", type=float, default=None, help="parameters, e.g. 7e9 (for --suggest-rank)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _add_suggest_ranks_command(sub) -> None:
    p = sub.add_parser("suggest-ranks", help="per-layer ranks for a parameter budget, from an importance probe",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=textwrap.dedent("""                           Spend a LoRA parameter budget across layers: a short AdaLoRA-style probe on your
                           data scores every rank-1 direction of every target, the budget goes to the best.
                           Prints the ranks and writes a training config holding exactly those targets and ranks
                           (lora.target_modules + lora.rank_pattern), e.g.
                             lorakit suggest-ranks --budget 1000000 --out ranks.yaml
                             lorakit train ranks.yaml --data=my.jsonl ..."""))
    p.add_argument("--model", default="smollm2-135m", help="model name, local transformers directory, or .gguf")
    p.add_argument("--budget", type=positive_int, required=True, help="total LoRA parameters to spend")
    p.add_argument("--data", default=None, help="probe data (any training format; default: the demo data)")
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                   help="comma-separated module names")
    p.add_argument("--max-rank", type=positive_int, default=32, help="largest rank the probe considers per matrix")
    p.add_argument("--steps", type=positive_int, default=8, help="probe optimizer steps")
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument("--max-length", type=positive_int, default=256)
    p.add_argument("--out", default=None, help="write a training config (YAML) with these targets and ranks")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _add_eval_command(sub) -> None:
    p = sub.add_parser("eval", help="loss and perplexity of a model/adapter on a data file")
    _add_model_args(p, adapter_required=False)
    p.add_argument("--data", required=True, help="data file (any training format)")
    p.add_argument("--max-length", type=positive_int, default=512)
    p.add_argument("--batch-size", type=positive_int, default=8)
    _add_runtime_args(p, default_dtype="fp32")  # losses comparable across machines by default


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA fine-tuning and serving toolkit.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add_command in (_add_train_command, _add_generate_command, _add_chat_command, _add_export_command,
                        _add_serve_command, _add_merge_adapters_command, _add_calc_command, _add_suggest_ranks_command,
                        _add_eval_command):  # the order `lorakit --help` lists them in
        add_command(sub)
    return parser


def joined_overrides(argv: list[str], known: set[str]) -> list[str]:
    """`train`'s settings written `--key value` become `--key=value` (as written with `=`); options the train
    parser defines (`--quantize nf4`) and flags followed by another option stay as they are."""
    out, i = [], 0
    while i < len(argv):
        item = argv[i]
        follows = argv[i + 1] if i + 1 < len(argv) else None
        if item.startswith("--") and "=" not in item and item not in known and follows is not None \
                and not follows.startswith("--"):
            out.append(f"{item}={follows}")
            i += 2
            continue
        out.append(item)
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line
    # The CLI prints its own progress; transformers' weight-loading bars and advisory warnings are noise here
    # (set these variables yourself to see them again).
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    settings: list[str] = []
    if "train" in argv:
        at = argv.index("train") + 1
        train_parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
        known = set(train_parser._option_string_actions) | {"--debug"}
        rest = joined_overrides(argv[at:], known)
        # --key=value settings bypass argparse, which takes a value with spaces ("$(cat ranks.yaml)") as positional
        settings = [a for a in rest if a.startswith("--") and "=" in a and a.split("=", 1)[0] not in known]
        argv = argv[:at] + [a for a in rest if a not in settings]
    args, unknown = parser.parse_known_args([a for a in argv if a != "--debug"])
    args.debug = debug
    if args.command is None:
        parser.print_help()
        return 0
    if unknown and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        if args.command == "train":
            return commands.cmd_train(args, settings + unknown)
        return {"generate": commands.cmd_generate, "chat": commands.cmd_chat, "eval": commands.cmd_eval,
                "calc": commands.cmd_calc, "export": commands.cmd_export, "serve": commands.cmd_serve,
                "merge-adapters": commands.cmd_merge_adapters,
                "suggest-ranks": commands.cmd_suggest_ranks}[args.command](args)
    except (ValueError, OSError) as e:  # FileNotFoundError / FileExistsError are OSErrors
        if args.debug:
            raise
        print(f"lorakit {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
