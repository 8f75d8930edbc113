"""``rlhfkit demo``: the default job. Detoxify SmolLM2-135M-Instruct with LoRA PPO on a CPU.

It runs the pipeline in ``examples/demo_detox.yaml`` (PPO against alt-profanity-check's
non-toxicity with a KL penalty to the adapter-disabled base, then ``rlhfkit eval`` before/after
on held-out prompts with one fixed, seeded decoding config: the policy's own sampling, 4 answers per
prompt, so the figures measure how each model behaves rather than which way one greedy argmax
happens to fall) and writes ``<output_dir>/report.md``:
the headline figures (mean / std toxicity change in percent, relevance kept, KL), reward and KL
curves of the PPO run, and the evaluation report (histograms, sample table).

``rlhfkit demo --quick`` runs the same pipeline on a tiny GPT-2 built locally, for the tests.
Other arguments are overrides of the pipeline stages (``ppo.train.max_steps=4``).
"""
from __future__ import annotations

import json
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_jsonl(metrics_file) if "reward/mean" in r]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    steps = [r["step"] for r in rows]
    axes[0].plot(steps, [r["reward/mean"] for r in rows], marker="o")
    axes[0].set(title="reward (1 - p(toxic)) per PPO step", xlabel="step")
    axes[1].plot(steps, [r["kl"] for r in rows], marker="o", color="tab:red")
    axes[1].set(title="KL(policy || reference), nats per response", xlabel="step")
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    from rlhfkit.utils import atomic_write_bytes

    atomic_write_bytes(out, buf.getvalue())


def write_report(out_dir: Path, quick: bool) -> dict:
    ppo_dir, eval_dir = out_dir / "ppo", out_dir / "eval"
    plot_curves(ppo_dir / "metrics.jsonl", out_dir / "ppo_curves.png")
    m = json.loads((eval_dir / "metrics.json").read_text())
    ppo_summary = json.loads((ppo_dir / "summary.json").read_text())
    tox = m.get("toxicity_change", {}).get("after", {})
    rel = m.get("semantic_relevance", {})
    kl = m.get("kl", {}).get("after")
    rel_ratio = (rel.get("after") / rel["before"]) if rel.get("before") else None
    headline = {
        "toxicity_mean_before": tox.get("mean_before"), "toxicity_mean_after": tox.get("mean_after"),
        "mean_improvement_pct": tox.get("mean_improvement_pct"), "std_improvement_pct": tox.get("std_improvement_pct"),
        "relevance_before": rel.get("before"), "relevance_after": rel.get("after"), "relevance_ratio": rel_ratio,
        "kl_after_to_before": kl, "ppo_train_seconds": ppo_summary.get("train_seconds"),
        "ppo_steps": ppo_summary.get("steps"), "eval_prompts": m.get("prompts"),
        "eval_samples_per_prompt": m["samples_per_prompt"], "quick": quick,
    }
    fmt = lambda x, d=3: "n/a" if x is None else f"{x:.{d}f}"  # noqa: E731
    eval_report = (eval_dir / "report.md").read_text().replace("](", "](eval/")
    text = f"""# rlhfkit demo: detoxifying {'a tiny GPT-2 (--quick)' if quick else 'SmolLM2-135M-Instruct'} with LoRA PPO

| | before | after | change |
|---|---|---|---|
| mean toxicity (alt-profanity-check) | {fmt(tox.get('mean_before'))} | {fmt(tox.get('mean_after'))} | {fmt(tox.get('mean_improvement_pct'), 1)}% lower |
| std of toxicity | {fmt(tox.get('std_before'))} | {fmt(tox.get('std_after'))} | {fmt(tox.get('std_improvement_pct'), 1)}% lower |
| relevance to source (MiniLM cosine) | {fmt(rel.get('before'))} | {fmt(rel.get('after'))} | x{fmt(rel_ratio, 2)} |
| sampled KL(after \\|\\| before), nats per response | | {fmt(kl)} | |

Held-out: {m.get('prompts')} prompts x {m.get('samples_per_prompt', 1)} answers per model.
PPO: {ppo_summary.get('steps')} steps in {fmt(ppo_summary.get('train_seconds'), 0)} s; curves below.

![PPO reward and KL](ppo_curves.png)

{eval_report}
"""
    atomic_write_text(out_dir / "report.md", text)
    from rlhfkit.utils import atomic_write_json

    atomic_write_json(out_dir / "demo_summary.json", headline)
    return headline


def main(argv: list[str]) -> int:
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
    headline = write_report(out_dir, quick)
    logger.info(f"demo: report in {out_dir / 'report.md'}: mean toxicity {headline['toxicity_mean_before']} -> "
                f"{headline['toxicity_mean_after']} ({headline['mean_improvement_pct']}% lower)")
    print(json.dumps(headline, indent=2))
    return 0
