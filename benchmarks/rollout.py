"""Rollout benchmark: ``generation.backend`` hf vs vllm on the same prompts and sampling config.

    .venv-vllm/bin/python benchmarks/rollout.py [--prompts 16] [--samples 4] [--new-tokens 48] [--lora]
    (CPU: VLLM_CPU_KVCACHE_SPACE=1 OMP_NUM_THREADS=2; on a GPU pass --model and --dtype bfloat16)

For each backend ``--repeats`` rollouts of ``--prompts`` x ``--samples`` responses (``rlhfkit.rollout.rollout``,
the call PPO/GRPO make) are timed, alternating the backends, and the median generated tokens/s
(real response tokens, EOS included) is printed; the vLLM engine is built and filled once before
timing (its build time is printed apart). Then the weight sync: the policy's weights are changed in
place as an optimizer step would (full fine-tuning, or the LoRA adapters with ``--lora``) and the
seconds of the push into the engine are timed per step (``rollout/weight_sync_seconds``).
Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def prompts(n: int) -> list[str]:
    rows = [json.loads(line) for line in (ROOT / "examples/data/detox_prompts.jsonl").read_text().splitlines()]
    return [r["prompt"] for r in rows if r["split"] == "train"][:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="asset:smollm2")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-length", type=int, default=512, help="model.max_length = the engine's max_model_len")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sync-steps", type=int, default=3)
    ap.add_argument("--lora", action="store_true", help="LoRA r16 on all linear layers (merged weights are pushed)")
    args = ap.parse_args()

    import torch

    from rlhfkit.backends import vllm as vbackend
    from rlhfkit.config import GenerationConfig, LoraConfig, ModelConfig, VLLMConfig
    from rlhfkit.data import DataConfig, wrap_prompt
    from rlhfkit.models import load_policy, unwrap
    from rlhfkit.rollout import rollout

    lm, tok = load_policy(ModelConfig(name_or_path=args.model, dtype=args.dtype, max_length=args.max_length),
                          LoraConfig(enabled=True, target_modules=["all-linear"]) if args.lora else None)
    lm.eval()
    texts = [wrap_prompt(p, DataConfig(), tok) for p in prompts(args.prompts) for _ in range(args.samples)]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    base = dict(max_new_tokens=args.new_tokens, temperature=1.0, top_k=0, batch_size=len(ids))
    gens = {"hf": GenerationConfig(**base),
            "vllm": GenerationConfig(**base, backend="vllm",
                                     vllm=VLLMConfig(max_model_len=args.max_length, dtype=args.dtype))}
    t0 = time.perf_counter()
    rollout(lm, tok, texts[:1], ids[:1], gens["vllm"])  # build the engine and push the weights
    build = time.perf_counter() - t0
    rates: dict[str, list[float]] = {"hf": [], "vllm": []}
    for r in range(args.repeats):
        for name in ("hf", "vllm") if r % 2 == 0 else ("vllm", "hf"):
            torch.manual_seed(r)
            t = time.perf_counter()
            exp = rollout(lm, tok, texts, ids, gens[name])
            rates[name].append(sum(exp.response_lengths) / (time.perf_counter() - t))
    hf_model = unwrap(lm)
    syncs = []
    for _ in range(args.sync_steps):
        with torch.no_grad():  # an optimizer step's worth of change
            for n, p in hf_model.named_parameters():
                if p.requires_grad:
                    p.add_(1e-4 * torch.randn_like(p))
        syncs.append(rollout(lm, tok, texts[:1], ids[:1], gens["vllm"]).weight_sync_seconds)
    out = {"model": args.model, "dtype": args.dtype, "lora": args.lora, "responses": len(ids),
           "new_tokens": args.new_tokens, "engine_build_seconds": round(build, 1),
           "hf_tokens_per_second": round(statistics.median(rates["hf"]), 1),
           "vllm_tokens_per_second": round(statistics.median(rates["vllm"]), 1),
           "weight_sync_seconds": round(statistics.median(syncs), 3),
           "device": "cuda" if torch.cuda.is_available() else "cpu"}
    print(f"| backend | tokens/s (median of {args.repeats}) |\n|---|---|")
    print(f"| hf | {out['hf_tokens_per_second']} |\n| vllm | {out['vllm_tokens_per_second']} |")
    print(f"weight sync per step: {out['weight_sync_seconds']} s; engine build {out['engine_build_seconds']} s")
    print(json.dumps(out))
    vbackend.shutdown()


if __name__ == "__main__":
    main()
