"""PPO benchmark: SmolLM2-135M-Instruct + LoRA on this machine's CPU.

    python benchmarks/ppo.py [--steps 3] [--batch 32] [--minibatch 16] [--new-tokens 32]

Prints episodes/s, tokens/s, the time split of a PPO iteration (generation / scoring /
reference + value forward / update), peak RSS, and two ratios with their targets:
- generation inside PPO vs a bare ``model.generate`` on the same batch and config (<= 1.25x);
- peak RSS of PPO with the adapter-disabled reference vs the policy alone doing the same
  training steps without any reference or rollout (<= 1.3x). Each is measured in its own
  process, since peak RSS only grows.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def prompts(n: int) -> list[str]:
    rows = [json.loads(l) for l in (ROOT / "examples/data/detox_prompts.jsonl").read_text().splitlines()]
    return [r["prompt"] for r in rows if r["split"] == "train"][:n]


def child_policy_alone(args) -> dict:
    """Peak RSS of the LoRA policy doing forward/backward/AdamW on rollout-sized batches."""
    import torch

    from rlhfkit.config import LoraConfig, ModelConfig
    from rlhfkit.data import Example, collate, encode_prompt
    from rlhfkit.models import disable_dropout, load_policy
    from rlhfkit.policy import PolicyModel
    from rlhfkit.rollout import take_rows
    from rlhfkit.utils import peak_rss_mb

    lm, tok = load_policy(ModelConfig(name_or_path="asset:smollm2", max_length=256), LoraConfig(enabled=True, r=16, dropout=0.0, target_modules=["all-linear"]))
    disable_dropout(lm)
    policy = PolicyModel(lm, value_head=True)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-5)
    ids = [encode_prompt(tok, tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True), False)[-160:]
           for p in prompts(args.batch)]
    batch = collate([Example(p, [tok.eos_token_id] * args.new_tokens) for p in ids], tok.pad_token_id, False)
    for _ in range(args.steps):
        for mb in range(0, args.batch, args.minibatch):
            # the same micro-batch shape as PPO's update: rows without their common padding
            sl = take_rows(batch, torch.arange(mb, min(mb + args.minibatch, args.batch)), False)
            out = policy(**sl)
            ((out["logps"] * out["mask"]).sum() + out["values"].sum()).backward()
            opt.step()
            opt.zero_grad()
    return {"peak_rss_mb": peak_rss_mb()}


def child_bare_generate(args) -> dict:
    import torch

    from rlhfkit.config import GenerationConfig, LoraConfig, ModelConfig
    from rlhfkit.data import encode_prompt
    from rlhfkit.models import load_policy
    from rlhfkit.generation import generate_ids

    lm, tok = load_policy(ModelConfig(name_or_path="asset:smollm2", max_length=256), LoraConfig(enabled=True, r=16, dropout=0.0, target_modules=["all-linear"]))
    gen = GenerationConfig(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, temperature=0.9, top_p=0.95, top_k=0)
    ids = [encode_prompt(tok, tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True), False)[-160:]
           for p in prompts(args.batch)]
    times = []
    for _ in range(args.steps):
        torch.manual_seed(0)
        t = time.perf_counter()
        generate_ids(lm, tok, ids, gen)
        times.append(time.perf_counter() - t)
    # the plain transformers call on the same batch, for reference (no rlhfkit code in the loop)
    from rlhfkit.data import Example, collate
    from rlhfkit.generation import generation_kwargs
    b = collate([Example(p, []) for p in ids], tok.pad_token_id, False)
    plain = []
    for _ in range(args.steps):
        t = time.perf_counter()
        with torch.no_grad():
            lm.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"], **generation_kwargs(gen, tok))
        plain.append(time.perf_counter() - t)
    return {"generate_seconds": sorted(times)[len(times) // 2], "plain_generate_seconds": sorted(plain)[len(plain) // 2]}


def child_ppo(args) -> dict:
    from rlhfkit.config import load_config
    from rlhfkit.recipes import ppo, pipeline

    pcfg = load_config(pipeline.Config, ROOT / "examples/demo_detox.yaml")
    out = tempfile.mkdtemp()
    cfg, _ = pipeline.stage_config(pcfg.stages[0], out, {}, [
        f"data.path={ROOT / 'examples/data/detox_prompts.jsonl'}", f"train.max_steps={args.steps}",
        f"rollout_batch_size={args.batch}", f"train.batch_size={args.minibatch}", "ppo_epochs=1",
        f"generation.batch_size={args.batch}", f"generation.max_new_tokens={args.new_tokens}",
        f"generation.min_new_tokens={args.new_tokens}", "train.checkpoint_every=0", "train.progress=false",
        "train.save_model=false"])
    s = ppo.run(cfg)
    rows = [json.loads(l) for l in Path(out, "ppo", "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time/generate" in r]
    med = lambda k: sorted(r[k] for r in rows)[len(rows) // 2]  # noqa: E731
    return {"peak_rss_mb": s["peak_rss_mb"], "train_seconds": s["train_seconds"], "tokens": s["tokens"],
            "episodes": args.steps * args.batch, **{k: med(k) for k in ("time/generate", "time/reward",
                                                                         "time/reference_value", "time/update")}}


def run_child(name: str, args) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, __file__, "--child", name, "--steps", str(args.steps), "--batch", str(args.batch),
           "--new-tokens", str(args.new_tokens), "--minibatch", str(args.minibatch)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{name} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--minibatch", type=int, default=16, help="PPO minibatch (rows per optimizer update)")
    ap.add_argument("--child")
    args = ap.parse_args()
    if args.child:
        fn = {"alone": child_policy_alone, "bare": child_bare_generate, "ppo": child_ppo}[args.child]
        print(json.dumps(fn(args)))
        return
    alone, bare, ppo_r = run_child("alone", args), run_child("bare", args), run_child("ppo", args)
    total = ppo_r["time/generate"] + ppo_r["time/reward"] + ppo_r["time/reference_value"] + ppo_r["time/update"]
    gen_ratio = ppo_r["time/generate"] / bare["plain_generate_seconds"]
    rss_ratio = ppo_r["peak_rss_mb"] / alone["peak_rss_mb"]
    print(f"SmolLM2-135M-Instruct LoRA PPO, CPU ({os.cpu_count()} cores), batch {args.batch} x {args.new_tokens} new tokens, {args.steps} iterations")
    print(f"  episodes/s            {args.batch / total:.3f}")
    print(f"  tokens/s (training)   {ppo_r['tokens'] / ppo_r['train_seconds']:.1f}")
    print(f"  iteration split (median s): generate {ppo_r['time/generate']:.2f} | score {ppo_r['time/reward']:.2f} | "
          f"reference+value fwd {ppo_r['time/reference_value']:.2f} | update {ppo_r['time/update']:.2f}")
    print(f"  generation in PPO / bare model.generate: {ppo_r['time/generate']:.2f} / {bare['plain_generate_seconds']:.2f} s = {gen_ratio:.2f}x (target <= 1.25x)")
    print(f"  peak RSS: PPO {ppo_r['peak_rss_mb']:.0f} MB, policy alone {alone['peak_rss_mb']:.0f} MB = {rss_ratio:.2f}x (target <= 1.3x)")
    print(json.dumps({"episodes_per_s": args.batch / total, "gen_ratio": gen_ratio, "rss_ratio": rss_ratio, **ppo_r,
                      "bare_generate_s": bare["plain_generate_seconds"], "alone_rss_mb": alone["peak_rss_mb"]}))


if __name__ == "__main__":
    main()
