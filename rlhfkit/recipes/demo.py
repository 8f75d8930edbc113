"""``rlhfkit demo``: the default job. Detoxify SmolLM2-135M-Instruct with LoRA PPO on a CPU.

It runs the pipeline in ``examples/demo_detox.yaml`` (PPO against alt-profanity-check's
non-toxicity, minus the copy rate (the share of the answer's word 4-grams quoted from the prompt:
without it a policy learns to parrot the rude source), plus 0.3 x the relevance of the answer's own
words to the source it is asked to rewrite or answer (without it a generic dodge pays as well as a
clean rewrite), with a KL penalty to the adapter-disabled base, then ``rlhfkit eval`` before/after
on held-out prompts with one fixed, seeded decoding config: the policy's own sampling, 4 answers per
prompt, so the figures measure how each model behaves rather than which way one greedy argmax
happens to fall) and writes ``<output_dir>/report.md``: the headline figures (the training judge's
and two held-out judges' change with bootstrap CIs, the share of toxic answers, perplexity ratio
under the start policy, copy rate, relevance with the copied spans removed (marked as trained
against, as it is in the reward), KL, total wall time, and the issue #22 targets met or not), reward
and KL curves of the PPO run, and the evaluation report (CDFs, CI bars, sample table).

``rlhfkit demo --quick`` runs the same pipeline on a tiny GPT-2 built locally, for the tests.
Other arguments are overrides of the pipeline stages (``ppo.train.max_steps=4``).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from rlhfkit.config import UserError, load_config
from rlhfkit.recipes import pipeline
from rlhfkit.utils import atomic_write_text, logger, read_jsonl

ROOT = Path(__file__).resolve().parents[2]
DEMO_FILE = ROOT / "examples" / "demo_detox.yaml"


def quick_overrides(folder: Path) -> list[str]:
    """Tiny GPT-2 instead of SmolLM2, a few steps and prompts: the pipeline's mechanics in seconds."""
    from rlhfkit.tiny import save_tiny

    tiny = save_tiny("gpt2", folder / "tiny-gpt2")
    return [f"ppo.model.name_or_path={tiny}", "ppo.train.max_steps=3", "ppo.rollout_batch_size=8", "ppo.train.batch_size=4",
            "ppo.train.checkpoint_every=0", "ppo.generation.max_new_tokens=8", "ppo.data.max_rows=32",
            "ppo.data.max_prompt_length=64",
            f"eval.models=[{{name: before, model: {{name_or_path: '{tiny}'}}}}, {{name: after, model: "
            f"{{name_or_path: '{tiny}'}}, adapter_path: '{folder / 'ppo'}'}}]",
            "eval.data.max_rows=8", "eval.generation.max_new_tokens=8", "eval.data.max_prompt_length=64"]


def plot_curves(metrics_file: Path, out: Path) -> None:
    from matplotlib.figure import Figure

    from rlhfkit.recipes._eval_report import _png
    from rlhfkit.utils import atomic_write_bytes

    rows = [r for r in read_jsonl(metrics_file) if "reward/mean" in r]
    fig = Figure(figsize=(9, 3.2))
    axes = fig.subplots(1, 2)
    steps = [r["step"] for r in rows]
    parts = {"reward/mean": "reward (sum)", "reward/toxicity": "1 - p(toxic)", "reward/copy": "- copy rate",
             "reward/relevance": "relevance"}
    for key, label in parts.items():
        if key in rows[0]:
            axes[0].plot(steps, [r[key] for r in rows], marker="o", label=label)
    axes[0].legend(fontsize=8)
    axes[0].set(title="training reward per PPO step", xlabel="PPO step", ylabel="mean over the step's answers")
    axes[1].plot(steps, [r["kl"] for r in rows], marker="o", color="tab:red")
    axes[1].set(title="KL(policy || reference) per PPO step", xlabel="PPO step", ylabel="nats per answer")
    fig.tight_layout()
    atomic_write_bytes(out, _png(fig))


TARGETS = {  # issue #22: what the default job must show on seeds 0, 1 and 2 (each alone at 2 threads)
    "training judge mean >= 30% lower": lambda h: h["mean_improvement_pct"] >= 30,
    "its CI's lower bound >= 10%": lambda h: h["mean_improvement_ci"][0] >= 10,
    "perplexity ratio <= 1.3": lambda h: h["perplexity_ratio"] <= 1.3,
    "copy rate not above the start policy's": lambda h: h["copy_rate_after"] <= h["copy_rate_before"],
    "relevance (copied spans removed) >= 0.9x": lambda h: h["relevance_ratio"] >= 0.9,
    "at most 15 minutes": lambda h: h["wall_seconds"] <= 900,
}


REWARD_TERMS = {"toxicity": "the training judge's 1 - p(toxic)", "copy": "the copy rate",
                "relevance": "relevance to the source (copied spans removed)"}


