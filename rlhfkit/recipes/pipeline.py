"""``rlhfkit run PIPELINE.yaml [output_dir=FOLDER] [stage.key=value ...]``: several recipes in order, one file.

A pipeline file names its stages; each stage is a command (``sft``, ``reward``, ``ppo``, ``dpo``,
``prefs``, ``eval``, ...) with its config inline (``config:``) and/or from a file (``file:``).
``${name.output_dir}`` in any string refers to an earlier stage's output folder, so the PPO stage
can start from the SFT model and score with the reward model::

    output_dir: runs/summarize
    stages:
      - {name: sft, command: sft, file: examples/sft_smollm2.yaml}
      - name: ppo
        command: ppo
        config: {lora: {enabled: true, adapter_path: "${sft.output_dir}"}}

Each stage writes into ``<output_dir>/<name>`` unless its config sets ``train.output_dir`` /
``output_dir``. A stage whose folder already holds a ``summary.json`` written with the same
resolved config is skipped on a re-run, so a pipeline stopped half-way resumes where it stopped.
Overrides on the command line are ``<stage>.<key>=value``, and ``output_dir=FOLDER`` moves the
whole pipeline (as ``rlhfkit demo output_dir=...`` does).
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from rlhfkit.config import ConfigError, UserError, from_dict, load_config, set_dotted, to_dict, validate
from rlhfkit.utils import logger


@dataclass
class StageConfig:
    name: str = ""
    """Stage name, used in ``${name.output_dir}`` and in overrides."""
    command: str = ""
    """The rlhfkit command of this stage (``sft``, ``reward``, ``ppo``, ``dpo``, ``prefs``, ``eval``, ...)."""
    file: Optional[str] = None
    """A config file of that command; ``config`` keys are applied on top."""
    config: dict = field(default_factory=dict)
    """Config keys of that command (nested mapping)."""


@dataclass
class Config:
    output_dir: str = "runs/pipeline"
    """Parent folder of the stages' output folders."""
    stages: list[StageConfig] = field(default_factory=list)
    """The stages, run in order; each a mapping of the ``stages[].*`` keys below."""

    def validate(self) -> None:
        from rlhfkit.cli import COMMANDS

        names = set()
        for s in self.stages:
            if not s.name or s.name in names:
                raise ConfigError(f"stages: every stage needs a unique name (got '{s.name}')")
            names.add(s.name)
            if s.command not in COMMANDS or s.command in ("run", "label", "view", "demo", "env"):
                raise ConfigError(f"stage '{s.name}': command '{s.command}' cannot be a pipeline stage")
        if not self.stages:
            raise ConfigError("stages is empty")


REF = re.compile(r"\$\{([A-Za-z0-9_-]+)\.output_dir\}")


def _substitute(value: Any, outputs: dict[str, str], stage: str) -> Any:
    if isinstance(value, str):
        def repl(m):
            if m.group(1) not in outputs:
                raise ConfigError(f"stage '{stage}': ${{{m.group(1)}.output_dir}} names no earlier stage")
            return outputs[m.group(1)]
        return REF.sub(repl, value)
    if isinstance(value, dict):
        return {k: _substitute(v, outputs, stage) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, outputs, stage) for v in value]
    return value


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _output_key(cfg_dict: dict) -> tuple[str, ...]:
    return ("train", "output_dir") if "train" in cfg_dict else ("output_dir",)


