"""rlhfkit prefs: accept/reject decisions, retry cap, resume after an interrupt, output formats,
statistics by hand, temperatures, judge mode, and one real run on a tiny model through the CLI."""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest

from helpers import write_jsonl
from rlhfkit.config import DataConfig, GenerationConfig, RewardConfig
from rlhfkit.engine import Interrupted
from rlhfkit.recipes import prefs
from rlhfkit.recipes.prefs import ChecksConfig, Checker, decide, gap_statistics, pick, trim_to_sentence
from rlhfkit.rewards import Composite
from rlhfkit.utils import read_jsonl

# ---------------------------------------------------------------------------------------------
# Stubs: texts "a|b tag." carry the two reward parts; total = 0.1 + a + 0.5 b
# ---------------------------------------------------------------------------------------------


def t(a: float, b: float, tag: str = "x") -> str:
    return f"{a}|{b} {tag}."


def parts_reward() -> Composite:
    def part_a(prompts, completions, **columns):
        return [float(c.split("|")[0]) for c in completions]

    def part_b(prompts, completions, **columns):
        return [float(c.split("|")[1].split()[0]) for c in completions]

    return Composite([("a", 1.0, part_a), ("b", 0.5, part_b)], bias=0.1)


class Script:
    """Stub sampler: round k of prompt p returns ``script[p][min(k, last)]`` (N texts)."""

    def __init__(self, script: dict, fail_on_call: int | None = None):
        self.script, self.fail_on_call = script, fail_on_call
        self.rounds: Counter = Counter()
        self.calls = 0

    def __call__(self, prompts, temperature):
        self.calls += 1
        if self.fail_on_call is not None and self.calls == self.fail_on_call:
            raise KeyboardInterrupt
        seen: Counter = Counter()
        out = []
        for p in prompts:
            rounds = self.script[p]
            out.append(rounds[min(self.rounds[p], len(rounds) - 1)][seen[p]])
            seen[p] += 1
        for p in seen:
            self.rounds[p] += 1
        return out


def make_cfg(tmp_path: Path, prompts: list[str], **kw) -> prefs.Config:
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p, "target": "positive", "split": "train"} for p in prompts])
    base = dict(data=DataConfig(path=data, chat_template="false"), generation=GenerationConfig(batch_size=4),
                samples_per_prompt=2, output_dir=str(tmp_path / "out"), progress=False)
    base.update(kw)
    return prefs.Config(**base)


# ---------------------------------------------------------------------------------------------
# Decisions
# ---------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_pick_and_decide_by_hand():
    assert pick([0.1, 0.9, 0.5]) == (1, 0)
    assert pick([0.5, 0.5, 0.2, 0.2]) == (0, 3)  # best: first of the ties, worst: last of the ties
    texts = ["a", "b", "c"]
    d = decide([0.1, 0.9, 0.5], texts, min_gap=0.5, min_score=None)
    assert (d.accepted, d.best, d.worst, d.reasons) == (True, 1, 0, [])
    d = decide([0.1, 0.9, 0.5], texts, min_gap=0.81, min_score=None)  # gap 0.8 < 0.81
    assert (d.accepted, d.reasons) == (False, ["gap"])
    d = decide([0.1, 0.9, 0.5], texts, min_gap=0.8 - 1e-9, min_score=0.95)  # floor: best 0.9 < 0.95
    assert (d.accepted, d.reasons) == (False, ["min_score"])
    d = decide([0.1, 0.9, 0.5], texts, min_gap=0.0, min_score=0.9)  # best == floor passes
    assert d.accepted
    d = decide([0.3, 0.3], ["same", "same"], min_gap=0.0, min_score=None)
    assert d.reasons == ["identical"]
    d = decide([0.0, 1.0], ["a", "b"], 0.5, 2.0, [("label", "label 'negative' != target 'positive'")])
    assert d.reasons == ["min_score", "label"] and d.details[1] == "label 'negative' != target 'positive'"


