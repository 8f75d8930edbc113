"""Experiment trackers (``train.report_to``) through accelerate's own tracker classes.

The Engine hands ``tracker_kwargs`` to ``Accelerator(...)`` and calls ``init_trackers`` with
``flat_config`` (the resolved config, logged once) and ``tracker_init_kwargs``; every line it writes
to ``metrics.jsonl`` goes to ``accelerator.log`` at the same step, and sample tables go to the
trackers that have ``log_table`` (wandb). Where each tracker writes:

- ``tensorboard``: event files under ``<output_dir>/tensorboard/<train.project>/``;
- ``wandb``: ``<output_dir>/wandb/`` (offline with ``WANDB_MODE=offline``), project ``train.project``;
- ``trackio``: its local store (``TRACKIO_DIR``), project ``train.project``;
- ``mlflow``: ``MLFLOW_TRACKING_URI`` (e.g. ``file:/path/mlruns``), experiment ``train.project``.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from rlhfkit.config import TrainConfig, to_dict


def tracker_kwargs(cfg: TrainConfig, out: Path) -> dict:
    """``Accelerator`` arguments for ``train.report_to``: the trackers, and TensorBoard's folder
    (``<output_dir>/tensorboard/<project>``)."""
    if not cfg.report_to:
        return {}
    from accelerate.utils import ProjectConfiguration

    return {"log_with": list(cfg.report_to),
            "project_config": ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "tensorboard"))}


def tracker_init_kwargs(cfg: TrainConfig, out: Path) -> dict:
    """Per-tracker ``init`` arguments: the run name (default: the output folder's name); wandb writes
    its files under the output folder."""
    name = cfg.run_name or Path(cfg.output_dir).resolve().name
    return {"wandb": {"name": name, "dir": str(out)}, "trackio": {"name": name}, "mlflow": {"run_name": name}}


def flat_config(cfg: Any) -> dict:
    """The resolved config as ``{"train.lr": 1e-5, ...}`` with plain values (lists, dicts and None as
    text), as every tracker's hyperparameter table accepts."""
    flat: dict = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(value, (bool, int, float, str)):
            flat[prefix] = value
        else:
            flat[prefix] = json.dumps(value, default=str)

    walk("", to_dict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg))
    return flat


__all__ = ["flat_config", "tracker_init_kwargs", "tracker_kwargs"]
