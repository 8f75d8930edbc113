import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402

from tiny import save_tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_models")


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_dir):
    return save_tiny("gpt2", tiny_dir / "gpt2")


@pytest.fixture(scope="session")
def tiny_llama(tiny_dir):
    return save_tiny("llama", tiny_dir / "llama")


@pytest.fixture(scope="session")
def tiny_t5(tiny_dir):
    return save_tiny("t5", tiny_dir / "t5")
