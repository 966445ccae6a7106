"""The model-family matrix of the docs (docs/reference/model-families.md), generated from the test results (not
written by hand).

    python tests/family_matrix.py [--page docs/reference/model-families.md]

Runs tests/test_model_families.py under pytest with a JUnit report, turns each test's outcome into a cell
(✔ passed, ✘ failed, "refused" with the reason where lorakit or PEFT refuses the combination, — where the
operation does not apply to the family) and rewrites the table between the page's family-matrix markers.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
START, END = "<!-- family-matrix:start -->", "<!-- family-matrix:end -->"
DOCS_PAGE = os.path.join(os.path.dirname(HERE), "docs", "reference", "model-families.md")
COLUMNS = {  # column title: (test function, extra parameter or None)
    "PEFT's default targets": ("test_family_beside_peft", "default"),
    "all-linear": ("test_family_beside_peft", "all-linear"),
    "mixed-adapter batches": ("test_causal_family_mixed_batches", None),
    "NF4 base (QLoRA)": ("test_family_nf4_base", None),
    "fused kernels = reference": ("test_fused_training_path_equals_the_reference_path", None),
    "GGUF export (merged)": ("test_causal_family_gguf_export", None),
    "GGUF adapter": ("test_causal_family_gguf_adapter", None),
    "MoE experts (target_parameters)": ("test_moe_experts_beside_peft", None),
}


def run_tests(report: str) -> int:
    return subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                            os.path.join(HERE, "test_model_families.py")], cwd=os.path.dirname(HERE))


def outcomes(report: str, families: list[str]) -> dict[tuple[str, str, str | None], tuple[str, str]]:
    """(test function, family, extra parameter) -> (outcome, reason)."""
    found = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        match = re.fullmatch(r"(\w+)\[(.+)\]", case.get("name", ""))
        if not match:
            continue
        function, params = match.groups()
        family = next((f for f in sorted(families, key=len, reverse=True)
                       if params == f or params.startswith(f + "-") or params.endswith("-" + f)), None)
        if family is None:
            continue
        extra = params.replace(family, "", 1).strip("-") or None
        refused = [p.get("value") for p in case.iter("property") if p.get("name") == "refused"]
        skipped, failed = case.find("skipped"), case.find("failure") or case.find("error")
        if failed is not None:
            found[function, family, extra] = ("failed", failed.get("message", ""))
        elif skipped is not None:
            found[function, family, extra] = ("refused", skipped.get("message", "").removeprefix("Skipped: "))
        elif refused:
            found[function, family, extra] = ("refused", refused[0])
        else:
            found[function, family, extra] = ("passed", "")
    return found


def render(found, families: list[str]) -> str:
    reasons: list[str] = []
    lines = ["| family | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for family in families:
        cells = []
        for function, extra in COLUMNS.values():
            outcome, reason = found.get((function, family, extra), ("n/a", ""))
            if outcome == "refused":
                if reason not in reasons:
                    reasons.append(reason)
                cells.append(f"refused [{reasons.index(reason) + 1}]")
            else:
                cells.append({"passed": "✔", "failed": "✘", "n/a": "—"}[outcome])
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"[{i}] {reason}  " for i, reason in enumerate(reasons, 1)]
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--page", default=DOCS_PAGE, help="the Markdown file holding the family-matrix markers")
    args = ap.parse_args()
    sys.path.insert(0, HERE)
    from test_model_families import FAMILIES

    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "families.xml")
        status = run_tests(report)
        table = render(outcomes(report, list(FAMILIES)), list(FAMILIES))
    print(table)
    with open(args.page) as f:
        text = f.read()
    if START not in text or END not in text:
        raise SystemExit(f"{args.page} has no {START} ... {END} block to fill")
    head, rest = text.split(START, 1)
    text = head + START + "\n" + table + END + rest.split(END, 1)[1]
    with open(args.page, "w") as f:
        f.write(text)
    raise SystemExit(status)


if __name__ == "__main__":
    main()
