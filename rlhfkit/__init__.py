"""rlhfkit: align language models with feedback (SFT, reward models, PPO, DPO family, GRPO/RLOO, ILQL).

``rlhfkit.train(model, reward_fn=..., prompts=...)`` is the one-call API (see ``rlhfkit.api``);
every recipe is also callable as ``rlhfkit.recipes.<name>.run(Config(...))``.
"""
__version__ = "0.1.0"


def __getattr__(name):  # lazy: `import rlhfkit` stays light (no torch import until needed)
    if name == "train":
        from rlhfkit.api import train

        return train
    raise AttributeError(f"module 'rlhfkit' has no attribute '{name}'")
