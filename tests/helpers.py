"""Shared test helpers: synthetic datasets and quick configs."""
from __future__ import annotations

import json
import random
from pathlib import Path

from tiny import WORDS

ANIMALS = ["cat", "dog", "bird", "fish"]
VERBS = {"cat": "sleeps", "dog": "runs", "bird": "sings", "fish": "swims"}


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def sft_rows(n: int, seed: int = 0) -> list[dict]:
    """Dialogue-summary style rows whose summary is a simple function of the dialogue."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a = rng.choice(ANIMALS)
        filler = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
        rows.append({"id": f"r{i}", "dialogue": f"{filler} the {a} {filler}", "summary": f"the {a} {VERBS.get(a, 'walks')}.",
                     "topic": a})
    return rows


def sft_config(model_path: str, data_path: str, out: Path, **train):
    from rlhfkit.config import DataConfig, ModelConfig, TrainConfig
    from rlhfkit.recipes.sft import Config

    t = dict(output_dir=str(out), lr=3e-3, batch_size=4, max_steps=4, progress=False, group_by_length=False,
             max_grad_norm=None, seed=0)
    t.update(train)
    return Config(
        model=ModelConfig(name_or_path=model_path, max_length=128),
        data=DataConfig(path=data_path, columns={"completion": "summary"}, prompt_template="Summarize: {dialogue}\nSummary:",
                        eval_fraction=0.2, chat_template="false"),
        train=TrainConfig(**t),
    )


def trainable_params(out_dir) -> dict:
    """Final trainable weights written by a run (model.safetensors or adapter)."""
    from safetensors.torch import load_file

    out = Path(out_dir)
    f = out / "model.safetensors"
    if not f.exists():
        f = out / "adapter_model.safetensors"
    return load_file(str(f))
