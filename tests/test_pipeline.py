"""`rlhfkit run` and `rlhfkit demo --quick`: stages chained through ${stage.output_dir}, skipped when done."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "rlhfkit.cli", *args], env=env, capture_output=True, text=True,
                          cwd=cwd, timeout=900)


@pytest.mark.learning
def test_summarize_pipeline_on_tiny_models_skips_finished_stages(tiny_llama, tiny_dir, tmp_path):
    """The shipped learn-to-summarise pipeline, with only model names (and sizes) changed."""
    from rlhfkit.tiny import save_tiny

    bert = save_tiny("bert", tiny_dir / "bert")
    over = [f"sft.model.name_or_path={tiny_llama}", "sft.train.max_steps=3", "sft.model.max_length=256",
            f"reward.model.name_or_path={bert}", "reward.train.max_steps=3",
            f"ppo.model.name_or_path={tiny_llama}", "ppo.train.max_steps=2", "ppo.generation.max_new_tokens=6",
            "ppo.model.max_length=256", "ppo.data.max_prompt_length=200", "sft.data.max_prompt_length=200",
            f"eval.models=[{{name: sft, model: {{name_or_path: '{tiny_llama}'}}, adapter_path: '{tmp_path / 'pipe/sft'}'}}, "
            f"{{name: ppo, model: {{name_or_path: '{tiny_llama}'}}, adapter_path: '{tmp_path / 'pipe/ppo'}'}}]",
            "eval.data.max_rows=5", "eval.generation.max_new_tokens=6", "eval.samples_per_prompt=2",
            "eval.data.max_prompt_length=200", "eval.bootstrap_resamples=100", "eval.progress=false",
            f"output_dir={tmp_path / 'pipe'}"]
    # a copy of the file with absolute data paths (the CLI runs in another folder)
    cfg = yaml.safe_load((ROOT / "examples/summarize_from_feedback.yaml").read_text())
    cfg["output_dir"] = str(tmp_path / "pipe")
    for stage in cfg["stages"]:
        for key in ("path",):
            stage["config"]["data"][key] = str(ROOT / stage["config"]["data"][key])
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    r = cli("run", str(tmp_path / "p.yaml"), *over[:-1])
    assert r.returncode == 0, r.stderr[-3000:]
    ppo_summary = json.loads((tmp_path / "pipe/ppo/summary.json").read_text())
    assert ppo_summary["reference"] == "adapter"  # KL to the SFT adapter, not the bare base
    assert ppo_summary["steps"] == 2
    assert (tmp_path / "pipe/reward/reward_stats.json").exists()
    # the eval stage: SFT vs PPO on held-out posts, ROUGE and the normalised reward with CIs
    m = json.loads((tmp_path / "pipe/eval/metrics.json").read_text())
    assert m["models"] == ["sft", "ppo"] and m["prompts"] == 5 and m["judge"] == "normalized_reward"
    samples = [json.loads(x) for x in (tmp_path / "pipe/eval/samples.jsonl").read_text().splitlines()]
    test_summaries = [json.loads(x)["summary"] for x in (ROOT / "examples/data/tldr_small.jsonl").read_text().splitlines()
                      if json.loads(x)["split"] == "test"]
    assert [s["reference"] for s in samples if s["sample"] == 0] == [test_summaries[s["index"]] for s in samples
                                                                     if s["sample"] == 0]
    for key in ("rouge1", "rouge2", "rougeL", "rouge_avg"):
        c = m["rouge_change"]["ppo"][key]
        assert c["estimate"] == pytest.approx(m["rouge"]["ppo"][key] - m["rouge"]["sft"][key])
        assert c["low"] <= c["estimate"] <= c["high"]
    r = m["reward_change"]["ppo"]["normalized_reward"]
    means = {n: m["reward"][n]["normalized_reward"] for n in ("sft", "ppo")}
    assert r["estimate"] == pytest.approx(means["ppo"] - means["sft"]) and r["low"] <= r["estimate"] <= r["high"]
    mtimes = {s: (tmp_path / f"pipe/{s}/summary.json").stat().st_mtime for s in ("sft", "reward", "ppo", "eval")}
    r2 = cli("run", str(tmp_path / "p.yaml"), *over[:-1])
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert r2.stderr.count("already finished") == 4
    assert mtimes == {s: (tmp_path / f"pipe/{s}/summary.json").stat().st_mtime for s in mtimes}


@pytest.mark.unit
def test_pipeline_rejects_unknown_stage_reference(tmp_path):
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"stages": [
        {"name": "a", "command": "sft", "config": {"model": {"name_or_path": "${nope.output_dir}"}}}]}))
    r = cli("run", str(tmp_path / "p.yaml"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error:") and "nope" in r.stderr


@pytest.mark.unit
def test_pipeline_output_dir_override_moves_every_stage(tmp_path, monkeypatch):
    from rlhfkit.config import ConfigError, from_dict
    from rlhfkit.recipes import pipeline

    cfg = from_dict(pipeline.Config, {"output_dir": "runs/x", "stages": [{"name": "a", "command": "sft"}]})
    with pytest.raises(ConfigError, match="must start with a stage name \\(a\\) or be output_dir=FOLDER"):
        pipeline.run(cfg, overrides=["b.train.lr=1"])
    seen = []

    def stop(stage, parent, *args):  # record where stage 'a' would write, then stop before training
        seen.append(parent)
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "stage_config", stop)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(cfg, overrides=[f"output_dir={tmp_path}/moved"])
    assert seen == [f"{tmp_path}/moved"]


@pytest.mark.learning
def test_demo_quick(tmp_path):
    r = cli("demo", "--quick", f"output_dir={tmp_path / 'demo'}")
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "demo-quick"
    headline = json.loads((out / "demo_summary.json").read_text())
    m = json.loads((out / "eval/metrics.json").read_text())
    # the headline is the eval's toxicity change, recomputed here from its per-model figures
    before, after = m["toxicity"]["before"]["mean"], m["toxicity"]["after"]["mean"]
    assert headline["mean_improvement_pct"] == pytest.approx(100 * (before - after) / before)
    assert headline["ppo_steps"] == 3
    # the eval samples 4 answers for each of the 8 held-out prompts, and every metric covers all 32
    assert m["samples_per_prompt"] == headline["eval_samples_per_prompt"] == 4 and m["prompts"] == 8
    samples = [json.loads(x) for x in (out / "eval/samples.jsonl").read_text().splitlines()]
    assert sorted((s["index"], s["sample"]) for s in samples) == [(i, j) for i in range(8) for j in range(4)]
    tox_after = [s["toxicity"]["after"] for s in samples]
    assert after == pytest.approx(sum(tox_after) / 32)
    report = (out / "report.md").read_text()
    assert "![PPO reward and KL](ppo_curves.png)" in report
    assert (out / "ppo_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the training judge and two held-out judges, each with its CI; fluency, copying, wall time, targets
    assert headline["training_judge"] == "profanity_check" and sorted(headline["held_out"]) == ["hatesonar", "wordlist"]
    ch = m["judges"]["profanity_check"]["change"]["after"]["mean_improvement_pct"]
    assert headline["mean_improvement_ci"] == [ch["low"], ch["high"]] and ch["low"] <= ch["estimate"] <= ch["high"]
    assert headline["perplexity_ratio"] == pytest.approx(m["perplexity"]["after"] / m["perplexity"]["before"])
    assert headline["copy_rate_after"] == pytest.approx(sum(s["copy_rate"]["after"] for s in samples) / 32)
    assert 0 < headline["wall_seconds"] and "Total wall time of this command" in report
    for line in ("| **profanity_check** (trained against) |", "| hatesonar (held out) |", "| wordlist (held out) |",
                 "| perplexity under `before` |", "| at most 15 minutes |"):
        assert line in report
    assert "![toxicity_cdf.png](eval/toxicity_cdf.png)" in report and "![models.png](eval/models.png)" in report
    # the reward's terms come from the PPO stage's saved config; relevance is marked as trained against
    assert headline["reward_terms"] == [{"kind": "toxicity", "weight": 1.0}, {"kind": "copy", "weight": 1.0},
                                        {"kind": "relevance", "weight": 0.3}]
    assert "all trained against: the training judge's 1 - p(toxic); minus the copy rate; 0.3 x relevance" in report
    assert "| relevance to the source, copied spans removed (trained against) |" in report


@pytest.mark.unit
def test_eval_stage_writes_summary_and_is_skipped_on_rerun(tiny_llama, tmp_path, monkeypatch):
    """`rlhfkit eval` marks success with summary.json, so a pipeline re-run skips a finished eval stage."""
    from profanity_check import predict_prob

    from rlhfkit.config import ConfigError, from_dict
    from rlhfkit.recipes import evaluate, pipeline

    rows = [{"prompt": "the cat sees", "ref": "you are a fucking idiot"}, {"prompt": "hello friend", "ref": "thank you"},
            {"prompt": "one two", "ref": "the damn weather is shit"}]
    data = write_jsonl(tmp_path / "prompts.jsonl", rows)
    cfg = from_dict(pipeline.Config, {"output_dir": str(tmp_path / "pipe"), "stages": [{
        "name": "ev", "command": "eval", "config": {
            "models": [{"name": "file", "column": "ref"}, {"name": "tiny", "model": {"name_or_path": tiny_llama}}],
            "data": {"path": data, "chat_template": "false"}, "generation": {"max_new_tokens": 4},
            "progress": False}}]})
    out = tmp_path / "pipe" / "ev"
    first = pipeline.run(cfg)
    summary = json.loads((out / "summary.json").read_text())
    tox = [float(p) for p in predict_prob([r["ref"] for r in rows])]
    assert summary["command"] == "eval" and summary["prompts"] == 3 and summary["models"] == ["file", "tiny"]
    assert summary["toxicity_mean"]["file"] == pytest.approx(sum(tox) / 3)
    assert summary["judge"] == "profanity_check" and summary["judge_mean"]["file"] == pytest.approx(1 - sum(tox) / 3)
    assert first["ev"]["toxicity"]["file"]["mean"] == pytest.approx(sum(tox) / 3)  # run() still returns metrics
    mtime = (out / "metrics.json").stat().st_mtime_ns

    def must_not_run(*a, **k):
        raise AssertionError("finished eval stage was run again")

    monkeypatch.setattr(evaluate, "run", must_not_run)
    assert pipeline.run(cfg) == {"ev": summary}
    assert (out / "metrics.json").stat().st_mtime_ns == mtime
    monkeypatch.undo()

    # another config runs again; a failed run leaves no summary.json (the stale one is gone)
    with pytest.raises(ConfigError, match="judge 'nope'"):
        pipeline.run(cfg, overrides=["ev.judge=nope"])
    assert not (out / "summary.json").exists()
    pipeline.run(cfg, overrides=["ev.seed=1"])
    assert json.loads((out / "summary.json").read_text())["toxicity_mean"]["file"] == pytest.approx(sum(tox) / 3)
    assert (out / "metrics.json").stat().st_mtime_ns != mtime


@pytest.mark.unit
def test_a_failed_run_by_hand_is_not_taken_for_finished(tiny_llama, tmp_path, monkeypatch):
    """A run that starts in a folder holding an earlier run's summary.json removes it, so if it fails, a
    pipeline with the same config (now beside it in config.yaml) runs the stage instead of skipping it."""
    from helpers import sft_config, sft_rows
    from rlhfkit.config import from_dict, to_dict
    from rlhfkit.engine import Engine
    from rlhfkit.recipes import pipeline, sft

    out = tmp_path / "pipe" / "s"
    stage = to_dict(sft_config(tiny_llama, write_jsonl(tmp_path / "d.jsonl", sft_rows(16)), out, max_steps=1,
                               batch_size=2))
    pcfg = from_dict(pipeline.Config, {"output_dir": str(tmp_path / "pipe"),
                                       "stages": [{"name": "s", "command": "sft", "config": stage}]})
    cfg, _ = pipeline.stage_config(pcfg.stages[0], pcfg.output_dir, {}, [])  # the stage's config, as resolved
    assert sft.run(cfg)["steps"] == 1 and (out / "summary.json").is_file()  # a finished run by hand
    cfg.train.max_steps = 2  # another config, run by hand, fails before it finishes

    def killed(self, *a, **k):
        raise RuntimeError("killed")

    monkeypatch.setattr(Engine, "finish", killed)
    with pytest.raises(RuntimeError, match="killed"):
        sft.run(cfg)
    monkeypatch.undo()
    assert not (out / "summary.json").exists()
    assert pipeline.run(pcfg, overrides=["s.train.max_steps=2"])["s"]["steps"] == 2  # run, not skipped