@pytest.mark.unit
def test_checker_label_gibberish_punctuation():
    checker = Checker(ChecksConfig(label_column="target", clean=True, end_punctuation=".!?"))
    texts = [
        "What a wonderful, happy day. I love it!",  # VADER positive, all dictionary words, ends in !
        "This is terrible and I feel so sad.",      # VADER negative
        "I love this wonderful day",                # no end punctuation
        'She said "that is great news!"',           # ! before the closing quote counts
        "xqzv blorp zkkt wubbo flarn.",              # non-words: label 'noise', VADER neutral
    ]
    rows = [{"target": "positive"}, {"target": "positive"}, {"target": "positive"}, {"target": "positive"},
            {"target": "neutral"}]
    codes = [[c for c, _ in f] for f in checker(texts, rows)]
    assert codes == [[], ["label"], ["punctuation"], [], ["gibberish"]]
    assert checker(texts[1:2], rows[1:2])[0][0][1] == "label 'negative' != target 'positive'"
    # clean with confidence below the bar: 4 dictionary words of 5 gives score 0.8, 3 of 5 gives 0.6
    strict = Checker(ChecksConfig(clean=True, clean_confidence=0.8))
    assert strict(["the cat sat on zzqx."], [{}]) == [[]]
    assert strict(["the cat sat zzqx qqzv."], [{}])[0][0][0] == "gibberish"


@pytest.mark.unit
def test_trim_to_sentence():
    assert trim_to_sentence("Hello there. How are") == "Hello there."
    assert trim_to_sentence('He said "yes!" and then') == 'He said "yes!"'
    assert trim_to_sentence("Done already?") == "Done already?"
    assert trim_to_sentence("no sentence end at all") == "no sentence end at all"


@pytest.mark.unit
def test_gap_statistics_by_hand():
    rows = [{"chosen_score": g, "rejected_score": 0.0} for g in (0.5, 1.0, 2.0, 4.5)]
    s = gap_statistics(rows)
    # median of 0.5 1 2 4.5 = 1.5; mean 8 / 4 = 2; SD = sqrt((1.5^2 + 1^2 + 0^2 + 2.5^2) / 3) = sqrt(9.5 / 3)
    assert s == pytest.approx({"n": 4, "median": 1.5, "mean": 2.0, "sd": math.sqrt(9.5 / 3), "min": 0.5, "max": 4.5})
    assert gap_statistics(rows[:1])["sd"] is None


# ---------------------------------------------------------------------------------------------
# Runs with stub samplers and rewards
# ---------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_run_accepts_retries_and_fails_with_reasons(tmp_path):
    script = {
        "p1": [[t(0.9, 0.2), t(0.1, 0.0, "y")]],                         # 1.1 vs 0.2: accepted at once
        "p2": [[t(0.5, 0), t(0.4, 0, "y")], [t(0.2, 0), t(0.8, 0.4, "y")]],  # gap 0.1, then 0.3 vs 1.1
        "p3": [[t(0.5, 0), t(0.45, 0, "y")]],                            # gap 0.05 every round
        "p4": [[t(0.3, 0), t(-0.5, 0, "y")]],                            # gap 0.8 but best 0.4 < 0.5
        "p5": [["0.9|0 no end", t(0.0, 0, "y")]],                        # best lacks end punctuation
    }
    sampler = Script(script)
    cfg = make_cfg(tmp_path, list(script), min_gap=0.3, min_score=0.5, max_attempts=3,
                   checks=ChecksConfig(end_punctuation=".!?"))
    summary = prefs.run(cfg, sample_fn=sampler, reward_fn=parts_reward())
    assert sampler.rounds == {"p1": 1, "p2": 2, "p3": 3, "p4": 3, "p5": 3}
    rows = {r["prompt"]: r for r in read_jsonl(tmp_path / "out" / "prefs.jsonl")}
    assert set(rows) == {"p1", "p2"}
    assert rows["p1"] == pytest.approx({
        "prompt": "p1", "chosen": t(0.9, 0.2), "rejected": t(0.1, 0.0, "y"), "chosen_score": 1.1,
        "rejected_score": 0.2, "chosen_a": 0.9, "rejected_a": 0.1, "chosen_b": 0.2, "rejected_b": 0.0,
        "attempts": 1, "target": "positive", "split": "train"})
    assert rows["p2"]["chosen"] == t(0.8, 0.4, "y") and rows["p2"]["chosen_score"] == pytest.approx(1.1)
    assert rows["p2"]["attempts"] == 2
    failed = {r["prompt"]: r for r in read_jsonl(tmp_path / "out" / "prefs.jsonl.failed.jsonl")}
    assert failed["p3"]["reasons"] == {"gap": 3} and failed["p3"]["reason"] == "gap 0.05 < min_gap 0.3"
    assert failed["p4"]["reasons"] == {"min_score": 3} and failed["p4"]["attempts"] == 3
    assert failed["p5"]["reasons"] == {"punctuation": 3}
    assert "does not end in one of '.!?'" in failed["p5"]["reason"]
    assert summary["accepted"] == 2 and summary["failed"] == 3 and summary["acceptance_rate"] == pytest.approx(0.4)
    assert summary["this_run"]["rejections"] == {"gap": 4, "min_score": 3, "punctuation": 3}
    assert summary["samples"] == 2 * (1 + 2 + 3 + 3 + 3)


