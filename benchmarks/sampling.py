"""Sampling benchmark: transformers' top-p sampler vs rlhfkit's ``NucleusSampler`` in one ``generate``.

    python benchmarks/sampling.py [--prompts 15] [--samples 4] [--new-tokens 48] [--repeats 3]

The same left-padded batch (``--prompts`` detox prompts x ``--samples`` rows, the demo's eval
batch) is decoded for exactly ``--new-tokens`` tokens at temperature 0.9, top-p 0.95, alternating:
``generate(do_sample=True, temperature, top_p)`` (transformers sorts the vocabulary and draws with
``torch.multinomial`` at every step) and the greedy ``generate`` with ``NucleusSampler`` as its last
logits processor (what ``rlhfkit.rollout`` runs). Everything else (model, cache, batch) is the
same, so the difference is the sampler's. Prints the median seconds of each and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="asset:smollm2")
    ap.add_argument("--prompts", type=int, default=15)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch
    from transformers import LogitsProcessorList

    from rlhfkit.config import ModelConfig
    from rlhfkit.data import DataConfig, wrap_prompt
    from rlhfkit.models import load_policy
    from rlhfkit.generation import NucleusSampler

    lm, tok = load_policy(ModelConfig(name_or_path=args.model, max_length=512))
    lm.eval()
    rows = [json.loads(line) for line in (ROOT / "examples/data/detox_prompts.jsonl").read_text().splitlines()]
    texts = [wrap_prompt(r["prompt"], DataConfig(), tok) for r in rows if r["split"] == "test"][: args.prompts]
    tok.padding_side = "left"
    batch = tok([t for t in texts for _ in range(args.samples)], return_tensors="pt", padding=True,
                add_special_tokens=False)
    common = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=tok.pad_token_id)
    ways = {
        "transformers": dict(do_sample=True, temperature=0.9, top_p=0.95, top_k=0),
        "NucleusSampler": dict(do_sample=False, temperature=None, top_p=None, top_k=None,
                               logits_processor=LogitsProcessorList([NucleusSampler(0.9, 0, 0.95)])),
    }
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    for rep in range(args.repeats):
        for name, kw in ways.items():
            torch.manual_seed(rep)
            t = time.perf_counter()
            with torch.inference_mode():
                lm.generate(**batch, **common, **kw)
            seconds[name].append(time.perf_counter() - t)
    med = {name: statistics.median(v) for name, v in seconds.items()}
    rows_n = batch["input_ids"].shape[0]
    print(f"{rows_n} rows x {args.new_tokens} tokens, temperature 0.9, top-p 0.95, {torch.get_num_threads()} threads")
    for name, v in seconds.items():
        print(f"  {name:15s} median {med[name]:6.2f} s   runs {', '.join(f'{x:.2f}' for x in v)}")
    print(f"  speed-up x{med['transformers'] / med['NucleusSampler']:.2f}")
    print(json.dumps({"rows": rows_n, "new_tokens": args.new_tokens, "median_seconds": med}))


if __name__ == "__main__":
    main()
