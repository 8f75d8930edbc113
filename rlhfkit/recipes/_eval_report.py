"""The report of ``rlhfkit eval``: its plots (matplotlib ``Figure`` with the Agg canvas: no pyplot
state, no display) and ``report.md``, rendered from ``metrics.json``'s dict and the sample rows.
``recipes/evaluate.py`` computes the figures; this module only draws and writes them."""
from __future__ import annotations

import io
import math
import re
from typing import TYPE_CHECKING, Optional

import numpy as np

if TYPE_CHECKING:
    from rlhfkit.recipes.evaluate import Config

# ---------------------------------------------------------------------------------------------
# Plots (matplotlib Figure with the Agg canvas: no pyplot state, no display)
# ---------------------------------------------------------------------------------------------


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def histogram_png(values: dict[str, list[float]], title: str, xlabel: str) -> bytes:
    """Overlaid histograms of every model's per-answer values (the y axis counts answers)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.subplots()
    finite = np.concatenate([np.asarray(v, dtype=float) for v in values.values()])
    edges = np.histogram_bin_edges(finite, bins=20) if finite.size and np.ptp(finite) > 0 else 10
    for name, v in values.items():
        ax.hist(v, bins=edges, alpha=0.5, label=name)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("answers")
    ax.legend()
    return _png(fig)


PROBABILITY_FLOOR = 1e-4  # log-scale CDFs start here (scores below are drawn at the floor)


def cdf_png(scores: dict[str, dict[str, list[float]]], info: dict[str, dict]) -> bytes:
    """One panel per judge: the empirical CDF of every model's scores (share of answers scoring at
    most x). Toxicity probabilities pile up near 0, so their x axis is logarithmic; the threshold is
    a dashed line, and each panel says whether the policy was trained against that judge."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(scores), 3.6))
    axes = np.atleast_1d(fig.subplots(1, len(scores)))
    for ax, (j, per_model) in zip(axes, scores.items()):
        values = [x for v in per_model.values() for x in v]
        binary = all(x in (0.0, 1.0) for x in values)  # the word-list judge: 0 or 1
        prob = info[j]["kind"] != "reward_model" and not binary and all(0 <= x <= 1 for x in values)
        low = max(PROBABILITY_FLOOR, min(values) / 2) if prob else min(values) - 0.05
        for name, v in per_model.items():
            x = np.sort(np.asarray(v, dtype=float))
            if prob:
                x = np.maximum(x, PROBABILITY_FLOOR)
            x = np.concatenate([[low], x])  # the curve starts at share 0
            ax.step(x, np.arange(x.size) / (x.size - 1), where="post", label=name)
        if prob:
            from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

            ax.set_xscale("log")
            ax.set_xlim(low, 1.0)
            short = math.log10(1.0 / low) <= 1.5  # less than two decades: label 1-2-3-5 steps, else decades
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 3.0, 5.0) if short else (1.0,)))
            ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        elif binary:
            ax.set_xlim(-0.05, 1.05)
        ax.axvline(info[j]["threshold"], color="grey", linestyle="--", linewidth=0.8)
        role = "trained against" if info[j]["trained_against"] else "held out"
        ax.set_title(f"{j} ({role})", fontsize=10)
        what = "p(toxic), log scale" if prob else "1 = contains a listed word" if binary else "score"
        ax.set_xlabel(f"{what}; dashed: threshold {info[j]['threshold']:g}")
        ax.set_ylabel("share of answers scoring <= x")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def change_panels(m: dict, jnames: list[str]) -> dict[str, dict[str, dict]]:
    """The change of every model from the baseline, one panel per figure, each value a CI dict
    (``estimate``, ``low``, ``high``)."""
    base = m["baseline"]
    panels = {}
    for j in jnames:
        role = "trained" if m["judges"][j]["trained_against"] else "held out"
        panels[f"{j} ({role}):\nmean change vs {base}, % (+ = better)"] = {
            n: c["mean_improvement_pct"] for n, c in m["judges"][j]["change"].items()}
    panels[f"win rate vs {base}\nunder {m['judge']}"] = m["win_rate_ci"]
    if "perplexity_ratio" in m:
        panels[f"perplexity ratio vs {base}\n(scorer: {m['perplexity_scorer']})"] = m["perplexity_ratio"]
    panels[f"copy rate change vs {base}\n(share of {m['copy_ngram']}-grams)"] = m["copy_rate_change"]
    if "relevance_ratio" in m:
        panels[f"relevance ratio vs {base}\n(copied spans removed)"] = {
            n: r["relevance_uncopied"] for n, r in m["relevance_ratio"].items()}
    return panels


