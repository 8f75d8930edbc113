"""Engine equivalences: accumulation == big batch, resumed == uninterrupted, 2 processes == 1."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import sft_config, sft_rows, trainable_params, write_jsonl
from rlhfkit.recipes import sft

ROOT = Path(__file__).resolve().parents[1]


def _close(a: dict, b: dict, atol: float) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.mark.unit
def test_grad_accumulation_equals_one_big_batch(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows(40))
    # adam_eps=1 makes Adam's first steps ~linear in the gradient, so the check is sensitive.
    big = sft_config(tiny_llama, data, tmp_path / "big", batch_size=8, grad_accum=1, max_steps=3, adam_eps=1.0, lr=0.05)
    acc = sft_config(tiny_llama, data, tmp_path / "acc", batch_size=2, grad_accum=4, max_steps=3, adam_eps=1.0, lr=0.05)
    s_big, s_acc = sft.run(big), sft.run(acc)
    a, b = trainable_params(tmp_path / "big"), trainable_params(tmp_path / "acc")
    assert _close(a, b, 0) < 1e-6
    # and the parameters did move (otherwise equality is trivial)
    from safetensors.torch import load_file
    init = load_file(str(Path(tiny_llama) / "model.safetensors"))
    assert max(float((a[k] - init[k]).abs().max()) for k in a) > 1e-3
    assert s_big["tokens"] == s_acc["tokens"] and s_big["samples"] == s_acc["samples"] == 24


@pytest.mark.unit
def test_resumed_run_equals_uninterrupted(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows(40))
    full = sft_config(tiny_llama, data, tmp_path / "full", max_steps=6, scheduler="linear", warmup_steps=2)
    sft.run(full)
    part = sft_config(tiny_llama, data, tmp_path / "part", max_steps=6, scheduler="linear", warmup_steps=2,
                      checkpoint_every=3, keep_checkpoints=2)
    sft.run(part)
    ckpts = sorted((tmp_path / "part" / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["step-0000003", "step-0000006"]
    import shutil
    shutil.rmtree(ckpts[-1])
    (tmp_path / "part" / "model.safetensors").unlink()
    summary = sft.run(part, resume=True)
    assert summary["steps"] == 6
    assert _close(trainable_params(tmp_path / "full"), trainable_params(tmp_path / "part"), 0) < 1e-5
    steps = [json.loads(l)["step"] for l in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(6) >= 1 and len([s for s in steps if s == 4]) == 1


def _cli(args, env_extra=None, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "rlhfkit.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.unit
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_writes_checkpoint_and_resume_matches(tiny_gpt2, tmp_path, sig, code):
    import yaml
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows(40))
    cfg = sft_config(tiny_gpt2, data, tmp_path / "run", max_steps=100000)
    from rlhfkit.config import to_dict
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    proc = _cli(["sft", "--config", str(tmp_path / "c.yaml")])
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    ck = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert len(ck) == 1
    k = json.loads((ck[0] / "state.json").read_text())["step"]
    # resume to k + 3 and compare with a fresh uninterrupted run of k + 3 steps
    res = _cli(["sft", "--config", str(tmp_path / "c.yaml"), f"train.max_steps={k + 3}", "--resume"])
    _, err = res.communicate(timeout=120)
    assert res.returncode == 0, err
    ref = sft_config(tiny_gpt2, data, tmp_path / "ref", max_steps=k + 3)
    sft.run(ref)
    assert _close(trainable_params(tmp_path / "run"), trainable_params(tmp_path / "ref"), 0) < 1e-5


@pytest.mark.unit
def test_two_processes_equal_one_process_on_concatenated_batch(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows(40))
    one = sft_config(tiny_llama, data, tmp_path / "one", batch_size=8, max_steps=2, adam_eps=1.0, lr=0.05)
    sft.run(one)
    script = ROOT / "tests" / "scripts" / "ddp_sft.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                        str(script), tiny_llama, data, str(tmp_path / "two")], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["processes"] == 2
    assert _close(trainable_params(tmp_path / "one"), trainable_params(tmp_path / "two"), 0) < 1e-6
    # the logged loss is that of the global batch (both processes), as in one process
    losses = [[json.loads(line)["loss"] for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()
               if "loss" in json.loads(line)] for d in ("one", "two")]
    assert len(losses[0]) == 2 and losses[1] == pytest.approx(losses[0], rel=1e-5)


@pytest.mark.unit
def test_fused_adamw_matches_the_default_adamw():
    from rlhfkit.config import TrainConfig
    from rlhfkit.engine import make_adamw

    cfg = TrainConfig(lr=0.1, weight_decay=0.01, adam_eps=1e-8)
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    fused = [torch.nn.Parameter(t.clone()) for t in start]
    plain = [torch.nn.Parameter(t.clone()) for t in start]
    opt_f = make_adamw(fused, cfg)
    opt_p = torch.optim.AdamW(plain, lr=0.1, weight_decay=0.01, eps=1e-8, foreach=False)
    assert opt_f.defaults["fused"] is True
    for _ in range(5):
        grads = [torch.randn(t.shape, generator=g) for t in start]
        for ps, opt in ((fused, opt_f), (plain, opt_p)):
            for p, gr in zip(ps, grads):
                p.grad = gr.clone()
            opt.step()
    for a, b, s in zip(fused, plain, start):
        torch.testing.assert_close(a.detach(), b.detach(), atol=1e-6, rtol=1e-6)
        assert float((a.detach() - s).abs().max()) > 0.1  # five steps of lr 0.1 moved the weights


@pytest.mark.unit
def test_lr_groups_give_a_parameter_group_its_own_learning_rate(tmp_path):
    """Adam's first step moves every weight with a non-zero gradient by lr (|g| / (|g| + eps) = 1),
    so after one step the "head." weights moved by 0.01 and the rest by 0.001."""
    from rlhfkit.config import TrainConfig
    from rlhfkit.engine import Engine

    torch.manual_seed(0)
    net = torch.nn.ModuleDict({"body": torch.nn.Linear(4, 4), "head": torch.nn.Linear(4, 1)})
    start = {n: p.detach().clone() for n, p in net.named_parameters()}
    cfg = TrainConfig(output_dir=str(tmp_path), lr=1e-3, max_grad_norm=None, progress=False, cpu=True)
    engine = Engine(cfg, "test", cfg, net, total_steps=1, lr_groups={"head.": 1e-2})
    x = torch.randn(8, 4)
    engine.step(lambda model, mb: (model["head"](model["body"](mb["x"])).pow(2).mean(), {}), [{"x": x}])
    moved = {n: (p.detach() - start[n]).abs() for n, p in net.named_parameters()}
    for n, d in moved.items():
        lr = 1e-2 if n.startswith("head.") else 1e-3
        torch.testing.assert_close(d, torch.full_like(d, lr), rtol=1e-3, atol=0)
    assert [g["lr"] for g in engine.optimizer.param_groups] == [1e-3, 1e-2]
