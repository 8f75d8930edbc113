"""``rlhfkit.train``: the one-call Python API (trlX's ``train(model, reward_fn=...)``, kept alive).

Online (PPO, or GRPO / RLOO with ``algorithm=``; REINFORCE++ is ``algorithm="grpo"`` with
``config={"algorithm": "reinforce_pp"}``)::

    import rlhfkit
    policy = rlhfkit.train("asset:smollm2", reward_fn=my_reward, prompts=["Tell me about cats."] * 64,
                           config={"lora.enabled": True, "train.max_steps": 20})

Offline (ILQL) from scored samples::

    policy = rlhfkit.train("gpt2", samples=[("prompt", "output"), ...], rewards=[1.0, ...])

``config`` is a recipe Config object, a YAML path, or a dict of dotted overrides
(``{"train.lr": 1e-5}``); keyword ``overrides`` are dotted keys with ``__`` for ``.``
(``train__lr=1e-5``). The trained policy (a transformers / peft model) is returned; offline ILQL
returns an ``ILQLModel`` (``.lm`` is the transformers model, ``.generate(prompts, beta=...)``).
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Optional, Sequence

from rlhfkit.config import UserError, make_config

ONLINE = {"ppo": "rlhfkit.recipes.ppo", "grpo": "rlhfkit.recipes.grpo", "rloo": "rlhfkit.recipes.grpo"}


def train(model: Any, reward_fn: Optional[Callable] = None, prompts: Optional[Sequence[str]] = None,
          samples: Optional[Sequence] = None, rewards: Optional[Sequence[float]] = None, config: Any = None,
          tokenizer: Any = None, algorithm: str = "ppo", **overrides: Any):
    """Train ``model`` online with ``reward_fn`` on ``prompts``, or offline (ILQL) on scored ``samples``.

    ``model``: hub name, local folder, ``asset:...`` name, or a loaded transformers model (then
    pass ``tokenizer``). Returns the trained policy.
    """
    if samples is not None or rewards is not None:
        if reward_fn is not None:
            raise UserError("train(): give reward_fn (online) or samples + rewards (offline), not both")
        if samples is None or rewards is None or len(samples) != len(rewards):
            raise UserError("train(): offline training needs samples and rewards of the same length")
        from rlhfkit.recipes import ilql

        return ilql.train_offline(model, samples, rewards, config=config, tokenizer=tokenizer, **overrides)
    if reward_fn is None:
        raise UserError("train(): pass reward_fn=... (online) or samples=..., rewards=... (offline)")
    if algorithm not in ONLINE:
        raise UserError(f"train(): algorithm must be one of {', '.join(ONLINE)}, got '{algorithm}'")
    recipe = importlib.import_module(ONLINE[algorithm])
    if algorithm == "rloo":
        overrides.setdefault("algorithm", "rloo")
    model_obj = None
    if isinstance(model, str):
        overrides["model.name_or_path"] = model
    else:
        model_obj = model
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model.config._name_or_path)
    cfg = make_config(recipe.Config, config, **{k.replace(".", "__"): v for k, v in overrides.items()})
    if prompts is None and not cfg.data.path:
        raise UserError("train(): pass prompts=[...] or set data.path in the config")
    summary = recipe.run(cfg, reward_fn=reward_fn, prompts=list(prompts) if prompts is not None else None,
                         model=model_obj, tokenizer=tokenizer)
    return summary["policy"]


__all__ = ["train", "make_config"]
