"""The offline recipes (sft, reward, dpo, kto, ilql) on their shared set-up and loop:
a run stopped by SIGTERM and resumed equals the uninterrupted run; the best checkpoint; periodic
held-out evaluation (ilql's included); every shared key honoured or refused."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from helpers import sft_rows, write_jsonl
from pref_data import preference_rows
from rlhfkit.config import ConfigError, make_config
from rlhfkit.engine import Engine, Interrupted
from rlhfkit.recipes import dpo, ilql, kto, reward, sft

RECIPES = {"sft": sft, "reward": reward, "dpo": dpo, "kto": kto, "ilql": ilql}


def ilql_rows(n: int) -> list[dict]:
    import random

    rng = random.Random(0)
    pool = ["cat", "dog", "sun", "red", "sky", "big", "old", "new"]
    return [{"prompt": f"{rng.choice(pool)}:", "output": " ".join(rng.choice(pool) for _ in range(4)),
             "reward": rng.random()} for _ in range(n)]


def recipe_config(command: str, model_path: str, tmp_path: Path, out: str, **over):
    """A small config of ``command`` on a tiny model: 48 training rows, 12 held out, eval every 2 steps."""
    train = dict(output_dir=str(tmp_path / out), lr=3e-3, batch_size=4, max_steps=6, progress=False,
                 group_by_length=False, seed=0)
    train.update(over.pop("train", {}))
    data = dict(eval_fraction=0.2, chat_template="false")
    if command == "sft":
        data.update(path=write_jsonl(tmp_path / "sft.jsonl", sft_rows(60)), columns={"completion": "summary"},
                    prompt_template="Summarize: {dialogue}\nSummary:")
    elif command == "ilql":
        data.update(path=write_jsonl(tmp_path / "ilql.jsonl", ilql_rows(60)))
    else:
        data.update(path=write_jsonl(tmp_path / "prefs.jsonl", preference_rows(60)))
    data.update(over.pop("data", {}))
    model = {"name_or_path": model_path, "max_length": 64, **over.pop("model", {})}
    cfg = dict(model=model, data=data, train=train, eval={"every": 2, **over.pop("eval", {})})
    if command == "ilql":
        cfg["generation"] = {"max_new_tokens": 4}
    return make_config(RECIPES[command].Config, {**cfg, **over}, source="test")


def outputs(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every top-level safetensors file of a run (model, heads, value head)."""
    from safetensors.torch import load_file

    return {f"{f.name}:{k}": v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def logged(out: Path) -> dict[tuple[int, str], float]:
    """(step, key) -> value of the losses and held-out metrics in metrics.jsonl (timings left out)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {(r["step"], k): v for r in rows for k, v in r.items()
            if k == "loss" or k.startswith("eval/") or k.startswith("loss/")}


@pytest.mark.unit
@pytest.mark.parametrize("stop", [3, 4])  # 4: a step with a periodic evaluation (eval.every=2)
@pytest.mark.parametrize("command", list(RECIPES))
def test_sigterm_then_resume_equals_the_uninterrupted_run(command, stop, tiny_llama, tmp_path, monkeypatch):
    module = RECIPES[command]
    module.run(recipe_config(command, tiny_llama, tmp_path, "full"))

    # the same run, sent SIGTERM during step `stop`: it finishes the step (and its evaluation), writes
    # a checkpoint and stops
    end_step = Engine.end_step

    def end_step_with_sigterm(self, metrics, *a, **k):
        if self.step_count == stop - 1:
            os.kill(os.getpid(), signal.SIGTERM)  # the Engine's handler: finish this step, then checkpoint
        return end_step(self, metrics, *a, **k)

    cfg = recipe_config(command, tiny_llama, tmp_path, "part")
    monkeypatch.setattr(Engine, "end_step", end_step_with_sigterm)
    with pytest.raises(Interrupted) as stopped:
        module.run(cfg)
    assert stopped.value.code == 143
    monkeypatch.setattr(Engine, "end_step", end_step)
    assert [c.name for c in (tmp_path / "part" / "checkpoints").iterdir()] == [f"step-{stop:07d}"]
    assert not list((tmp_path / "part").glob("*.safetensors"))  # stopped before the final save
    summary = module.run(cfg, resume=True)
    assert summary["steps"] == 6

    full, part = outputs(tmp_path / "full"), outputs(tmp_path / "part")
    assert full.keys() == part.keys() and full
    assert max(float((full[k].float() - part[k].float()).abs().max()) for k in full) < 1e-6
    a, b = logged(tmp_path / "full"), logged(tmp_path / "part")
    assert a.keys() == b.keys() and {s for s, k in a if k == "loss"} == {1, 2, 3, 4, 5, 6}
    assert {s for s, k in a if k.startswith("eval/")} == {0, 2, 4, 6}  # start, every 2 steps, end
    assert max(abs(a[k] - b[k]) for k in a) < 1e-6
    # the start evaluation was measured once, before the interruption, and kept
    assert summary["eval_start"] == json.loads((tmp_path / "full" / "summary.json").read_text())["eval_start"]


@pytest.mark.unit
@pytest.mark.parametrize("mode", ["min", "max"])
def test_best_checkpoint_keeps_the_best_evaluated_model(mode, tiny_llama, tmp_path):
    """SFT's held-out loss falls from step 0 on: with ``min`` the best is the lowest logged loss
    (read back from metrics.jsonl); with ``max`` it is the untrained start, so ``best/`` holds the
    start weights, not the trained ones."""
    from safetensors.torch import load_file

    cfg = recipe_config("sft", tiny_llama, tmp_path, "run", train={"best_metric": "eval/loss", "best_mode": mode})
    summary = sft.run(cfg)
    losses = {s: v for (s, k), v in logged(tmp_path / "run").items() if k == "eval/loss"}
    pick = min if mode == "min" else max
    best_step = pick(losses, key=losses.get)
    assert (summary["best_metric"], summary["best_step"], summary["best_value"]) == \
        ("eval/loss", best_step, pytest.approx(losses[best_step], abs=1e-9))
    best = load_file(str(tmp_path / "run" / "best" / "model.safetensors"))
    final = load_file(str(tmp_path / "run" / "model.safetensors"))
    start = load_file(str(Path(tiny_llama) / "model.safetensors"))
    assert losses[6] < losses[0]  # training helped, so the two modes pick different models
    other = start if mode == "min" else final
    same = final if mode == "min" else start
    assert best_step == (6 if mode == "min" else 0)
    assert max(float((best[k] - same[k]).abs().max()) for k in best) == 0.0
    assert max(float((best[k] - other[k]).abs().max()) for k in best) > 1e-3
    assert not (tmp_path / "run" / "best.tmp").exists()


@pytest.mark.unit
def test_best_metric_the_recipe_does_not_log_is_refused(tiny_llama, tmp_path):
    with pytest.raises(ConfigError, match="never logged by dpo .*did you mean 'eval/accuracy'"):
        recipe_config("dpo", tiny_llama, tmp_path, "run", train={"best_metric": "eval/acuracy"})
    with pytest.raises(ConfigError, match="never logged by ilql"):
        recipe_config("ilql", tiny_llama, tmp_path, "run", train={"best_metric": "eval/accuracy"})


@pytest.mark.unit
def test_ilql_evaluates_held_out_loss_periodically(tiny_llama, tmp_path):
    """ILQL's held-out evaluation is its training loss (and each part) on held-out rows, logged at
    the start, every ``eval.every`` steps and at the end; it falls as the Q/V heads fit the rewards."""
    summary = ilql.run(recipe_config("ilql", tiny_llama, tmp_path, "run", train={"max_steps": 8}))
    lines = logged(tmp_path / "run")
    steps = sorted({s for s, k in lines if k == "eval/loss"})
    assert steps == [0, 2, 4, 6, 8]
    for key in ilql.ILQL_EVAL_METRICS:
        assert (0, key) in lines and (8, key) in lines
    assert lines[(8, "eval/loss")] < lines[(0, "eval/loss")]
    assert summary["eval_end"]["eval/loss"] == lines[(8, "eval/loss")]


# ---------------------------------------------------------------------------------------------
# every shared key honoured or refused
# ---------------------------------------------------------------------------------------------


def _other_value(cls, key: str):
    """A value of dotted ``key`` of ``cls`` different from its default."""
    import dataclasses
    import typing

    obj, tp = cls(), cls
    for part in key.split("."):
        tp = typing.get_type_hints(tp)[part]
        obj = getattr(obj, part)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Literal:
        return next(a for a in args if a != obj)
    base = args[0] if args and not dataclasses.is_dataclass(tp) else tp
    if base is bool:
        return not obj
    if base in (int, float):
        return (obj or 0) + 1 if base is int else round((obj or 0.0) / 2 + 0.25, 3)
    return "x"


NEEDS = {"judge": ["judge.model.name_or_path=m"], "prefs": ["rewards=[{kind: length}]"]}


def _unused_keys():
    from rlhfkit.recipes import constitutional, judge, prefs

    modules = (prefs, judge, constitutional, reward)
    return [(m.__name__.rsplit(".", 1)[-1], m, k) for m in modules for k in m.Config.UNUSED]


@pytest.mark.unit
@pytest.mark.parametrize("command,module,key", _unused_keys(), ids=[f"{c}-{k}" for c, _, k in _unused_keys()])
def test_a_shared_key_the_command_does_not_use_is_refused(command, module, key):
    """prefs, judge and constitutional read prompts, not a train / held-out split of tokenized rows,
    and reward scores whole texts: those data keys are refused (with the key named) when set."""
    from rlhfkit.config import load_config

    value = _other_value(module.Config, key)
    with pytest.raises(ConfigError, match=f"'{key}' is not used by {command}"):
        load_config(module.Config, None, [f"{key}={value}", *NEEDS.get(command, [])])


@pytest.mark.unit
def test_judge_honours_data_where(tmp_path):
    from rlhfkit.recipes import judge

    rows = [{"prompt": f"p{i}", "completion": f"c{i}", "split": "a" if i % 3 else "b"} for i in range(9)]
    cfg = make_config(judge.Config, {"data": {"path": write_jsonl(tmp_path / "r.jsonl", rows), "where": {"split": "b"}},
                                     "mode": "pointwise", "judge": {"model": {"name_or_path": "unused"}},
                                     "output_dir": str(tmp_path / "out")})
    summary = judge.run(cfg, judge=lambda prompts, completions: [float(len(p)) for p in prompts])
    written = [json.loads(line) for line in (tmp_path / "out" / "judged.jsonl").read_text().splitlines()]
    assert summary["rows"] == 3 and [r["prompt"] for r in written] == ["p0", "p3", "p6"]


@pytest.mark.unit
@pytest.mark.parametrize("args", [
    ["eval", "models=[{name: a}]", "data.path=x.jsonl"],
    ["judge", "judge.model.name_or_path=m", "data.path=x.jsonl"],
    ["redteam"],
])
def test_commands_without_checkpoints_refuse_resume(args, tmp_path, capsys):
    from rlhfkit import cli

    code = cli.main([*args, f"output_dir={tmp_path / 'o'}", "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0] == (f"error: {args[0]} keeps no checkpoint: --resume is not "
                                                      "supported (run it again without it)")


@pytest.mark.unit
def test_eval_every_without_held_out_data_is_refused(tiny_llama, tmp_path):
    from rlhfkit.config import UserError

    cfg = recipe_config("sft", tiny_llama, tmp_path, "run", data={"eval_fraction": 0.0})
    with pytest.raises(UserError, match="eval.every=2 needs held-out data"):
        sft.run(cfg)


# each shared key, set to another value, changes what a 2-step run computes (weights, losses or
# held-out metrics): the audit that no recipe accepts one of them and ignores it
SHARED_KEYS = {
    "train.lr": 1e-2, "train.seed": 1, "train.weight_decay": 0.5, "train.adam_betas": [0.5, 0.9], "train.adam_eps": 0.1,
    "train.max_grad_norm": 1e-3, "train.warmup_steps": 2, "train.scheduler": "linear", "train.grad_accum": 2,
    "train.group_by_length": True, "train.epochs": 1, "train.max_steps": 3,
    "data.eval_fraction": 0.3, "data.shuffle_seed": 1, "data.max_rows": 30, "data.max_prompt_length": 3,
    "data.max_completion_length": 3, "data.prompt_template": "Q {prompt}",
    "model.max_length": 12, "eval.max_rows": 3, "lora.enabled": True,
}


def _signature(out: Path) -> tuple[dict, dict]:
    return outputs(out), logged(out)


def _differs(a: tuple[dict, dict], b: tuple[dict, dict]) -> bool:
    (wa, la), (wb, lb) = a, b
    if wa.keys() != wb.keys() or la.keys() != lb.keys():
        return True
    return any(not torch.equal(wa[k], wb[k]) for k in wa) or any(abs(la[k] - lb[k]) > 1e-9 for k in la)


@pytest.mark.learning
@pytest.mark.parametrize("command", list(RECIPES))
def test_every_shared_key_changes_the_run(command, tiny_llama, tmp_path):
    module = RECIPES[command]
    base = dict(train={"max_steps": 2, "max_grad_norm": None})
    module.run(recipe_config(command, tiny_llama, tmp_path, "base", **base))
    reference = _signature(tmp_path / "base")
    ignored = []
    for i, (key, value) in enumerate(SHARED_KEYS.items()):
        if key == "data.prompt_template" and command == "sft":
            value = "Q {dialogue}"
        section, name = key.split(".")
        over = {s: dict(v) for s, v in base.items()}
        over.setdefault(section, {})[name] = value
        if key == "train.max_grad_norm":
            over["train"][name] = value
        try:
            module.run(recipe_config(command, tiny_llama, tmp_path, f"k{i}", **over))
        except ConfigError:
            continue  # refused: fine
        if not _differs(reference, _signature(tmp_path / f"k{i}")):
            ignored.append(key)
    assert not ignored, f"{command} accepts and ignores {ignored}"