def stage_config(stage: StageConfig, parent: str, outputs: dict[str, str], overrides: list[str]):
    """The stage's validated Config object and its module."""
    from rlhfkit.cli import COMMANDS

    module_name, preset = COMMANDS[stage.command]
    module = importlib.import_module(module_name)
    raw = to_dict(module.Config())  # defaults; validated only once everything is applied
    if stage.file:
        if not Path(stage.file).is_file():
            raise ConfigError(f"stage '{stage.name}': config file {stage.file} not found")
        raw = _merge(raw, yaml.safe_load(Path(stage.file).read_text()) or {})
    for item in preset:
        k, v = item.split("=", 1)
        set_dotted(raw, k, yaml.safe_load(v))
    raw = _merge(raw, _substitute(stage.config, outputs, stage.name))
    key = _output_key(raw)
    given = stage.config.get(key[0], {}).get(key[1]) if len(key) == 2 else stage.config.get(key[0])
    if not given:
        target = raw
        for k in key[:-1]:
            target = target[k]
        target[key[-1]] = str(Path(parent) / stage.name)
    for item in overrides:
        k, v = item.split("=", 1)
        set_dotted(raw, k, yaml.safe_load(v))
    cfg = from_dict(module.Config, raw, source=f"stage '{stage.name}'")
    validate(cfg)
    return cfg, module


def run(cfg: Config, resume: bool = False, overrides: Optional[list[str]] = None) -> dict:
    outputs: dict[str, str] = {}
    summaries: dict[str, Any] = {}
    by_stage: dict[str, list[str]] = {}
    for item in overrides or []:
        if item.startswith("output_dir="):  # the pipeline's own folder
            cfg.output_dir = item.split("=", 1)[1]
            continue
        name, _, rest = item.partition(".")
        if name not in {s.name for s in cfg.stages}:
            raise ConfigError(f"override '{item}' must start with a stage name ({', '.join(s.name for s in cfg.stages)}) "
                              "or be output_dir=FOLDER")
        by_stage.setdefault(name, []).append(rest)
    for stage in cfg.stages:
        scfg, module = stage_config(stage, cfg.output_dir, outputs, by_stage.get(stage.name, []))
        d = to_dict(scfg)
        out = Path(d["train"]["output_dir"] if "train" in d else d["output_dir"])
        outputs[stage.name] = str(out)
        done = out / "summary.json"
        if done.is_file() and (out / "config.yaml").is_file() and _same_run(yaml.safe_load((out / "config.yaml").read_text()), d):
            logger.info(f"pipeline: stage '{stage.name}' already finished in {out}; skipped")
            import json

            summaries[stage.name] = json.loads(done.read_text())
            continue
        done.unlink(missing_ok=True)  # a stale one (earlier config) must not mark this run finished if it fails
        logger.info(f"pipeline: stage '{stage.name}' ({stage.command}) -> {out}")
        summary = module.run(scfg, resume=resume and (out / "checkpoints").is_dir())
        summaries[stage.name] = {k: v for k, v in summary.items() if k != "policy"}
    return summaries


def main(argv: list[str]) -> int:
    from rlhfkit.cli import parse_args, print_help

    if argv and not argv[0].startswith("-") and "=" not in argv[0]:
        argv = ["--config", argv[0], *argv[1:]]
    path, overrides, flags = parse_args(argv)
    if flags["help"]:
        print_help("run", Config, intro=__doc__)
        return 0
    if not path:
        raise UserError("usage: rlhfkit run PIPELINE.yaml [output_dir=FOLDER] [stage.key=value ...]")
    cfg = load_config(Config, path)
    run(cfg, resume=flags["resume"], overrides=overrides)
    return 0


def _same_run(recorded, requested) -> bool:
    """Whether a stage's recorded config.yaml is the requested config. A model section's
    ``max_length`` may be recorded lower: loading the model lowers it to the model's position limit."""
    if isinstance(recorded, dict) and isinstance(requested, dict):
        if recorded.keys() != requested.keys():
            return False
        for k in recorded:
            a, b = recorded[k], requested[k]
            if k == "max_length" and "name_or_path" in recorded and isinstance(a, int) and isinstance(b, int):
                if a > b:
                    return False
            elif not _same_run(a, b):
                return False
        return True
    if isinstance(recorded, list) and isinstance(requested, list):
        return len(recorded) == len(requested) and all(_same_run(a, b) for a, b in zip(recorded, requested))
    return recorded == requested
