"""Every module a recipe runs was put on its device by the Engine, and sees its inputs there.

A global forward pre-hook watches every module call during a short run of each recipe: the
module's own parameters and every tensor argument must be on ``engine.device``, and the module
must belong to what the Engine placed (its model, or a frozen module passed through
``Engine.prepare_frozen``: a reference copy). On this CPU every device is the CPU, so the second
check is the one that catches a model that never went through the Engine (on a GPU machine it
would sit on the wrong device: a reference loaded on GPU 0 by every process, or on the GPU under
``train.cpu=true``).
"""
from __future__ import annotations

import torch
import pytest

from helpers import sft_rows, write_jsonl


@pytest.fixture
def placement(monkeypatch):
    from rlhfkit import engine as engine_mod

    engines, problems = [], []
    init = engine_mod.Engine.__init__

    def wrapped(self, *args, **kwargs):
        init(self, *args, **kwargs)
        engines.append(self)

    monkeypatch.setattr(engine_mod.Engine, "__init__", wrapped)
    owned_cache: dict = {}

    def hook(module, args):
        own = list(module.parameters(recurse=False))
        if not own:
            return
        if not engines:
            problems.append(f"{type(module).__name__} ran before the Engine existed")
            return
        eng = engines[-1]
        key = (id(eng), len(eng.placed))
        if key not in owned_cache:
            owned_cache.clear()
            owned_cache[key] = {id(m) for placed in eng.placed for m in placed.modules()}
        if id(module) not in owned_cache[key]:
            problems.append(f"{type(module).__name__} was not placed by the Engine")
        for p in own:
            if p.device != eng.device:
                problems.append(f"{type(module).__name__} parameter on {p.device}, engine on {eng.device}")
        for a in args:
            if torch.is_tensor(a) and a.device != eng.device:
                problems.append(f"{type(module).__name__} input on {a.device}, engine on {eng.device}")

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    yield engines, problems
    handle.remove()


def check(engines, problems):
    assert engines, "the recipe built no Engine"
    assert not problems, sorted(set(problems))[:10]


@pytest.mark.unit
def test_sft_dpo_kto_modules_sit_on_the_engine_device(placement, tiny_llama, tmp_path):
    from fsdp_cases import config, run

    for case in ("sft", "dpo", "kto_lora"):
        cfg = config(case, tiny_llama, tmp_path / "data", tmp_path / case, "auto", 4)
        cfg.train.max_steps, cfg.train.checkpoint_every = 2, 0
        run(case, cfg)
    check(*placement)
    assert len(placement[0]) == 3
    assert len(placement[0][1].placed) == 2  # dpo: the policy and its reference copy


@pytest.mark.unit
def test_ppo_critic_and_reference_copy_sit_on_the_engine_device(placement, tiny_llama, tmp_path):
    from test_ppo import config, lowercase_share, prompts_file

    from rlhfkit.recipes import ppo

    cfg = config(tiny_llama, prompts_file(tmp_path, 20), tmp_path / "ppo", value_model=tiny_llama, ppo_epochs=1)
    cfg.train.max_steps = 2
    summary = ppo.run(cfg, reward_fn=lowercase_share)
    check(*placement)
    assert summary["steps"] == 2
    assert len(placement[0][0].placed) == 2  # the actor-critic and the reference copy


@pytest.mark.unit
def test_grpo_reference_copy_sits_on_the_engine_device(placement, tiny_llama, tmp_path):
    from test_grpo import letter_a, make_config

    from rlhfkit.recipes import grpo

    data = write_jsonl(tmp_path / "d.jsonl", sft_rows(40))
    cfg = make_config(tiny_llama, data, tmp_path / "grpo", steps=2, train={"batch_size": 8})
    cfg.kl_coef = 0.05  # a reference copy is loaded
    grpo.run(cfg, reward_fn=letter_a)
    check(*placement)
    assert len(placement[0][0].placed) == 2
