"""Checkpoints survive a bad disk: --resume falls back past a broken checkpoint, a checkpoint is
replaced only once its successor is complete, a signal on a checkpoint step saves once, and a
resume whose config no longer fits the checkpoint is an error naming the key."""
from __future__ import annotations

import logging
import signal
from pathlib import Path

import pytest
import torch

from helpers import sft_config, sft_rows, trainable_params, write_jsonl
from rlhfkit import cli
from rlhfkit.config import TrainConfig, UserError
from rlhfkit.engine import Engine, Interrupted
from rlhfkit.recipes import sft

pytestmark = pytest.mark.unit


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def rlhfkit_log():
    h = _Lines()
    logger = logging.getLogger("rlhfkit")
    logger.addHandler(h)
    old = logger.level
    logger.setLevel(logging.INFO)
    yield h.lines
    logger.removeHandler(h)
    logger.setLevel(old)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_resume_falls_back_past_a_truncated_checkpoint(tiny_llama, tmp_path, rlhfkit_log):
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows(40))
    full = sft_config(tiny_llama, data, tmp_path / "full", max_steps=6)
    sft.run(full)
    part = sft_config(tiny_llama, data, tmp_path / "part", max_steps=6, checkpoint_every=3, keep_checkpoints=2)
    sft.run(part)
    ck3, ck6 = sorted((tmp_path / "part" / "checkpoints").iterdir())
    blob = (ck6 / "trainable.safetensors").read_bytes()
    (ck6 / "trainable.safetensors").write_bytes(blob[: len(blob) // 2])  # a disk that filled up mid-write
    (tmp_path / "part" / "model.safetensors").unlink()
    summary = sft.run(part, resume=True)
    assert summary["steps"] == 6
    warned = [l for l in rlhfkit_log if "broken" in l]
    assert any(str(ck6) in l for l in warned), rlhfkit_log
    assert any(f"resumed from {ck3}" in l for l in rlhfkit_log)
    # steps 4..6 were trained again from step 3: the same weights as the uninterrupted run
    assert _max_diff(trainable_params(tmp_path / "full"), trainable_params(tmp_path / "part")) < 1e-5


def test_resume_with_no_intact_checkpoint_is_one_line_error(tiny_gpt2, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows(20))
    cfg = sft_config(tiny_gpt2, data, tmp_path / "run", max_steps=2, checkpoint_every=2)
    sft.run(cfg)
    (ck,) = (tmp_path / "run" / "checkpoints").iterdir()
    (ck / "state.json").write_text("{")
    with pytest.raises(UserError, match="no intact checkpoint"):
        sft.run(cfg, resume=True)


def test_resume_with_changed_lora_names_the_key(tiny_gpt2, tmp_path, capsys):
    import yaml

    from rlhfkit.config import to_dict

    data = write_jsonl(tmp_path / "d.jsonl", sft_rows(20))
    cfg = sft_config(tiny_gpt2, data, tmp_path / "run", max_steps=2, checkpoint_every=2)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    assert cli.main(["sft", "--config", str(tmp_path / "c.yaml")]) == 0
    capsys.readouterr()
    code = cli.main(["sft", "--config", str(tmp_path / "c.yaml"), "lora.enabled=true", "train.max_steps=3", "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    errors = [l for l in err if not l.startswith("[rlhfkit]")]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "lora.enabled was False, now True" in errors[0], err


def _engine(tmp_path, **kw) -> tuple[Engine, torch.nn.Linear]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    cfg = TrainConfig(output_dir=str(tmp_path / "e"), progress=False, max_steps=4, lr=0.1, **kw)
    return Engine(cfg, "test", cfg, model, total_steps=4), model


def _one_step(engine: Engine) -> None:
    x = torch.ones(2, 3)
    engine.step(lambda m, b: (m(b["x"]).pow(2).mean(), {}), [{"x": x}])


def test_signal_on_a_checkpoint_step_saves_once(tmp_path, monkeypatch):
    engine, _ = _engine(tmp_path, checkpoint_every=1)
    writes = []
    import safetensors.torch

    real = safetensors.torch.save_file
    monkeypatch.setattr(safetensors.torch, "save_file", lambda *a, **k: (writes.append(a[1]), real(*a, **k)))
    _one_step(engine)
    engine._signal = signal.SIGTERM
    with pytest.raises(Interrupted):
        engine.end_step({})
    engine._restore_signals()
    assert len(writes) == 1
    assert [p.name for p in (tmp_path / "e" / "checkpoints").iterdir()] == ["step-0000001"]


def test_checkpoint_replaced_only_after_its_successor_is_in_place(tmp_path, monkeypatch):
    """Re-saving step N: if the process dies while renaming the new copy in, the old copy survives
    (as step-N.old) and --resume uses it."""
    import os

    engine, model = _engine(tmp_path)
    _one_step(engine)
    engine.step_count = 1
    first = engine.save_checkpoint()
    saved_w = model.weight.detach().clone()
    _one_step(engine)  # the weights move; a second save of "step 1" (a new run into the same folder)
    engine._checkpointed_step = None
    real_replace = os.replace

    def dying_replace(src, dst):
        if Path(src).name == "step-0000001.tmp":
            raise KeyboardInterrupt("killed between the renames")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        engine.save_checkpoint()
    monkeypatch.setattr(os, "replace", real_replace)
    ckdir = tmp_path / "e" / "checkpoints"
    assert sorted(p.name for p in ckdir.iterdir()) == ["step-0000001.old", "step-0000001.tmp"]
    engine._restore_signals()
    # a fresh engine resumes from the old, complete copy
    again, model2 = _engine(tmp_path)
    again.load_checkpoint()
    again._restore_signals()
    assert torch.equal(model2.weight.detach(), saved_w)
    assert again.resumed_from == first.with_name(first.name + ".old")
    # and a normal save at step 1 puts step-0000001 back and clears the leftovers
    again.save_checkpoint()
    assert sorted(p.name for p in ckdir.iterdir()) == ["step-0000001"]
