"""``rlhfkit <command> --config FILE.yaml [dotted.key=value | --dotted.key value ...]``.

Each command is a module with a ``Config`` dataclass and ``run(cfg, resume=False) -> dict``
(training recipes), or a module with ``main(argv) -> int`` (apps with their own arguments).
Bad input exits 2 with one ``error:`` line (``--debug`` shows the traceback); an interrupted
training run writes a checkpoint and exits 130 (SIGINT) or 143 (SIGTERM).
"""
from __future__ import annotations

import importlib
import sys
import textwrap
from typing import Optional

from rlhfkit.config import UserError, describe, load_config

# command -> (module, preset overrides: applied on top of the config file, before the command line's
# overrides; they are also the defaults --help shows)
COMMANDS: dict[str, tuple[str, list[str]]] = {
    "sft": ("rlhfkit.recipes.sft", []),
    "reward": ("rlhfkit.recipes.reward", []),
    "ppo": ("rlhfkit.recipes.ppo", []),
    "dpo": ("rlhfkit.recipes.dpo", []),
    "kto": ("rlhfkit.recipes.kto", []),
    "grpo": ("rlhfkit.recipes.grpo", []),
    "rloo": ("rlhfkit.recipes.grpo", ["algorithm=rloo"]),
    "ilql": ("rlhfkit.recipes.ilql", []),
    "prefs": ("rlhfkit.recipes.prefs", []),
    "judge": ("rlhfkit.recipes.judge", []),
    "constitutional": ("rlhfkit.recipes.constitutional", []),
    "redteam": ("rlhfkit.recipes.redteam", []),
    "eval": ("rlhfkit.recipes.evaluate", []),
    "run": ("rlhfkit.recipes.pipeline", []),
    "demo": ("rlhfkit.recipes.demo", []),
    "label": ("rlhfkit.apps.label", []),
    "view": ("rlhfkit.apps.view", []),
    "env": ("rlhfkit.envinfo", []),
}

USAGE = """usage: rlhfkit <command> --config FILE.yaml [key.sub=value | --key.sub=value | --key.sub value ...]
                       [--resume] [--debug]
       rlhfkit <command> --help      (every config key with its default and meaning)
       rlhfkit --version             rlhfkit env   (versions, extras, devices, offline assets)

commands: """ + ", ".join(COMMANDS)

FLAGS = ("resume", "debug", "help")


def parse_args(argv: list[str], positional: Optional[list[str]] = None) -> tuple[str | None, list[str], dict[str, bool]]:
    """Split ``--config FILE``, the flags ``--resume``/``--debug``/``--help`` and the overrides.

    An override is ``key.sub=value``, ``--key.sub=value`` or ``--key.sub value`` (hyphens in the
    last part of the key read as underscores: ``--train.max-steps 10``); a bare ``--key`` followed by nothing or by another
    option is ``key=true`` (a switch: ``--lora.enabled``). A word without ``=`` is refused, unless the
    caller takes positional arguments (``positional``: a list they are appended to).
    """
    config_path = None
    overrides: list[str] = []
    flags = {name: False for name in FLAGS}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--config", "-c"):
            if i + 1 >= len(argv):
                raise UserError("--config needs a file name")
            config_path = argv[i + 1]
            i += 2
            continue
        if arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
        elif arg[2:] in flags and arg.startswith("--"):
            flags[arg[2:]] = True
        elif arg in ("-h",):
            flags["help"] = True
        elif arg.startswith("--") and len(arg) > 2:
            key, eq, value = arg[2:].partition("=")
            if not eq:
                if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                    value = "true"  # a bare switch, as HfArgumentParser reads it: --lora.enabled
                else:
                    value = argv[i + 1]
                    i += 1
            head, dot, last = key.rpartition(".")  # field names are identifiers; a stage may be 'my-sft'
            overrides.append(f"{head}{dot}{last.replace('-', '_')}={value}")
        elif "=" in arg and not arg.startswith("-"):
            overrides.append(arg)
        elif positional is not None and not arg.startswith("-"):
            positional.append(arg)
        else:
            raise UserError(f"unexpected argument '{arg}' (overrides look like key.sub=value)")
        i += 1
    return config_path, overrides, flags


def print_help(command: str, cls: type, preset: list[str] | None = None, intro: str | None = None) -> None:
    """Every config key with its default (after the command's ``preset``, e.g. ``rloo``'s
    ``algorithm=rloo``) and its docstring, shown as YAML; ``intro`` (if any) first."""
    print(f"rlhfkit {command} --config FILE.yaml [key=value | --key=value | --key value ...]\n")
    if intro:
        print(textwrap.dedent(intro).strip() + "\n")
    defaults = load_config(cls, None, preset) if preset else None
    for key, default, doc in describe(cls, defaults=defaults):
        if "\n" in default:
            print(f"  {key} =")
            print(textwrap.indent(default, "      "))
        else:
            print(f"  {key} = {default}")
        if doc:
            print(textwrap.indent(textwrap.fill(doc, 92), "      "))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if argv[0] in ("--version", "-V", "version"):
        from rlhfkit import __version__

        print(f"rlhfkit {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    from rlhfkit.utils import setup_logging

    setup_logging()
    clean = False  # set once the command returned on this process
    try:
        if command not in COMMANDS:
            import difflib

            guess = difflib.get_close_matches(command, COMMANDS, n=1)
            hint = f"; did you mean '{guess[0]}'?" if guess else ""
            raise UserError(f"unknown command '{command}'{hint} (commands: {', '.join(COMMANDS)})")
        module_name, preset = COMMANDS[command]
        module = importlib.import_module(module_name)
        if hasattr(module, "main"):
            code = int(module.main(rest) or 0)
            clean = code == 0
            return code
        config_path, overrides, flags = parse_args(rest)
        if flags["help"]:
            print_help(command, module.Config, preset, getattr(module, "HELP", None))
            return 0
        cfg = load_config(module.Config, config_path, preset + overrides)
        if hasattr(getattr(cfg, "train", None), "strategy"):  # a strategy the command cannot run: refuse it now
            from rlhfkit.distributed import resolve_strategy

            resolve_strategy(cfg.train.strategy, command)
        from rlhfkit.data import check_data

        check_data(cfg)  # a bad data file is reported before any model loads
        module.run(cfg, resume=flags["resume"])
        clean = True
        return 0
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from rlhfkit.engine import Interrupted

        if isinstance(e, Interrupted):
            print(f"error: {e}", file=sys.stderr)
            return e.code
        raise
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    finally:
        if "torch.distributed" in sys.modules:  # a run under torchrun / accelerate launch
            from rlhfkit.distributed import close_process_group

            close_process_group(clean)


if __name__ == "__main__":
    sys.exit(main())
