"""Synthetic preference data (and small helpers of the preference tests) whose preference depends on the prompt (so it must be learned).

Each prompt is a few random filler words followed by ``is it a <animal> ?``; for the animals in
``YES`` the chosen answer is ``yes.`` and the rejected one ``no.``, for the others the reverse.
Half the pairs prefer each answer, so a model with a fixed bias for one of the two words scores
about 0.5; only a model that reads the animal gets them all right.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from rlhfkit.config import ModelConfig
from rlhfkit.models import load_model
from tiny import WORDS

YES = ["cat", "bird"]
NO = ["dog", "fish"]
FILLER = [w for w in WORDS if w not in YES + NO + ["yes", "no"]]


def preference_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        animal = (YES + NO)[i % 4]
        filler = " ".join(rng.choice(FILLER) for _ in range(rng.randint(2, 5)))
        good, bad = ("yes.", "no.") if animal in YES else ("no.", "yes.")
        rows.append({"prompt": f"{filler} is it a {animal} ?", "chosen": good, "rejected": bad})
    rng.shuffle(rows)
    return rows


def unpaired_rows(pairs: list[dict]) -> list[dict]:
    """KTO layout: every pair becomes a desirable and an undesirable row."""
    out = []
    for r in pairs:
        out.append({"prompt": r["prompt"], "completion": r["chosen"], "label": True})
        out.append({"prompt": r["prompt"], "completion": r["rejected"], "label": False})
    return out


def perturbed_copy(path: str, scale: float = 0.05):
    """A reference that differs from the policy, so that h != 0."""
    ref = load_model(ModelConfig(name_or_path=path), torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return ref


def plain_logp(hf_model, prompt: list[int], completion: list[int], seq2seq: bool) -> torch.Tensor:
    """Summed log p(completion | prompt) from one unpadded transformers forward."""
    with torch.no_grad():
        if seq2seq:
            logits = hf_model(input_ids=torch.tensor([prompt]), labels=torch.tensor([completion])).logits[0]  # (C, V)
            lp = logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
        else:
            ids = torch.tensor([prompt + completion])
            logits = hf_model(input_ids=ids).logits[0]  # (T, V)
            lp = logits[:-1].log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1)[len(prompt) - 1:]
    assert lp.shape == (len(completion),)
    return lp.sum()


def metrics_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
