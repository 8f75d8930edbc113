"""rlhfkit: align language models with feedback (SFT, reward models, PPO, DPO family, GRPO/RLOO, ILQL)."""
__version__ = "0.1.0"
