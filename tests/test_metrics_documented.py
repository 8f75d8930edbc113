"""Every metric a training command writes to metrics.jsonl is explained in docs/metrics.md: each
recipe runs 2 steps on a tiny model (with its periodic evaluation) and every logged name must appear
there in backticks, reward parts as ``reward/<part>``."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from test_offline import RECIPES, recipe_config
from test_online import grpo_config, ppo_config
from helpers import sft_rows, write_jsonl

DOC = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"


def documented() -> set[str]:
    names = set()
    for cell in re.findall(r"`([^`]+)`", DOC.read_text()):
        names.update(n.strip() for n in cell.split(","))
    return names


def logged_names(out: Path, parts: set[str]) -> set[str]:
    names = set()
    for line in (out / "metrics.jsonl").read_text().splitlines():
        for key in json.loads(line):
            for p in parts:  # the reward parts of this run are named by the config
                key = key.replace(f"reward/{p}", "reward/<part>")
            names.add(key)
    return names


@pytest.mark.learning
def test_every_logged_metric_is_documented(tiny_llama, tmp_path):
    from rlhfkit.recipes import grpo, ppo

    seen: dict[str, set[str]] = {}
    for command in RECIPES:
        cfg = recipe_config(command, tiny_llama, tmp_path, command, train={"max_steps": 2})
        RECIPES[command].run(cfg)
        seen[command] = logged_names(tmp_path / command, set())
    data = write_jsonl(tmp_path / "dialogs.jsonl", sft_rows(60))
    cfg = ppo_config(tiny_llama, data, tmp_path / "ppo")
    cfg.eval.every = 1
    ppo.run(cfg)
    seen["ppo"] = logged_names(tmp_path / "ppo", {"token_frequency"})
    for algorithm in ("grpo", "rloo", "reinforce_pp"):
        cfg = grpo_config(tiny_llama, data, tmp_path / algorithm, algorithm=algorithm, kl_coef=0.05)
        cfg.eval.every = 1
        grpo.run(cfg)
        seen[algorithm] = logged_names(tmp_path / algorithm, {"token_frequency"})
    docs = documented()
    missing = {c: sorted(n - docs) for c, n in seen.items() if n - docs}
    assert not missing, f"metrics logged but not explained in docs/metrics.md: {missing}"
    assert {"loss", "kl", "approx_kl", "eval/reward"} <= set().union(*seen.values())  # the check saw real runs
