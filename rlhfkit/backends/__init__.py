"""Generation backends other than transformers' ``generate`` (``generation.backend``).

* :mod:`rlhfkit.backends.vllm`: ``backend: vllm``, one colocated vLLM engine per process that holds
  the policy's current weights (pushed before every rollout); decoder-only policies.
* :mod:`rlhfkit.backends.openai`: ``backend: openai``, an OpenAI-compatible endpoint, with a
  response cache; generation-only commands (nothing to sync weights into).

``rlhfkit.rollout`` dispatches to them; everything that generates through it (ppo, grpo, rloo,
prefs, eval, label, judge, constitutional, redteam) gets them. Neither package is imported
unless its backend is chosen.
"""
from __future__ import annotations

from rlhfkit.config import ConfigError, GenerationConfig

TRAINING_BACKENDS = ("hf", "vllm")


def require_training_backend(gen: GenerationConfig, command: str) -> None:
    """Training commands generate with the policy being trained: ``openai`` cannot hold its weights."""
    if gen.backend not in TRAINING_BACKENDS:
        raise ConfigError(f"{command}: generation.backend={gen.backend} cannot generate with the policy being "
                          f"trained (no weight sync); use generation.backend=hf or vllm")