@pytest.mark.unit
def test_resume_after_interrupt_loses_nothing(tmp_path):
    names = [f"q{i}" for i in range(6)]
    script = {p: [[t(1.0, 0), t(0.0, 0, "y")]] for p in names}
    script["q2"] = [[t(0.5, 0), t(0.5, 0, "y")]]  # gap 0: fails at its only attempt
    cfg = make_cfg(tmp_path, names, min_gap=0.5, max_attempts=1, generation=GenerationConfig(batch_size=2))
    first = Script(script, fail_on_call=5)  # one prompt per round: q0..q3 finish, the 5th call is interrupted
    with pytest.raises(Interrupted) as e:
        prefs.run(cfg, sample_fn=first, reward_fn=parts_reward())
    assert e.value.code == 130
    out = tmp_path / "out" / "prefs.jsonl"
    before = out.read_text().splitlines()
    assert [json.loads(x)["prompt"] for x in before] == ["q0", "q1", "q3"]
    assert [r["prompt"] for r in read_jsonl(tmp_path / "out" / "prefs.jsonl.failed.jsonl")] == ["q2"]
    with open(out, "a") as f:  # a write cut off by a kill
        f.write('{"prompt": "q4", "cho')
    second = Script(script)
    summary = prefs.run(cfg, sample_fn=second, reward_fn=parts_reward())
    assert set(second.rounds) == {"q4", "q5"}  # finished prompts (accepted or failed) are not sampled again
    after = out.read_text().splitlines()
    assert after[:3] == before and [json.loads(x)["prompt"] for x in after[3:]] == ["q4", "q5"]
    assert summary["accepted"] == 5 and summary["failed"] == 1
    assert summary["this_run"] == {**summary["this_run"], "accepted": 2, "failed": 0, "skipped": 4}


@pytest.mark.unit
@pytest.mark.parametrize("output,fmt,expected", [("prefs.jsonl", "auto", "jsonl"), ("prefs.parquet", "auto", "parquet"),
                                                 ("prefs_ds", "auto", "datasets"), ("pairs.bin", "parquet", "parquet")])
def test_output_formats(tmp_path, output, fmt, expected):
    from rlhfkit.data import read_table

    script = {f"p{i}": [[t(1.0 + i, 0.5), t(0.0, 0, "y")]] for i in range(3)}
    cfg = make_cfg(tmp_path, list(script), output=output, format=fmt)
    summary = prefs.run(cfg, sample_fn=Script(script), reward_fn=parts_reward())
    assert summary["format"] == expected
    out = tmp_path / "out" / output
    working = out if expected == "jsonl" else Path(f"{out}.partial.jsonl")
    rows = read_jsonl(working)
    assert [r["prompt"] for r in rows] == ["p0", "p1", "p2"]
    if expected == "jsonl":
        back = read_table(str(out)).rows
    elif expected == "parquet":
        import pyarrow.parquet as pq

        back = pq.read_table(out).to_pylist()
    else:
        back = read_table(str(out)).rows
    assert back == rows
    # a re-run with nothing left to do samples nothing and writes the same rows again
    def never(prompts, temperature):
        raise AssertionError("nothing should be sampled")

    assert prefs.run(cfg, sample_fn=never, reward_fn=parts_reward())["accepted"] == 3


@pytest.mark.unit
def test_statistics_histogram_and_summary(tmp_path):
    script = {f"p{i}": [[t(g, 0), t(0.0, 0, "y")]] for i, g in enumerate((0.5, 1.0, 2.0, 4.5))}
    cfg = make_cfg(tmp_path, list(script))
    summary = prefs.run(cfg, sample_fn=Script(script), reward_fn=parts_reward())
    assert summary["gap"]["median"] == pytest.approx(1.5)
    assert summary["gap"]["mean"] == pytest.approx(2.0)
    assert summary["gap"]["sd"] == pytest.approx(math.sqrt(9.5 / 3))
    assert summary["chosen_score_mean"] == pytest.approx(0.1 + 2.0) and summary["rejected_score_mean"] == pytest.approx(0.1)
    assert (tmp_path / "out" / "gap_hist.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["accepted"] == 4
    assert (tmp_path / "out" / "config.yaml").is_file()


@pytest.mark.unit
def test_temperatures_cycle_over_samples_and_prompts_are_batched(tmp_path):
    calls = []

    def sample(prompts, temperature):
        calls.append((list(prompts), temperature))
        return [f"{temperature}|0 {p} {i}." for i, p in enumerate(prompts)]

    cfg = make_cfg(tmp_path, ["a", "b"], samples_per_prompt=3, temperatures=[0.7, 1.0], generation=GenerationConfig(batch_size=6))
    prefs.run(cfg, sample_fn=sample, reward_fn=parts_reward())
    # samples 0 and 2 of each prompt at 0.7, sample 1 at 1.0; both prompts in each generate call
    assert calls == [(["a", "a", "b", "b"], 0.7), (["a", "b"], 1.0)]
    rows = read_jsonl(tmp_path / "out" / "prefs.jsonl")
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("1.0|0 a 0.", "0.7|0 a 1."), ("1.0|0 b 1.", "0.7|0 b 3.")]


