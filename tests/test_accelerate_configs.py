"""The shipped accelerate configs (examples/accelerate/*.yaml) map to the strategy the Engine runs.

The environment each config gives the training processes comes from accelerate's own launch code
(``rlhfkit.distributed.accelerate_config_env``); ``resolve_strategy`` reads it as the Engine does.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from rlhfkit.config import ConfigError, TrainConfig
from rlhfkit.distributed import accelerate_config_env, resolve_strategy

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "accelerate"
EXPECTED = {  # file: (strategy, processes, extra)
    "ddp.yaml": ("ddp", 8, {}),
    "fsdp2.yaml": ("fsdp", 8, {"cpu_offload": False}),
    "multinode_fsdp2.yaml": ("fsdp", 16, {"cpu_offload": False}),
    "zero2.yaml": ("deepspeed", 8, {"zero_stage": 2}),
    "zero3.yaml": ("deepspeed", 8, {"zero_stage": 3}),
}


@pytest.mark.unit
def test_every_shipped_config_is_covered():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.fixture
def deepspeed_installed(monkeypatch):
    """Pretend that DeepSpeed is installed (find_spec only; nothing imports it here)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "deepspeed" else real(name, *a))


@pytest.mark.unit
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_maps_to_strategy(name, deepspeed_installed):
    strategy, processes, extra = EXPECTED[name]
    env = accelerate_config_env(CONFIGS / name)
    assert env["WORLD_SIZE"] == str(processes)
    plan = resolve_strategy("auto", "sft", env)
    assert plan == {"strategy": strategy, **extra}
    assert resolve_strategy(strategy if strategy != "deepspeed" else "auto", "dpo", env)["strategy"] == strategy


@pytest.mark.unit
@pytest.mark.parametrize("name", ["zero2.yaml", "zero3.yaml"])
def test_deepspeed_config_without_deepspeed_is_one_line_error(name, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "deepspeed" else real(n, *a))
    env = accelerate_config_env(CONFIGS / name)
    with pytest.raises(ConfigError, match="pip install deepspeed") as e:
        resolve_strategy("auto", "sft", env)
    assert "\n" not in str(e.value)


@pytest.mark.unit
def test_strategy_conflicts_and_unsupported_recipes_are_refused(deepspeed_installed):
    fsdp_env = accelerate_config_env(CONFIGS / "fsdp2.yaml")
    with pytest.raises(ConfigError, match="contradicts the accelerate config"):
        resolve_strategy("ddp", "sft", fsdp_env)
    for command in ("ppo", "grpo", "rloo", "ilql"):  # they shard under FSDP2 (test_distributed), not under ZeRO-3
        assert resolve_strategy("fsdp", command, {}) == {"strategy": "fsdp"}
        with pytest.raises(ConfigError, match="ZeRO-3 is not supported"):
            resolve_strategy("auto", command, accelerate_config_env(CONFIGS / "zero3.yaml"))
        zero2 = accelerate_config_env(CONFIGS / "zero2.yaml")
        assert resolve_strategy("auto", command, zero2)["strategy"] == "deepspeed"
    assert resolve_strategy("auto", "sft", {}) == {"strategy": "single"}
    assert resolve_strategy("auto", "sft", {"WORLD_SIZE": "2"}) == {"strategy": "ddp"}
    assert resolve_strategy("fsdp", "sft", {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
                                            "FSDP_OFFLOAD_PARAMS": "true"}) == {"strategy": "fsdp", "cpu_offload": True}
    with pytest.raises(ConfigError, match="fsdp_version: 2"):
        resolve_strategy("auto", "sft", {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"})


@pytest.mark.unit
def test_train_strategy_is_a_checked_choice():
    from rlhfkit.config import from_dict

    assert from_dict(TrainConfig, {"strategy": "fsdp"}).strategy == "fsdp"
    with pytest.raises(ConfigError, match="strategy"):
        from_dict(TrainConfig, {"strategy": "zero"})


@pytest.mark.unit
def test_cpu_offload_on_a_cpu_is_refused():
    import torch

    from rlhfkit.distributed import shard

    with pytest.raises(ConfigError, match="fsdp_cpu_offload needs a GPU"):
        shard(torch.nn.Linear(2, 2), torch.device("cpu"), cpu_offload=True)