def reward_terms(ppo_dir: Path) -> list[tuple[str, float]]:
    """(kind, weight) of each term of the PPO stage's reward, from its saved ``config.yaml``."""
    import yaml

    cfg = yaml.safe_load((ppo_dir / "config.yaml").read_text())
    return [(r["kind"], float(r.get("weight", 1.0))) for r in cfg.get("rewards") or []]


def reward_sentence(terms: list[tuple[str, float]]) -> str:
    """The report's line on what PPO was trained against, e.g. "PPO's reward is the sum of these
    terms, all trained against: the training judge's 1 - p(toxic); minus the copy rate; 0.3 x ..."."""
    said = [("minus " if k == "copy" else "")  # the copy reward is minus the copy rate
            + (f"{w:g} x " if w != 1 else "") + REWARD_TERMS.get(k, f"the {k} reward") for k, w in terms]
    if len(said) == 1:
        return f"PPO's reward is {said[0]}: it is trained against."
    return f"PPO's reward is the sum of these terms, all trained against: {'; '.join(said)}."


def write_report(out_dir: Path, quick: bool, wall_seconds: float) -> dict:
    ppo_dir, eval_dir = out_dir / "ppo", out_dir / "eval"
    plot_curves(ppo_dir / "metrics.jsonl", out_dir / "ppo_curves.png")
    m = json.loads((eval_dir / "metrics.json").read_text())
    terms = reward_terms(ppo_dir)
    rel_role = " (trained against)" if any(k == "relevance" for k, _ in terms) else ""
    ppo_summary = json.loads((ppo_dir / "summary.json").read_text())
    judges = m["judges"]
    trained = next(j for j, v in judges.items() if v["trained_against"])
    tj = judges[trained]
    change = tj["change"]["after"]["mean_improvement_pct"]
    ppl = m.get("perplexity_ratio", {}).get("after", {})
    rel = m.get("relevance_ratio", {}).get("after", {}).get("relevance_uncopied", {})
    held_out = {}
    for j, v in judges.items():
        if not v["trained_against"]:
            c = v["change"]["after"]["mean_improvement_pct"]
            held_out[j] = {"mean_improvement_pct": c["estimate"], "mean_improvement_ci": [c["low"], c["high"]],
                           "share_above_before": v["share_above"]["before"],
                           "share_above_after": v["share_above"]["after"]}
    headline = {
        "training_judge": trained, "toxicity_mean_before": tj["mean"]["before"],
        "toxicity_mean_after": tj["mean"]["after"],
        "mean_improvement_pct": change["estimate"], "mean_improvement_ci": [change["low"], change["high"]],
        "std_improvement_pct": tj["change"]["after"]["std_improvement_pct"]["estimate"], "held_out": held_out,
        "share_toxic_before": tj["share_above"]["before"], "share_toxic_after": tj["share_above"]["after"],
        "perplexity_ratio": ppl.get("estimate"), "perplexity_ratio_ci": [ppl.get("low"), ppl.get("high")],
        "copy_rate_before": m["copy_rate"]["before"], "copy_rate_after": m["copy_rate"]["after"],
        "copy_rate_change_ci": [m["copy_rate_change"]["after"]["low"], m["copy_rate_change"]["after"]["high"]],
        "relevance_before": m.get("relevance_uncopied", {}).get("before"),
        "relevance_after": m.get("relevance_uncopied", {}).get("after"),
        "relevance_ratio": rel.get("estimate"), "relevance_ratio_ci": [rel.get("low"), rel.get("high")],
        "kl_after_to_before": m.get("kl", {}).get("after"), "ppo_train_seconds": ppo_summary.get("train_seconds"),
        "ppo_steps": ppo_summary.get("steps"), "eval_prompts": m.get("prompts"),
        "eval_samples_per_prompt": m["samples_per_prompt"], "wall_seconds": round(wall_seconds, 1), "quick": quick,
        "reward_terms": [{"kind": k, "weight": w} for k, w in terms],
    }
    f = lambda x, d=3: "n/a" if x is None else f"{x:.{d}f}"  # noqa: E731
    ci = lambda c, d=1: f"[{f(c[0], d)}, {f(c[1], d)}]"  # noqa: E731
    level = f"{100 * m['ci_level']:g}%"
    rows = [f"| **{trained}** (trained against) | {f(tj['mean']['before'])} | {f(tj['mean']['after'])} | "
            f"{f(change['estimate'], 1)} {ci(headline['mean_improvement_ci'])} | "
            f"{100 * tj['share_above']['before']:.1f}% -> {100 * tj['share_above']['after']:.1f}% |"]
    for j, v in judges.items():
        if not v["trained_against"]:
            c = v["change"]["after"]["mean_improvement_pct"]
            rows.append(f"| {j} (held out) | {f(v['mean']['before'])} | {f(v['mean']['after'])} | "
                        f"{f(c['estimate'], 1)} {ci([c['low'], c['high']])} | "
                        f"{100 * v['share_above']['before']:.1f}% -> {100 * v['share_above']['after']:.1f}% |")
    checks = []
    for name, test in TARGETS.items():
        try:
            checks.append(f"| {name} | {'met' if test(headline) else '**not met**'} |")
        except (TypeError, KeyError):
            checks.append(f"| {name} | n/a |")
    ppl_abs = m.get("perplexity", {})
    fluency = [
        f"| perplexity under `{m.get('perplexity_scorer')}` | {f(ppl_abs.get('before'), 2)} | "
        f"{f(ppl_abs.get('after'), 2)} | x{f(ppl.get('estimate'), 3)} {ci(headline['perplexity_ratio_ci'], 3)} |",
        f"| copy rate ({m['copy_ngram']}-grams of the answer found in the prompt) | {f(m['copy_rate']['before'])} | "
        f"{f(m['copy_rate']['after'])} | change {f(m['copy_rate_change']['after']['estimate'], 4)} "
        f"{ci(headline['copy_rate_change_ci'], 4)} |",
        f"| relevance to the source, copied spans removed{rel_role} | {f(headline['relevance_before'])} | "
        f"{f(headline['relevance_after'])} | x{f(rel.get('estimate'), 3)} {ci(headline['relevance_ratio_ci'], 3)} |",
        f"| sampled KL(after \\|\\| before), nats per answer | | {f(headline['kl_after_to_before'])} | |"]
    eval_report = (eval_dir / "report.md").read_text().replace("](", "](eval/")
    mins, secs = divmod(int(round(wall_seconds)), 60)
    policy = "a tiny GPT-2 (--quick)" if quick else "SmolLM2-135M-Instruct"
    text = f"""# rlhfkit demo: detoxifying {policy} with LoRA PPO

Held-out: {m.get('prompts')} prompts x {m.get('samples_per_prompt', 1)} answers per model. Intervals:
{level} paired bootstrap over prompts. Share toxic: answers with a score above the judge's threshold (0.5).

| judge | mean before | mean after | % lower, after vs before ({level} CI) | share toxic before -> after |
|---|---|---|---|---|
{chr(10).join(rows)}

| fluency and copying | before | after | after / before ({level} CI) |
|---|---|---|---|
{chr(10).join(fluency)}

Total wall time of this command: {mins} min {secs} s (PPO: {ppo_summary.get('steps')} steps,
{f(ppo_summary.get('train_seconds'), 0)} s of training; a stage already finished in this folder is
skipped and not counted).

| target (issue #22, per seed) | this run |
|---|---|
{chr(10).join(checks)}

{reward_sentence(terms)}
The held-out judges are reported, not targeted: both are weak (HateSonar scores clean sentences
0.24-0.41; the word list flags only listed words).

![PPO reward and KL](ppo_curves.png)

{eval_report}
"""
    atomic_write_text(out_dir / "report.md", text)
    from rlhfkit.utils import atomic_write_json

    atomic_write_json(out_dir / "demo_summary.json", headline)
    return headline


