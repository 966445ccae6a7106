"""Which pre-tokenizer llama.cpp must use for a BPE tokenizer, found the way llama.cpp's own converter finds it.

llama.cpp splits text with a named regex set (`tokenizer.ggml.pre`) before it applies the BPE merges; a wrong name
silently tokenizes code, runs of spaces and contractions differently from transformers. Its converter
(convert_hf_to_gguf.py, `get_vocab_base_pre`) encodes one fixed probe text with the transformers tokenizer and looks
the sha256 of the token ids up in a table of known tokenizers. lorakit does the same with the same probe text and
the table's entries for the tokenizers of the families it exports and other common BPE tokenizers; anything else
is refused with the option that names it, never written as "default".
"""

from __future__ import annotations

from hashlib import sha256

# llama.cpp's probe text (newlines, tabs, runs of spaces, emoji with joiners, digit runs, Khmer, Chinese, Cyrillic,
# quote and punctuation runs, contractions in odd cases).
CHECK_TEXT = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n"
              "\U0001F680 (normal) \U0001F636\u200d\U0001F32B\ufe0f (multiple emojis concatenated) \u2705 "
              "\U0001F999\U0001F999 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
              "\u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001F601 "
              "?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= "
              "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 "
              "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? "
              "'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")

# sha256 of str(tokenizer.encode(CHECK_TEXT)) -> llama.cpp's pre-tokenizer name (from llama.cpp's converter table;
# the model each hash was taken from in the comment).
KNOWN_PRETOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM-135M (and SmolLM2)
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5-7B (Qwen2, Qwen2.5)
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3-Embedding-0.6B
    "d30d75d9059f1aa2c19359de71047b3ae408c70875e8a3ccf8c5fba56c9d8af4": "qwen35",  # Qwen3.5-9B-Instruct
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral-Nemo-Base-2407
    "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3": "pixtral",  # pixtral-12b
    "d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406": "llama4",  # Llama-4-Scout-17B-16E
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",  # Smaug-Llama-3-70B
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",  # deepseek-llm-7b-base
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",  # deepseek-coder-6.7b
    "877081d19cf6996e2c4ff0e1236341e9b7bde288f5311a56a937f0afbbb3aeb5": "deepseek-v3",  # DeepSeek-V3
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",  # R1-Distill-Qwen-1.5B
    "8aeee3860c56296a157a1fe2fad249ec40aa59b1bb5709f4ade11c4e6fe652ed": "falcon",  # falcon-7b
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",  # Falcon3-7B-Base
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",  # starcoder2-3b
    "32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3": "stablelm2",  # stablelm-2-zephyr-1_6b
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",  # microsoft/phi-2
    "9c2227e4dd922002fb81bde4fc02b0483ca4f12911410dee2255e4987644e3f8": "command-r",  # c4ai-command-r-v01
    "a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e": "dbrx",  # dbrx-base
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",  # Xenova/gpt-4o
    "4e2b24cc4770243d65a2c9ec19770a72f08cffc161adbb73fcbb6b7dd45a0aae": "exaone",  # EXAONE-3.0-7.8B-Instruct
    "2085e1638f6c377a0aa4ead21b27bb4cb941bf800df86ed391011769c1758dfb": "exaone4",  # EXAONE-4.0-32B
    "169bf0296a13c4d9b7672313f749eb36501d931022de052aad6e36f2bf34dd51": "lfm2",  # LiquidAI/LFM2-Tokenizer
    "d5f1dd6f980fec569fb218a81a7658ac45fc56b38c5a0adeb1c232fbe04ef5ec": "seed-coder",  # Seed-Coder-8B-Base
    "3c30d3ad1d6b64202cd222813e7736c2db6e1bd6d67197090fc1211fbc612ae7": "bloom",  # bigscience/bloom
    "8b5a93ed704057481f240da0be7e7dca721d7f8f4755263b6807227a2cbeae65": "roberta-bpe",  # stsb-roberta-base
    "60824e3c0d9401f89943cbb2fff727f0e2d4c545ba4df2d6e4f09a6db0f5b450": "chameleon",  # chameleon-7b
}
NAMES = sorted(set(KNOWN_PRETOKENIZERS.values()))


def probe_hash(tokenizer) -> str:
    """The converter's identifier of a tokenizer's pre-tokenization: sha256 of its ids for CHECK_TEXT."""
    return sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()


def pretokenizer_name(tokenizer, source_name: str | None = None, override: str | None = None) -> str:
    """`override` (--gguf-pretokenizer) if given, else the name in the GGUF the model came from, else the converter
    table's name for this tokenizer; a tokenizer the table does not know is refused."""
    if override is not None:
        if not isinstance(override, str) or not override.strip():
            raise ValueError(f"--gguf-pretokenizer must be a llama.cpp pre-tokenizer name, got {override!r}")
        return override
    if source_name:
        return source_name
    digest = probe_hash(tokenizer)
    found = KNOWN_PRETOKENIZERS.get(digest)
    if found is None:
        raise ValueError(f"llama.cpp's converter does not know this tokenizer's pre-tokenizer (probe hash "
                         f"{digest[:16]}...), and a wrong one silently tokenizes text differently; "
                         f"name it with --gguf-pretokenizer NAME (export_gguf(..., pretokenizer=NAME)), e.g. one "
                         f"of {', '.join(NAMES)}")
    return found
