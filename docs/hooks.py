"""MkDocs hook: pages write ``<!-- config-keys: COMMAND -->`` and get every config key of that
command (its default and its docstring), read from the dataclasses, so the reference cannot go
stale. An unknown command name fails the (strict) build."""
from __future__ import annotations

import html
import importlib
import re

import yaml

MARKER = re.compile(r"<!--\s*config-keys:\s*([a-z_]+)\s*-->")


def _default_text(default: str) -> str:
    """The ``--help`` default (a Python repr) as YAML, the form a config file uses."""
    try:
        import ast

        value = ast.literal_eval(default)
    except (ValueError, SyntaxError):
        return default
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text[:-4].strip() if text.endswith("\n...") or text.endswith(" ...") else text.removesuffix("...").strip()


def config_table(command: str) -> str:
    from rlhfkit.cli import COMMANDS
    from rlhfkit.config import describe, load_config

    if command not in COMMANDS:
        raise ValueError(f"config-keys marker names unknown command '{command}'")
    module_name, preset = COMMANDS[command]
    cls = importlib.import_module(module_name).Config
    defaults = load_config(cls, None, preset) if preset else None
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, doc in describe(cls, defaults=defaults):
        doc = " ".join(doc.split()).replace("|", "\\|")
        value = html.escape(_default_text(default)).replace("|", "\\|")
        rows.append(f"| `{key}` | <code>{value}</code> | {doc} |")
    return "\n".join(rows)


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 (mkdocs signature)
    return MARKER.sub(lambda m: config_table(m.group(1)), markdown)
