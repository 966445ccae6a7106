"""mkdocs hooks: pages generated from the code, so they cannot drift from it.

A page holding the line `<!-- generated: cli-reference -->` gets every `lorakit` subcommand with its options, read
from `lorakit.cli.build_parser()` at build time; `<!-- generated: config-reference -->` gets every training setting
(`lorakit.train.config.TrainConfig`: name, type, default and the comment beside the field in the source).
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import inspect
import re

CLI_MARKER = "<!-- generated: cli-reference -->"
CONFIG_MARKER = "<!-- generated: config-reference -->"


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 (mkdocs' hook signature)
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_reference_markdown())
    if CONFIG_MARKER in markdown:
        markdown = markdown.replace(CONFIG_MARKER, config_reference_markdown())
    return markdown


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return html.escape(" ".join(str(text).split()), quote=False).replace("|", "&#124;")


def _option_row(action: argparse.Action) -> str:
    if action.option_strings:
        name = ", ".join(f"`{s}`" for s in action.option_strings)
        if action.nargs != 0:
            name += f" `{action.metavar or action.dest.upper()}`"
    else:
        name = f"`{action.metavar or action.dest}`"
    choices = ", ".join(f"`{c}`" for c in action.choices) if action.choices else ""
    default = "" if action.default in (None, False, argparse.SUPPRESS) or action.nargs == 0 \
        else f"`{action.default}`"
    required = " (required)" if getattr(action, "required", False) and action.option_strings else ""
    return f"| {name}{required} | {choices} | {default} | {_cell(action.help or '')} |"


def _parser_section(name: str, parser: argparse.ArgumentParser, help_text: str) -> list[str]:
    lines = [f"## `{name}`", ""]
    if help_text:
        lines += [help_text[0].upper() + help_text[1:] + ".", ""]
    usage = parser.format_usage().replace("usage: ", "").strip()
    lines += ["```text", usage, "```", ""]
    if parser.description and parser.description.strip() != help_text:
        lines += ["```text", parser.description.strip(), "```", ""]
    actions = [a for a in parser._actions
               if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]
    if actions:
        lines += ["| option | choices | default | what it does |", "|---|---|---|---|"]
        lines += [_option_row(a) for a in actions]
        lines.append("")
    return lines


def cli_reference_markdown() -> str:
    """Every subcommand of `lorakit` as Markdown, from the parser the command line itself uses."""
    from lorakit import cli  # imports inside functions: the hook file loads before mkdocs knows the package path

    parser = cli.build_parser()
    lines = _parser_section("lorakit", parser, parser.description or "")
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help for choice in subparsers._choices_actions}
    for name, sub in subparsers.choices.items():
        lines += _parser_section(f"lorakit {name}", sub, helps.get(name, ""))
    return "\n".join(lines)


def _field_comments(cls) -> dict[str, str]:
    """The `# comment` beside each dataclass field in the source, continuation comment lines joined."""
    comments: dict[str, list[str]] = {}
    current = None
    for line in inspect.getsource(cls).splitlines():
        field = re.match(r"    (\w+): [^=]+(?:=.*?)?(?:#\s?(.*))?$", line)
        if field and not line.strip().startswith("#"):
            current = field.group(1)
            comments[current] = [field.group(2)] if field.group(2) else []
        elif current and re.match(r"\s+#", line):
            comments[current].append(line.strip()[1:].strip())
        elif line.strip().startswith("def "):
            break
        else:
            current = None
    return {name: " ".join(parts) for name, parts in comments.items()}


def _default_text(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "(required)"
    if isinstance(value, str) and "/" in value and value.endswith((".jsonl", ".txt")):
        value = "the bundled demo file (" + value.rsplit("/", 1)[-1] + ")"
    return f"`{value!r}`" if not isinstance(value, dict) else f"`{value}`"


def config_reference_markdown() -> str:
    """Every `lorakit train` setting (YAML key or `--key=value`), from TrainConfig's fields and source comments."""
    from lorakit.train.config import TrainConfig  # imports inside functions: as above

    comments = _field_comments(TrainConfig)
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for field in dataclasses.fields(TrainConfig):
        lines.append(f"| `{field.name}` | `{field.type}` | {_cell(_default_text(field))} | "
                     f"{_cell(comments.get(field.name, ''))} |")
    return "\n".join(lines)