def bars_png(panels: dict[str, dict[str, dict]]) -> bytes:
    """One panel per figure: each model's estimate as a point, its confidence interval as the error
    bar, and a grey line at "no change" (a point plot: ratios and win rates do not start at 0)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.2 * len(panels), 3.6))
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (title, vals) in zip(axes, panels.items()):
        names = list(vals)
        est = np.array([vals[n]["estimate"] for n in names], dtype=float)
        low = np.array([vals[n]["low"] for n in names], dtype=float)
        high = np.array([vals[n]["high"] for n in names], dtype=float)
        err = np.nan_to_num(np.vstack([est - low, high - est]).clip(min=0))  # (2, n)
        for i in range(len(names)):
            ax.errorbar([i], est[i:i + 1], yerr=err[:, i:i + 1], fmt="o", capsize=5, color=f"C{i + 1}")
        if not np.isfinite(est).any():
            ax.text(0.5, 0.5, "undefined\n(the baseline scores 0)", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlim(-0.6, len(names) - 0.4)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.axhline(1.0 if "ratio" in title else 0.5 if title.startswith("win rate") else 0.0,
                   color="grey", linewidth=0.8)  # no change
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _png(fig)


def overoptimisation_png(family: str, curve: dict, m: dict) -> bytes:
    """Every judge's mean (with its CI) against KL to the reference over a run's checkpoints:
    the trained-against judges (proxy) on the left axis, the held-out ones on the right."""
    from matplotlib.figure import Figure

    points = [p for p in curve["points"] if p["kl"] is not None]
    fig = Figure(figsize=(6.8, 4.2))
    left = fig.subplots()
    right = left.twinx()
    kl = [p["kl"] for p in points]
    for i, j in enumerate(m["judges"]):
        ax = left if m["judges"][j]["trained_against"] else right
        mean = np.array([p["judges"][j]["mean"] for p in points])
        err = np.vstack([mean - [p["judges"][j]["low"] for p in points],
                         [p["judges"][j]["high"] for p in points] - mean]).clip(min=0)
        role = "proxy, trained against" if m["judges"][j]["trained_against"] else "held out"
        ax.errorbar(kl, mean, yerr=err, marker="o", capsize=3, color=f"C{i}", label=f"{j} ({role})",
                    linestyle="-" if ax is left else "--")
    for p in points:
        left.annotate(f"{p['step']}", (p["kl"], p["judges"][curve["proxy"]]["mean"] if curve["proxy"] else 0),
                      fontsize=7, textcoords="offset points", xytext=(3, 3))
    left.set_xlabel(f"KL to {m.get('kl_reference')} (nats per answer)")
    left.set_ylabel("trained-against judge (proxy): mean score")
    held = [j for j in m["judges"] if not m["judges"][j]["trained_against"]]
    toxic = all(m["judges"][j]["higher_is"] == "toxic" for j in held)
    right.set_ylabel("held-out judges: mean " + ("p(toxic), lower is better" if toxic else "score"))
    handles = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    labels = left.get_legend_handles_labels()[1] + right.get_legend_handles_labels()[1]
    left.legend(handles, labels, fontsize=8, loc="best")
    left.set_title(f"{family}: judges against KL over checkpoints (labels: step)", fontsize=10)
    fig.tight_layout()
    return _png(fig)


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _cell(text: str, limit: int = 300) -> str:
    """Text for one markdown table cell: shortened, control characters dropped, ``|`` escaped."""
    text = text if len(text) <= limit else text[:limit] + "…"
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", text)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _ci(c: Optional[dict], digits: int = 3) -> str:
    """``estimate [low, high]`` of a CI dict."""
    if not c:
        return "-"
    f = lambda x: "nan" if x is None or not math.isfinite(x) else f"{x:.{digits}g}"  # noqa: E731
    return f"{f(c['estimate'])} [{f(c['low'])}, {f(c['high'])}]"


def render_report(cfg: Config, m: dict, samples: list[dict], images: list[str]) -> str:
    names, base, last = m["models"], m["baseline"], m["models"][-1]
    g = cfg.generation
    decoding = (f"do_sample={g.do_sample}, temperature={g.temperature}, top_k={g.top_k}, top_p={g.top_p}, "
                f"max_new_tokens={g.max_new_tokens}, seed={cfg.seed}")
    if "generated" not in m["completions_from"].values():
        decoding = "none (every model's completions come from the file)"
    per = f" x {m['samples_per_prompt']} answers" if m["samples_per_prompt"] > 1 else ""
    level = f"{100 * m['ci_level']:g}%"
    out = [f"# Evaluation: {' vs '.join(names)}\n",
           f"{m['prompts']} prompts{per} from `{cfg.data.path}`. Decoding: {decoding}. Judge: `{m['judge']}`; "
           f"baseline: `{base}`. Intervals: {level} paired bootstrap over prompts ({m['bootstrap_resamples']} "
           f"resamples, a prompt's answers kept together).\n"]
    if "judges" in m:
        out.append("## Judges\n")
        trained = [j for j, v in m["judges"].items() if v["trained_against"]]
        out.append(f"Trained against: {', '.join(f'`{j}`' for j in trained) or 'none marked'}; held out: "
                   f"{', '.join(f'`{j}`' for j, v in m['judges'].items() if not v['trained_against']) or 'none'}. "
                   "Change = (baseline - model) / baseline of the mean (of the std) in percent for toxicity "
                   "judges, (model - baseline) / |baseline| for higher-is-better ones: positive is better. "
                   "Share = answers scoring above the threshold; its change is in percentage points.\n")
        rows = []
        for j, v in m["judges"].items():
            role = "**trained against**" if v["trained_against"] else "held out"
            for n in names:
                c = v["change"].get(n, {})
                rows.append([j, role, n, v["mean"][n], v["std"][n], f"{100 * v['share_above'][n]:.1f}%",
                             _ci(c.get("mean_improvement_pct")), _ci(c.get("std_improvement_pct")),
                             _ci(c.get("share_above_change_pts"))])
        out.append(_table(["judge", "role", "model", "mean", "std", "share > threshold",
                           f"mean change % [{level} CI]", "std change %", "share change, points"], rows))
    out.append("\n## Models\n")
    header = ["model", "completions"]
    cols: list = []
    for r in m.get("reward_names", []):
        header.append(f"reward {r}")
        cols.append(lambda n, r=r: [m["reward"][n][r]])
    if "rouge" in m:
        header += ["ROUGE-1", "ROUGE-2", "ROUGE-L"]
        cols.append(lambda n: [m["rouge"][n]["rouge1"], m["rouge"][n]["rouge2"], m["rouge"][n]["rougeL"]])
    if "semantic_relevance" in m:
        header += ["relevance", "relevance (copied spans removed)"]
        cols.append(lambda n: [m["semantic_relevance"][n], m["relevance_uncopied"][n]])
    if "perplexity" in m:
        header.append(f"perplexity under {m['perplexity_scorer']}")
        cols.append(lambda n: [m["perplexity"][n]])
    header.append(f"copy rate ({m['copy_ngram']}-grams)")
    cols.append(lambda n: [m["copy_rate"][n]])
    if "cut_at_cap" in m:
        header.append("cut at max_new_tokens")
        cols.append(lambda n: [m["cut_at_cap"].get(n)])
    if "kl" in m:
        header.append(f"KL to {m['kl_reference']} ({m.get('kl_estimator', 'sampled')})")
        cols.append(lambda n: [m["kl"].get(n)])
    header += ["tokens", "words"]
    cols.append(lambda n: [m["length"][n].get("tokens"), m["length"][n]["words"]])
    if len(names) > 1:
        header += [f"win rate vs {base}", "Elo", "Bradley-Terry"]
        cols.append(lambda n: [m["win_rate_vs_baseline"].get(n), m["elo"][n],
                               (m["bradley_terry"] or {}).get(n)])
    rows = [[n, m["completions_from"][n]] + [v for c in cols for v in c(n)] for n in names]
    out.append(_table(header, rows))
    out.append("\nCopy rate: share of an answer's word n-grams found verbatim in its prompt. Relevance (copied "
               "spans removed): MiniLM cosine to the source of the answer without the words of those n-grams "
               "(0 when nothing is left), so quoting the source earns nothing. Perplexity: exp of the mean token "
               "NLL of every answer under one fixed scorer model.\n")
    if len(names) > 1:
        out.append(f"\n## Changes vs {base} ({level} CI)\n")
        ch_header = ["model", f"win rate under {m['judge']}"]
        ch_cols: list = [lambda n: [_ci(m["win_rate_ci"][n])]]
        if "perplexity_ratio" in m:
            ch_header.append("perplexity ratio")
            ch_cols.append(lambda n: [_ci(m["perplexity_ratio"][n])])
        ch_header.append("copy rate change")
        ch_cols.append(lambda n: [_ci(m["copy_rate_change"][n])])
        if "relevance_ratio" in m:
            ch_header += ["relevance ratio", "relevance ratio (copied removed)"]
            ch_cols.append(lambda n: [_ci(m["relevance_ratio"][n]["semantic_relevance"]),
                                      _ci(m["relevance_ratio"][n]["relevance_uncopied"])])
        for w in m.get("win_rate_by", {}):
            ch_header.append(f"win rate under {w}")
            ch_cols.append(lambda n, w=w: [_ci(m["win_rate_by"][w][n])])
        if "cut_at_cap_change" in m:
            ch_header.append("cut-at-cap share change")
            ch_cols.append(lambda n: [_ci(m["cut_at_cap_change"].get(n))])
        for r in m.get("reward_names", []):
            ch_header.append(f"reward {r} change")
            ch_cols.append(lambda n, r=r: [_ci(m["reward_change"][n][r])])
        for t in ("rouge1", "rouge2", "rougeL", "rouge_avg") if "rouge" in m else ():
            ch_header.append(f"{t} change")
            ch_cols.append(lambda n, t=t: [_ci(m["rouge_change"][n][t])])
        out.append(_table(ch_header, [[n] + [v for c in ch_cols for v in c(n)] for n in names[1:]]))
    for family, curve in m.get("checkpoint_curves", {}).items():
        out.append(f"\n## Over-optimisation: `{family}` over its checkpoints\n")
        js = list(m["judges"])
        out.append(_table(["model", "step", f"KL to {m.get('kl_reference')}"] + [
            f"{j} ({'proxy' if m['judges'][j]['trained_against'] else 'held out'})" for j in js],
            [[p["model"], p["step"], p["kl"]] + [_ci({"estimate": p["judges"][j]["mean"], "low": p["judges"][j]["low"],
                                                      "high": p["judges"][j]["high"]}) for j in js]
             for p in curve["points"]]))
        if curve["best"]:
            out.append(f"\nBest checkpoint by the proxy (`{curve['proxy']}`, on these held-out prompts): "
                       f"`{curve['best']}`; its changes vs `{base}` are in the tables above.\n")
    if len(names) > 1:
        out.append(f"\n## Win rates under `{m['judge']}` (row beats column; ties count one half)\n")
        out.append(_table(["model"] + names, [[a] + [m["win_rate"][a].get(b) for b in names] for a in names]))
        if m.get("bradley_terry_note"):
            out.append(f"\nBradley-Terry: {m['bradley_terry_note']}\n")
    if images:
        out.append("\n## Plots\n")
        out += [f"![{p}]({p})\n" for p in images]
    if len(names) > 1 and samples:
        k = cfg.report_samples
        shown = samples if len(samples) <= k else samples[: (k + 1) // 2] + [None] + samples[len(samples) - k // 2:]
        out.append(f"\n## Samples sorted by gain ({m['judge']}: {last} - {base}), largest first\n")
        header = ["#", "prompt", base, last, f"reward {base}", f"reward {last}", "gain"]
        trows = []
        for s in shown:
            if s is None:
                trows.append(["…"] * len(header))
                continue
            number = f"{s['index'] + 1}" + (f".{s['sample'] + 1}" if "sample" in s else "")  # prompt.sample
            trows.append([number, _cell(s["prompt"]), _cell(s["completions"][base]),
                          _cell(s["completions"][last]), s["rewards"][base], s["rewards"][last], s["gain"]])
        out.append(_table(header, trows))
    return "\n".join(out)
