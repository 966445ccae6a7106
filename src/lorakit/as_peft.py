"""Run an unchanged PEFT script on lorakit: `python -m lorakit.as_peft SCRIPT.py [ARGS...]` (or `-m MODULE [ARGS]`).

The switch (`lorakit.install_as_peft()`) is turned on first, so the script's `import peft` — and trl's,
transformers' and accelerate's — resolve to lorakit; then the script runs as `__main__` with its own arguments.
`LORAKIT_AS_PEFT=1` does the same for a script that imports lorakit itself.
"""

from __future__ import annotations

import os
import runpy
import sys

# imports inside functions: the switch loads only once the arguments are checked (`--help` imports nothing)
USAGE = "usage: python -m lorakit.as_peft SCRIPT.py [ARGS...]  |  python -m lorakit.as_peft -m MODULE [ARGS...]"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or (argv[0] == "-m" and len(argv) < 2):
        print(USAGE + "\n\n" + __doc__.strip().split("\n\n", 1)[1], file=sys.stderr if not argv else sys.stdout)
        raise SystemExit(0 if argv else 2)
    from .ecosystem.as_peft import install_as_peft

    install_as_peft()
    if argv[0] == "-m":
        sys.argv = argv[1:]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = argv
        sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))  # as `python SCRIPT.py` does
        runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