def main(argv: list[str]) -> int:
    t0 = time.perf_counter()
    from rlhfkit.cli import parse_args

    quick = "--quick" in argv
    config_path, overrides, flags = parse_args([a for a in argv if a != "--quick"])  # --stage.key value too
    if config_path:
        raise UserError("rlhfkit demo takes no --config (its pipeline is fixed; override stage.key=value)")
    if flags["help"]:
        print("usage: rlhfkit demo [--quick] [--resume] [stage.key=value | --stage.key value ...]")
        return 0
    resume = flags["resume"]
    cfg = load_config(pipeline.Config, DEMO_FILE)
    out_dir = Path(next((a.split("=", 1)[1] for a in overrides if a.startswith("output_dir=")), cfg.output_dir))
    overrides = [a for a in overrides if not a.startswith("output_dir=")]
    if quick:
        out_dir = out_dir.with_name(out_dir.name + "-quick")
        overrides = quick_overrides(out_dir) + overrides
    cfg.output_dir = str(out_dir)
    data = ROOT / "examples" / "data" / "detox_prompts.jsonl"  # absolute: the demo runs from any folder
    overrides = [f"ppo.data.path={data}", f"eval.data.path={data}"] + overrides
    pipeline.run(cfg, resume=resume, overrides=overrides)
    headline = write_report(out_dir, quick, time.perf_counter() - t0)
    logger.info(f"demo: report in {out_dir / 'report.md'}: mean toxicity {headline['toxicity_mean_before']} -> "
                f"{headline['toxicity_mean_after']} ({headline['mean_improvement_pct']}% lower)")
    print(json.dumps(headline, indent=2))
    return 0
