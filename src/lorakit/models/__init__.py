"""Base models: loading by name, local transformers directory or GGUF file, with the dequantized-GGUF cache
(loading.py); random-weight models of real architectures' shapes for benchmarks (synthetic.py)."""

from .loading import load_model, load_tokenizer, resolve_model_dir

__all__ = ["load_model", "load_tokenizer", "resolve_model_dir"]