@pytest.mark.unit
def test_judge_mode_ranks_samples_with_the_pairwise_judge(tmp_path):
    from rlhfkit.feedback import PairwiseJudge

    class CountGood:  # log p(A) - log p(B) = #good(first) - #good(second)
        def logprobs(self, texts, candidates):
            out = []
            for text in texts:
                a, b = text.split("\nA: ")[1].split("\nB: ")
                out.append([a.count("good"), b.count("good")])
            return out

    judge = PairwiseJudge(CountGood(), template="{prompt}\nA: {a}\nB: {b}")
    script = {"p": [["good good.", "good.", "bad."]]}
    cfg = make_cfg(tmp_path, ["p"], mode="judge", samples_per_prompt=3, generation=GenerationConfig(batch_size=3))
    prefs.run(cfg, sample_fn=Script(script), judge=judge)
    (row,) = read_jsonl(tmp_path / "out" / "prefs.jsonl")
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert (row["chosen"], row["rejected"]) == ("good good.", "bad.")
    assert row["chosen_score"] == pytest.approx((sig(1) + sig(2)) / 2)
    assert row["rejected_score"] == pytest.approx((sig(-2) + sig(-1)) / 2)


# ---------------------------------------------------------------------------------------------
# The real path: tiny model, config file, CLI
# ---------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_cli_prefs_on_a_tiny_model(tiny_gpt2, tmp_path, capsys):
    import yaml

    from rlhfkit.cli import main
    from rlhfkit.rewards import build_reward

    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"the {w} runs", "split": s}
                                               for w, s in [("cat", "train"), ("dog", "train"), ("sun", "test")]])
    rewards = [{"kind": "length", "min_words": 1, "max_words": 2, "name": "len"}, {"kind": "gibberish", "weight": 0.5}]
    cfg_file = tmp_path / "prefs.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "model": {"name_or_path": tiny_gpt2}, "data": {"path": data, "where": {"split": "train"}},
        "generation": {"max_new_tokens": 6, "batch_size": 6}, "samples_per_prompt": 3, "temperatures": [0.8, 1.2],
        "rewards": rewards, "reward_bias": 0.001, "max_attempts": 2, "output_dir": str(tmp_path / "out"),
        "progress": False}))
    assert main(["prefs", "--config", str(cfg_file)]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    rows = read_jsonl(tmp_path / "out" / "prefs.jsonl")
    failed = read_jsonl(tmp_path / "out" / "prefs.jsonl.failed.jsonl") if summary["failed"] else []
    assert summary["prompts"] == 2 and summary["accepted"] + summary["failed"] == 2 and len(rows) == summary["accepted"]
    assert {r["prompt"] for r in rows + failed} == {"the cat runs", "the dog runs"}  # 'where' left out the test row
    composite = build_reward([RewardConfig(**r) for r in rewards], bias=0.001)
    for r in rows:  # stored scores are the composite of the stored texts
        total, parts = composite.score([r["prompt"]] * 2, [r["chosen"], r["rejected"]])
        assert [r["chosen_score"], r["rejected_score"]] == pytest.approx(total)
        assert [r["chosen_len"], r["rejected_len"]] == pytest.approx(parts["len"])
        assert r["chosen_score"] >= r["rejected_score"] and r["chosen"] != r["rejected"]
    # bad config: one 'error:' line, exit 2
    capsys.readouterr()
    assert main(["prefs", "--config", str(cfg_file), "rewards=[]"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "rewards" in err and len(err.strip().splitlines()) == 1


@pytest.mark.unit
def test_judge_mode_with_the_policy_as_its_own_judge(tiny_llama, tmp_path):
    """mode=judge without judge.model: the sampling model judges; N = 2 gives scores (p, 1 - p)."""
    from rlhfkit.config import ModelConfig
    from rlhfkit.feedback import LMScorer, PairwiseJudge, load_lm

    cfg = make_cfg(tmp_path, ["the cat runs", "a dog"], mode="judge", model=ModelConfig(name_or_path=tiny_llama),
                   generation=GenerationConfig(max_new_tokens=5, batch_size=4), max_attempts=2)
    summary = prefs.run(cfg)
    rows = read_jsonl(tmp_path / "out" / "prefs.jsonl")
    assert len(rows) == summary["accepted"] and summary["accepted"] + summary["failed"] == 2
    model, tok = load_lm(ModelConfig(name_or_path=tiny_llama))
    judge = PairwiseJudge(LMScorer(model, tok))
    for r in rows:
        p = judge(r["prompt"], r["chosen"], r["rejected"])
        assert r["chosen_score"] == pytest.approx(p, abs=1e-6) and r["rejected_score"] == pytest.approx(1 - p, abs=1e-6)
        assert p >= 0.5


@pytest.mark.unit
def test_shipped_prefs_examples_load():
    from rlhfkit.config import load_config
    from rlhfkit.recipes import pipeline

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(prefs.Config, root / "examples/prefs_emotion.yaml")
    assert [(r.kind, r.weight) for r in cfg.rewards] == [("label_match", 0.4), ("length", 0.25), ("gibberish", 0.35)]
    assert cfg.reward_bias == 0.001 and cfg.data.where == {"split": "train"}
    pipe = load_config(pipeline.Config, root / "examples/prefs_then_dpo.yaml")
    assert [s.command for s in pipe.stages] == ["prefs", "sft", "dpo", "eval"]
    outputs = {}
    for stage in pipe.stages:
        scfg, _ = pipeline.stage_config(stage, pipe.output_dir, outputs, [])
        outputs[stage.name] = scfg.train.output_dir if hasattr(scfg, "train") else scfg.output_dir
    assert outputs["prefs"] == "runs/prefs_then_dpo/prefs"


@pytest.mark.learning
def test_prefs_then_dpo_pipeline_on_a_tiny_model(tiny_llama, tmp_path):
    """The shipped prefs -> SFT -> DPO -> eval pipeline with only the model (and sizes) changed:
    rows flow from stage to stage, DPO uses the SFT adapter as its frozen reference, eval reports a
    win rate."""
    import os
    import subprocess
    import sys

    import yaml

    root = Path(__file__).resolve().parents[1]
    cfg = yaml.safe_load((root / "examples/prefs_then_dpo.yaml").read_text())
    cfg["output_dir"] = str(tmp_path / "pipe")
    cfg["stages"][0]["file"] = str(root / cfg["stages"][0]["file"])
    ev = cfg["stages"][3]["config"]
    for m in ev["models"]:
        m["model"]["name_or_path"] = tiny_llama
    ev["data"]["path"] = str(root / ev["data"]["path"])
    ev.update(progress=False, generation={**ev["generation"], "max_new_tokens": 6})
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    over = [f"prefs.model.name_or_path={tiny_llama}", f"prefs.data.path={root / 'examples/data/emotion_prompts.jsonl'}",
            "prefs.data.max_rows=6", "prefs.generation.max_new_tokens=6", "prefs.min_gap=0.0", "prefs.progress=false",
            "prefs.checks.label_column=null", "prefs.checks.clean=false", "prefs.checks.end_punctuation=null",
            f"sft.model.name_or_path={tiny_llama}", "sft.train.max_steps=2", "sft.train.batch_size=2",
            f"dpo.model.name_or_path={tiny_llama}", "dpo.train.max_steps=2", "dpo.train.batch_size=2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root)}

    proc = subprocess.run([sys.executable, "-m", "rlhfkit.cli", "run", str(tmp_path / "p.yaml"), *over], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pipe = tmp_path / "pipe"
    summary = json.loads((pipe / "prefs/summary.json").read_text())
    rows = read_jsonl(pipe / "prefs/prefs.jsonl")
    assert summary["prompts"] == 6 and summary["accepted"] + summary["failed"] == 6 and len(rows) == summary["accepted"] >= 1
    assert {r["target"] for r in rows} <= {"positive", "negative"} and all(r["split"] == "train" for r in rows)
    assert f"reference: frozen adapter {pipe / 'sft'}" in proc.stderr  # two adapters, one base
    metrics = json.loads((pipe / "eval/metrics.json").read_text())
    assert metrics["prompts"] == 40 and metrics["judge"] == "total"  # the held-out split only
    assert set(metrics["win_rate_vs_baseline"]) == {"dpo"}
