"""Memory of SmolLM2-135M-Instruct (``asset:smollm2``) for training: full fp32, fp32 + LoRA, 4-bit + LoRA
(QLoRA), and per rank under FSDP with 2 processes.

Each setting runs in its own process (so peak RSS is its own): load the model as the recipes do
(``rlhfkit.models.load_policy``), build the Engine's AdamW over the trainable parameters, run one
forward/backward/optimizer step on a batch of 4 x 128 tokens, and measure, from the tensors
themselves:

- parameters: the bytes of every parameter as stored (4-bit weights: two per byte);
- quant state: bitsandbytes' per-block scales and code tables of the 4-bit weights;
- buffers: non-parameter tensors (rotary tables);
- gradients: the bytes of the gradients after the backward pass;
- optimizer: AdamW's state (two moments per trainable parameter, and its step counters);
- RSS after the step: the process's resident set then, after glibc's ``malloc_trim`` has returned
  freed heap (the loading's fp32 read, for one) to the system; libraries included;
- peak RSS: its peak (loading included: transformers reads the fp32 checkpoint before quantising).

LoRA: r 16, alpha 32, the attention projections (``target_modules: auto``), as the shipped examples.

    python benchmarks/memory.py                    # the three single-process rows
    python benchmarks/memory.py --fsdp             # also FSDP, 2 processes (needs train.strategy=fsdp)

FSDP: the per-rank row runs ``torchrun --nproc_per_node 2`` on this script with the Engine's
``train.strategy=fsdp`` and counts each rank's local shards (``DTensor.to_local()``). Where this
rlhfkit has no ``train.strategy`` the row prints ``not run`` with that reason.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = {
    "fp32 full": dict(lora=False, bits=None),
    "fp32 + LoRA": dict(lora=True, bits=None),
    "4-bit NF4 + LoRA": dict(lora=True, bits=4),
}
BATCH, SEQ = 4, 128


def tensor_bytes(t) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t  # an FSDP2 shard (DTensor): this rank's part
    return t.numel() * t.element_size()


def measure(setting: str, strategy: str = "auto") -> dict:
    import torch

    from rlhfkit.config import LoraConfig, ModelConfig, TrainConfig
    from rlhfkit.engine import make_adamw
    from rlhfkit.models import load_policy
    from rlhfkit.policy import PolicyModel
    from rlhfkit.utils import peak_rss_mb, seed_everything

    spec = SETTINGS[setting]
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    seed_everything(0)
    mcfg = ModelConfig(name_or_path="asset:smollm2", dtype="float32", load_in_4bit=spec["bits"] == 4)
    lm, tok = load_policy(mcfg, LoraConfig(enabled=spec["lora"], dropout=0.0), torch.device("cpu"))
    model = PolicyModel(lm)
    tcfg = TrainConfig(lr=1e-5, cpu=True)
    engine = None
    if strategy == "fsdp":
        from rlhfkit.engine import Engine

        tcfg = dataclasses.replace(tcfg, strategy="fsdp", output_dir=os.environ["MEMORY_OUT"], progress=False,
                                   max_steps=1, save_model=False)
        engine = Engine(tcfg, "sft", tcfg, model, total_steps=1)  # an SFT step: a recipe FSDP serves
        model, optimizer = engine.model, engine.optimizer
    else:
        optimizer = make_adamw([p for p in model.parameters() if p.requires_grad], tcfg)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, tok.vocab_size, (BATCH, SEQ), generator=gen)  # (B, T)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    def loss_fn(m, b):
        out = m(**b)
        return -(out["logps"] * out["mask"]).sum() / out["mask"].sum(), {}

    if engine is not None:
        engine.step(loss_fn, [batch])
        grads = 0  # the Engine frees them in its step; FSDP's are sharded like the parameters
    else:
        loss, _ = loss_fn(model, batch)
        loss.backward()
        grads = sum(tensor_bytes(p.grad) for p in model.parameters() if p.grad is not None)
        optimizer.step()
    params = {id(p): p for p in model.parameters()}
    quant = 0
    for m in model.modules():
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is not None:
            quant += sum(tensor_bytes(t) for t in qs.as_dict(packed=True).values() if torch.is_tensor(t))
    opt = sum(tensor_bytes(v) for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v))
    return {
        "setting": setting + (" (FSDP, per rank)" if strategy == "fsdp" else ""),
        "parameters": sum(tensor_bytes(p) for p in params.values()),
        "trainable": sum(p.numel() for p in params.values() if p.requires_grad),
        "quant_state": quant,
        "buffers": sum(tensor_bytes(b) for b in model.buffers()),
        "gradients": grads,
        "optimizer": opt,
        "rss_mb": round(rss_mb(), 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def rss_mb() -> float:
    """Current resident set size of this process in MiB, after returning freed heap to the system."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def table(rows: list[dict]) -> str:
    head = ("| setting | trainable params | parameters MiB | quant state MiB | buffers MiB | gradients MiB | "
            "AdamW state MiB | model + optimizer MiB | RSS after step MiB | peak RSS MiB |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        total = r["parameters"] + r["quant_state"] + r["buffers"] + r["gradients"] + r["optimizer"]
        lines.append(f"| {r['setting']} | {r['trainable']:,} | {mib(r['parameters'])} | {mib(r['quant_state'])} | "
                     f"{mib(r['buffers'])} | {mib(r['gradients'])} | {mib(r['optimizer'])} | {mib(total)} | "
                     f"{r['rss_mb']:,.1f} | {r['peak_rss_mb']:,.1f} |")
    return "\n".join(lines)


def fsdp_rows() -> tuple[list[dict], str]:
    """Per-rank figures of 'fp32 full' and 'fp32 + LoRA' under FSDP (2 processes), or a reason."""
    from rlhfkit.config import TrainConfig

    if "strategy" not in {f.name for f in dataclasses.fields(TrainConfig)}:
        return [], "not run: this rlhfkit has no train.strategy (FSDP2 lands with train.strategy=fsdp)"
    import tempfile

    rows = []
    for setting in ("fp32 full", "fp32 + LoRA"):
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "MEMORY_OUT": tmp}
            p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", __file__,
                                "--worker", setting, "--strategy", "fsdp"], env=env, capture_output=True, text=True)
            if p.returncode != 0:
                last = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}"
                return rows, f"failed ({setting}): {last}"
            rows += [json.loads(line[len("RESULT "):]) for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    return rows, ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fsdp", action="store_true", help="also measure FSDP with 2 processes (per rank)")
    ap.add_argument("--out", help="also write the table to this markdown file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--strategy", default="auto", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        result = measure(args.worker, args.strategy)
        rank = int(os.environ.get("RANK", "0"))
        result["setting"] += f" rank {rank}" if args.strategy == "fsdp" else ""
        print("RESULT " + json.dumps(result), flush=True)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = []
    for setting in SETTINGS:
        p = subprocess.run([sys.executable, __file__, "--worker", setting], capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"{setting}: {p.stderr[-2000:]}")
        rows += [json.loads(line[len("RESULT "):]) for line in p.stdout.splitlines() if line.startswith("RESULT ")]
        print(f"measured {setting}", file=sys.stderr, flush=True)
    note = "FSDP (2 processes, per rank): " + ("not asked (--fsdp)" if not args.fsdp else "")
    if args.fsdp:
        extra, reason = fsdp_rows()
        rows += extra
        note += reason or "measured"
    text = (f"SmolLM2-135M-Instruct, one AdamW step on {BATCH} x {SEQ} tokens, CPU, fp32 compute\n\n"
            f"{table(rows)}\n\n{note}\n")
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
