"""Tests import the tiny-model builders from here (they live in rlhfkit.tiny for `demo --quick`)."""
from rlhfkit.tiny import *  # noqa: F401,F403
from rlhfkit.tiny import WORDS, build_model, build_tokenizer, corpus, save_tiny  # noqa: F401
