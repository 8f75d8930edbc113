"""rlhfkit against TRL 1.16, side by side: tokens per second of each training recipe on the same
tiny Llama, the same tokenizer, the same data and the same hyperparameters, in one process,
alternating the two libraries row by row.

Set-up (both libraries): a Llama built with ``rlhfkit.tiny`` (hidden 256, 4 layers, 4 heads,
intermediate 1,024, 4,096-token byte-level BPE, about 6.3M parameters), saved with
``save_pretrained`` and loaded by path by both (TRL reloads its reference model from that path);
synthetic rows from the bundled English word list with lengths spread up to 128 tokens (so
batches carry real padding); batch 8, fp32, AdamW, constant learning rate, gradient clipping at
1.0, ``--threads`` (2) torch threads, ``--warmup`` (3) warm-up steps then ``--steps`` (20)
measured steps. rlhfkit runs its own recipes exactly as ``rlhfkit <command> key=value ...`` does
(``load_config`` + ``run``; the command of each row is printed); TRL runs its trainers configured
as NOTES.md says is its best on this CPU: ``bf16=False``, ``gradient_checkpointing=False``,
``use_cpu=True``, ``report_to="none"``, no evaluation, no saving, no logging, no progress bar,
its default fused AdamW. Each library keeps its default batch order: rlhfkit groups rows of
similar length (``train.group_by_length``), TRL samples at random (KTO: in order).
``--trl-group-by-length`` gives TRL's SFT row length-grouped batches too; its other trainers
cannot infer lengths for ``train_sampling_strategy="group_by_length"`` (no ``input_ids`` column).

Tokens per second (the same rule for both): real (non-pad) tokens of the sequences that the
training forward passes back-propagate through, i.e. the sum of the attention masks of the
trained batch (prompt + completion tokens; DPO and reward: chosen + rejected rows; KTO: the
rows, not their mismatched KL pairs; GRPO/RLOO: prompt + sampled completion up to and including
EOS), divided by the wall-clock time of the measured steps (``--clock cpu``: this process's CPU
time, for a busy machine, with ``--threads 1``). The time is the whole step, from the end of one
optimizer step to the end of the next: data collation, reference forwards (DPO, KTO, RLOO), and
for GRPO/RLOO generation and reward scoring included, for both libraries.

Proof of the same work: for each row both libraries compute the loss of their first step on the
same 8 data rows from the same initial weights (SFT: completion NLL; reward: pairwise
-log s(r_c - r_r), TRL's score head set to rlhfkit's initial value head; DPO: log 2 with policy
= reference, plus the mean chosen log-prob; KTO: 0.5 with policy = reference, plus the mean
desirable log-prob). GRPO/RLOO sample their completions, so their losses cannot agree.

``--part mfu``: SmolLM2-135M-Instruct (``asset:smollm2``) full DPO with rlhfkit and a frozen
reference copy, a few steps: model FLOP utilisation against this machine's fp32 matmul peak (best
of several 2,048 x 2,048 ``torch.matmul`` at ``--threads``), see :func:`model_flops_per_token`
and :func:`mfu`. MFU counts the FLOPs of every chosen and rejected token (the table's tokens);
rlhfkit computes a pair's shared prompt once, so HFU, over the tokens its forward actually runs
(:func:`computed_tokens`), is the hardware's share.

    pip install -e '.[bench]'                     # TRL 1.16 (optional extra, benchmark only)
    python benchmarks/vs_trl.py                   # the tiny-model table (~3.5 min on 2 quiet cores)
    python benchmarks/vs_trl.py --repeats 3 --out benchmarks/results/vs_trl.md
    python benchmarks/vs_trl.py --part mfu        # SmolLM2-135M DPO model FLOP utilisation
    python benchmarks/vs_trl.py --rows dpo,kto --repeats 1
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROWS = ["sft", "reward", "dpo", "dpo_lora", "kto", "grpo", "rloo"]
TITLES = {"sft": "SFT", "reward": "Reward model", "dpo": "DPO (separate reference)",
          "dpo_lora": "DPO + LoRA (adapter-disabled reference)", "kto": "KTO", "grpo": "GRPO", "rloo": "RLOO"}
COMMANDS = {"sft": "sft", "reward": "reward", "dpo": "dpo", "dpo_lora": "dpo", "kto": "kto", "grpo": "grpo",
            "rloo": "rloo"}
TARGET = 1.5
BATCH = 8
MAX_LENGTH = 128
MAX_NEW_TOKENS = 64
GROUP = 4
LR = 1e-5
LORA = dict(r=16, alpha=32, dropout=0.05, targets=["q_proj", "v_proj"])
LLAMA = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=256, initializer_range=0.02)


# ---------------------------------------------------------------------------------------------
# Pure helpers (no TRL; unit-tested in tests/test_bench.py)
# ---------------------------------------------------------------------------------------------


def real_tokens(batch: dict) -> int:
    """The token rule of this benchmark: the sum of the attention masks of a trained batch.

    ``attention_mask`` counts every real prompt and completion token of the rows the training
    forward back-propagates through; batches that keep prompt and completion apart
    (``prompt_mask`` + ``completion_mask``, TRL's GRPO/RLOO) count both. Nested dicts (rlhfkit
    KTO's ``kl`` pairs) and ``KL_attention_mask`` (TRL KTO's) are no-grad passes: not counted.
    """
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    if "prompt_mask" in batch and "completion_mask" in batch:
        return int(batch["prompt_mask"].sum()) + int(batch["completion_mask"].sum())
    raise KeyError(f"no attention mask in the batch (keys: {sorted(batch)})")


def measured_rate(clock: list[tuple[float, int]], warmup: int) -> tuple[float, int, float]:
    """(tokens per second, tokens, seconds) over the steps after ``warmup``.

    ``clock[i]`` = (time at the end of step i + 1, cumulative tokens then); the measured window
    runs from the end of warm-up step ``warmup`` to the end of the last step.
    """
    if len(clock) <= warmup or warmup < 1:
        raise ValueError(f"need more than {warmup} steps (and warmup >= 1), got {len(clock)}")
    (t0, n0), (t1, n1) = clock[warmup - 1], clock[-1]
    return (n1 - n0) / (t1 - t0), n1 - n0, t1 - t0


def model_flops_per_token(n_params: int, n_layers: int, d_attn: int, context: float) -> float:
    """Forward FLOPs per token: 2 N for the weight matmuls plus 4 L d c for attention.

    ``n_params``: parameters that take part in matmuls (the input embedding is a lookup and is
    left out; a tied LM head counts once); ``d_attn`` = heads x head_dim; ``context`` = mean
    number of positions a token attends to ((T + 1) / 2 for a causal row of T tokens).
    QK^T and AV cost 2 d c each. The training step is 3x (backward = 2x forward).
    """
    return 2.0 * n_params + 4.0 * n_layers * d_attn * context


def mfu(train_tps: float, ref_tps: float, fwd_flops_per_token: float, peak_flops: float) -> float:
    """Model FLOP utilisation: (3 F train tokens/s + F reference tokens/s) / peak."""
    return (3.0 * fwd_flops_per_token * train_tps + fwd_flops_per_token * ref_tps) / peak_flops


def verdict(ratio: float, target: float = TARGET) -> str:
    return f"meets {target:g}x" if ratio >= target else f"below {target:g}x"


def median_ratio(ours: list[float], theirs: list[float]) -> float:
    """Ratio of the medians."""
    return statistics.median(ours) / statistics.median(theirs)


def format_table(results: list[dict], load: str) -> str:
    lines = [
        "| row | rlhfkit tok/s | TRL tok/s | ratio | step-0 loss rlhfkit | step-0 loss TRL | |diff| | verdict |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        ours, theirs = r["rlhfkit"], r["trl"]
        ratio = median_ratio(ours, theirs)
        l0, l1 = r.get("loss_rlhfkit"), r.get("loss_trl")
        if l0 is None or l1 is None:
            loss_cells = [r.get("loss_note", "-"), "-", "-"]
        else:
            loss_cells = [f"{l0:.5f}", f"{l1:.5f}", f"{abs(l0 - l1):.1e}"]
        lines.append(f"| {TITLES[r['row']]} | {statistics.median(ours):,.0f} | {statistics.median(theirs):,.0f} | "
                     f"{ratio:.2f}x | " + " | ".join(loss_cells) + f" | {verdict(ratio)} |")
    lines.append("")
    lines.append(f"Medians of {len(results[0]['rlhfkit']) if results else 0} alternating run(s) per library; "
                 f"load average {load}.")
    return "\n".join(lines)


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
NOW = CLOCKS["wall"]


def now() -> float:
    """The benchmark's clock: wall time, or with ``--clock cpu`` this process's CPU time (robust on a
    busy machine; with ``--threads 1`` it approximates the wall time of a quiet one)."""
    return NOW()


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ---------------------------------------------------------------------------------------------
# The model and the data
# ---------------------------------------------------------------------------------------------


def word_list() -> list[str]:
    return (ROOT / "rlhfkit" / "resources" / "words.txt").read_text(encoding="ascii").split()


def build_model(folder: Path, seed: int = 0) -> str:
    """The tiny Llama and its 4,096-token BPE (trained on random words), saved once."""
    from rlhfkit.tiny import build_model as build, build_tokenizer

    if (folder / "config.json").is_file():
        return str(folder)
    words = word_list()
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(20000)]
    tok = build_tokenizer(vocab_size=4096, texts=texts)
    tok.model_max_length = MAX_LENGTH
    model = build("llama", len(tok), seed, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id, **LLAMA)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return str(folder)


def make_data(folder: Path, model_dir: str, n: int = 256, seed: int = 0) -> dict[str, str]:
    """jsonl files for every row: lengths spread so a batch has real padding, every sequence
    (prompt + completion + EOS) at most 128 tokens, GRPO prompts at most 128 - 64 tokens.

    Prompts end in ':' and completions start with a space, so tokenizing the prompt and the
    completion apart (rlhfkit) or together (TRL) gives the same ids.
    """
    from transformers import AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(model_dir)
    words = word_list()
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))

    def n_tok(s: str) -> int:
        return len(tok(s)["input_ids"])

    def fits(prompt: str, *completions: str, limit: int = MAX_LENGTH) -> bool:
        return all(n_tok(prompt + c) + 1 <= limit for c in completions)

    sft, prefs, kto, prompts = [], [], [], []
    while len(sft) < n:
        p, c = f"Summarize: {text(2, 30)}\nSummary:", " " + text(2, 25) + "."
        if fits(p, c):
            sft.append({"prompt": p, "completion": c})
    while len(prefs) < n:
        p, c, r = f"Question: {text(2, 24)}\nAnswer:", " " + text(2, 18) + ".", " " + text(2, 18) + "."
        if c != r and fits(p, c, r):
            prefs.append({"prompt": p, "chosen": c, "rejected": r})
    while len(kto) < n:
        p, c = f"Question: {text(2, 24)}\nAnswer:", " " + text(2, 24) + "."
        if fits(p, c):
            kto.append({"prompt": p, "completion": c, "label": len(kto) % 2 == 0})
    while len(prompts) < n:
        p = f"Write about {text(2, 20)}:"
        if n_tok(p) <= MAX_LENGTH - MAX_NEW_TOKENS:
            prompts.append({"prompt": p})
    files = {}
    for name, rows in (("sft", sft), ("prefs", prefs), ("kto", kto), ("prompts", prompts)):
        files[name] = str(folder / f"{name}.jsonl")
        Path(files[name]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return files


def read_rows(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def reward_fn(prompts, completions, **kwargs) -> list[float]:
    """The GRPO/RLOO reward of both libraries: fraction of distinct words in the completion."""
    out = []
    for c in completions:
        w = str(c).split()
        out.append(len(set(w)) / len(w) if w else 0.0)
    return out


# ---------------------------------------------------------------------------------------------
# rlhfkit: the recipes' own run(), clocked at every Engine.end_step
# ---------------------------------------------------------------------------------------------


def rlhfkit_overrides(row: str, model: str, files: dict[str, str], out: str, steps: int) -> list[str]:
    """The ``key=value`` overrides of ``rlhfkit <command>`` for ``row`` (no YAML file needed)."""
    common = [f"model.name_or_path={model}", f"model.max_length={MAX_LENGTH}", f"train.output_dir={out}",
              f"train.batch_size={BATCH}", f"train.max_steps={steps}", f"train.lr={LR}", "train.precision=fp32",
              "train.cpu=true", "train.save_model=false", "train.progress=false", "data.eval_fraction=0"]
    lora = ["lora.enabled=true", f"lora.r={LORA['r']}", f"lora.alpha={LORA['alpha']}",
            f"lora.dropout={LORA['dropout']}", f"lora.target_modules=[{','.join(LORA['targets'])}]"]
    if row == "sft":
        return common + [f"data.path={files['sft']}"]
    if row == "reward":
        return common + [f"data.path={files['prefs']}", "head=value_head"]
    if row == "dpo":
        return common + [f"data.path={files['prefs']}", "beta=0.1", "reference.kind=copy"]
    if row == "dpo_lora":
        return common + [f"data.path={files['prefs']}", "beta=0.1", "reference.kind=disabled_adapter"] + lora
    if row == "kto":
        return common + [f"data.path={files['kto']}", "beta=0.1", "reference.kind=copy"]
    if row in ("grpo", "rloo"):
        beta = 0.0 if row == "grpo" else 0.05
        return common + [f"data.path={files['prompts']}", f"prompts_per_step={BATCH // GROUP}",
                         f"samples_per_prompt={GROUP}", f"kl_coef={beta}", f"generation.max_new_tokens={MAX_NEW_TOKENS}",
                         f"generation.batch_size={BATCH}", "generation.do_sample=true", "generation.temperature=1.0",
                         "generation.top_k=0", "generation.top_p=1.0", "eval.max_rows=0"]
    raise ValueError(row)


def rlhfkit_config(row: str, model: str, files: dict[str, str], out: str, steps: int):
    import importlib

    from rlhfkit.cli import COMMANDS as CLI
    from rlhfkit.config import load_config

    module_name, preset = CLI[COMMANDS[row]]
    module = importlib.import_module(module_name)
    return module, load_config(module.Config, None, preset + rlhfkit_overrides(row, model, files, out, steps))


@contextlib.contextmanager
def engine_clock(clock: list[tuple[float, int]]):
    """Record (time, cumulative tokens) at every ``Engine.end_step`` (the end of each step)."""
    from rlhfkit.engine import Engine

    original = Engine.end_step

    def end_step(self, metrics, extra_seconds: float = 0.0, **kwargs):
        clock.append((now(), self.tokens))
        return original(self, metrics, extra_seconds, **kwargs)

    Engine.end_step = end_step
    try:
        yield
    finally:
        Engine.end_step = original


def run_rlhfkit(row: str, model: str, files: dict[str, str], work: Path, steps: int) -> list[tuple[float, int]]:
    module, cfg = rlhfkit_config(row, model, files, str(work / f"rlhfkit-{row}"), steps)
    clock: list[tuple[float, int]] = []
    with engine_clock(clock):
        if row in ("grpo", "rloo"):
            module.run(cfg, reward_fn=reward_fn)
        else:
            module.run(cfg)
    return clock


def rlhfkit_step0(row: str, model: str, files: dict[str, str], work: Path) -> dict:
    """rlhfkit's loss (and a log-prob check) on the first 8 rows, before any update."""
    import torch

    from rlhfkit import data as D
    from rlhfkit.models import load_policy
    from rlhfkit.policy import PolicyModel, build_reference
    from rlhfkit.utils import seed_everything

    module, cfg = rlhfkit_config(row, model, files, str(work / f"rlhfkit-step0-{row}"), 1)
    idx = list(range(BATCH))
    if row == "reward":
        from rlhfkit.recipes import reward as R

        seed_everything(cfg.train.seed)
        net, tok = R.build_net(cfg, "value_head", torch.device("cpu"))
        table, _ = D.load_splits(cfg.data)
        pairs = R.tokenize(R.pair_texts(table, cfg, tok, D.DataStats()), tok, cfg, True, D.DataStats())
        batch = R.collate_pairs([pairs[i] for i in idx], tok.pad_token_id, False)
        with torch.no_grad():
            loss, _ = R.reward_loss(net, batch)
        head = net.value_head.summary.weight.detach().clone()
        return {"loss": float(loss), "head": head, "tokens": real_tokens(batch)}
    seed_everything(cfg.train.seed)
    lm, tok = load_policy(cfg.model, cfg.lora)
    policy = PolicyModel(lm)
    table, _ = D.load_splits(cfg.data)
    out: dict = {}
    with torch.no_grad():
        if row == "sft":
            ex = D.tokenize_pairs(D.sft_examples(table, cfg.data, tok, D.DataStats()), tok, cfg.data, MAX_LENGTH,
                                  False, D.DataStats())
            batch = D.collate([ex[i] for i in idx], tok.pad_token_id, False)
            loss, _ = module.nll_loss(policy, batch)
        elif row in ("dpo", "dpo_lora"):
            pairs = D.tokenize_preferences(D.preference_examples(table, cfg.data, tok, D.DataStats()), tok, cfg.data,
                                           MAX_LENGTH, False, D.DataStats())
            batch = D.collate_preferences([pairs[i] for i in idx], tok.pad_token_id, False)
            reference = build_reference(cfg.reference, cfg.model, cfg.lora, policy)
            loss, _ = module.preference_loss(policy, batch, cfg, reference)
            o = policy(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")})
            out["logp_chosen"] = float((o["logps"] * o["mask"]).sum(-1)[:BATCH].mean())
        elif row == "kto":
            ex, labels = module.tokenize_rows(module.unpaired_examples(table, cfg.data, tok, D.DataStats()), tok,
                                              cfg.data, MAX_LENGTH, False, D.DataStats())
            kl = module.kl_examples(ex, module.kl_partners(ex, cfg.train.seed), cfg.data, MAX_LENGTH, False)
            batch = D.collate([ex[i] for i in idx], tok.pad_token_id, False)
            batch["desirable"] = torch.tensor([labels[i] for i in idx])
            batch["kl"] = D.collate([kl[i] for i in idx], tok.pad_token_id, False)
            reference = build_reference(cfg.reference, cfg.model, cfg.lora, policy)
            loss, m = module.kto_loss(policy, batch, cfg, reference)
            out["logp_chosen"] = float(m["logps/chosen"])
        else:
            raise ValueError(row)
    out.update(loss=float(loss), tokens=real_tokens(batch))
    return out


# ---------------------------------------------------------------------------------------------
# TRL: its trainers, clocked by a callback at every on_step_end
# ---------------------------------------------------------------------------------------------


def trl_trainer(row: str, model_dir: str, files: dict[str, str], out: str, steps: int, group_by_length: bool):
    import datasets
    import peft
    import torch
    import trl
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    common = dict(output_dir=out, per_device_train_batch_size=BATCH, gradient_accumulation_steps=1, max_steps=steps,
                  learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                  bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True, report_to="none",
                  logging_strategy="no", save_strategy="no", eval_strategy="no", disable_tqdm=True, seed=0,
                  dataloader_num_workers=0)
    if group_by_length and row == "sft":  # the other trainers' datasets have no input_ids to measure (ValueError)
        common["train_sampling_strategy"] = "group_by_length"

    def causal():
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    def ds(name: str):
        return datasets.Dataset.from_list(read_rows(files[name]))

    if row == "sft":
        args = trl.SFTConfig(**common, max_length=MAX_LENGTH)
        return trl.SFTTrainer(model=causal(), args=args, train_dataset=ds("sft"), processing_class=tok)
    if row == "reward":
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = tok.pad_token_id
        args = trl.RewardConfig(**common, max_length=MAX_LENGTH)
        return trl.RewardTrainer(model=model, args=args, train_dataset=ds("prefs"), processing_class=tok)
    if row in ("dpo", "dpo_lora"):
        args = trl.DPOConfig(**common, max_length=MAX_LENGTH, beta=0.1, loss_type=["sigmoid"])
        peft_config = None
        if row == "dpo_lora":
            peft_config = peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                          target_modules=LORA["targets"], task_type="CAUSAL_LM")
        return trl.DPOTrainer(model=causal(), args=args, train_dataset=ds("prefs"), processing_class=tok,
                              peft_config=peft_config)
    if row == "kto":
        args = trl.KTOConfig(**common, max_length=MAX_LENGTH, beta=0.1)
        return trl.KTOTrainer(model=causal(), args=args, train_dataset=ds("kto"), processing_class=tok)
    if row in ("grpo", "rloo"):
        gen = dict(num_generations=GROUP, max_completion_length=MAX_NEW_TOKENS, temperature=1.0, top_p=1.0, top_k=0)
        if row == "grpo":
            args = trl.GRPOConfig(**common, **gen, beta=0.0, loss_type="dapo", scale_rewards="group")
            return trl.GRPOTrainer(model=causal(), reward_funcs=reward_fn, args=args, train_dataset=ds("prompts"),
                                   processing_class=tok)
        args = trl.RLOOConfig(**common, **gen, beta=0.05)
        return trl.RLOOTrainer(model=causal(), reward_funcs=reward_fn, args=args, train_dataset=ds("prompts"),
                               processing_class=tok)
    raise ValueError(row)


def clock_trl(trainer, clock: list[tuple[float, int]]) -> None:
    """Count real tokens of every training compute_loss call; stamp (time, tokens) at each step end."""
    from transformers import TrainerCallback

    count = [0]
    original = trainer.compute_loss

    def compute_loss(model, inputs, *args, **kwargs):
        if model.training:
            count[0] += real_tokens(inputs)
        return original(model, inputs, *args, **kwargs)

    trainer.compute_loss = compute_loss

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            clock.append((now(), count[0]))

    trainer.add_callback(Clock())


def trl_first_batch(trainer) -> dict:
    rows = [trainer.train_dataset[i] for i in range(BATCH)]
    return trainer._prepare_inputs(trainer.data_collator(rows))


def trl_step0(row: str, trainer, head=None) -> dict:
    """TRL's loss on its first 8 dataset rows (the same rows as rlhfkit's), before any update."""
    import torch

    if row == "reward" and head is not None:
        with torch.no_grad():
            trainer.model.score.weight.copy_(head)
    batch = trl_first_batch(trainer)
    trainer.model.train()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))
    out = {"loss": float(loss), "tokens": real_tokens(batch)}
    metrics = trainer._metrics["train"]
    if metrics.get("logps/chosen"):
        out["logp_chosen"] = float(metrics["logps/chosen"][-1])
    for values in metrics.values():  # leave no trace of this check in the training logs
        if isinstance(values, list):
            values.clear()
    return out


def run_trl(row: str, model_dir: str, files: dict[str, str], work: Path, steps: int, group_by_length: bool,
            step0: bool, head=None) -> tuple[list[tuple[float, int]], Optional[dict]]:
    trainer = trl_trainer(row, model_dir, files, str(work / f"trl-{row}"), steps, group_by_length)
    check = trl_step0(row, trainer, head) if step0 else None
    clock: list[tuple[float, int]] = []
    clock_trl(trainer, clock)
    with contextlib.redirect_stdout(open(os.devnull, "w")):  # its end-of-training summary line
        trainer.train()
    del trainer
    return clock, check


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


def quiet() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    logging.getLogger("rlhfkit").setLevel(logging.WARNING)
    logging.getLogger("trl").setLevel(logging.ERROR)


def tiny_part(args) -> str:
    import importlib.util

    import torch

    if importlib.util.find_spec("trl") is None:
        raise SystemExit("TRL is not installed: pip install -e '.[bench]' (TRL 1.16, the benchmark's peer)")

    work = Path(args.work or tempfile.mkdtemp(prefix="rlhfkit-vs-trl-"))
    model = build_model(work / "tiny-llama")
    files = make_data(work / "data", model)
    steps = args.warmup + args.steps
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {ROWS}")
    print(f"# rlhfkit vs TRL: tiny Llama ({model}), batch {BATCH}, max length {MAX_LENGTH}, fp32, "
          f"{torch.get_num_threads()} threads, {args.clock} clock, {args.warmup} warm-up + {args.steps} measured "
          f"steps, "
          f"{args.repeats} repeat(s); load average {load_average()}", flush=True)
    results = []
    for row in rows:
        r: dict = {"row": row, "rlhfkit": [], "trl": [], "load": []}
        print(f"\n## {TITLES[row]}\n   rlhfkit {COMMANDS[row]} "
              + " ".join(rlhfkit_overrides(row, model, files, f"{work}/rlhfkit-{row}", steps)), flush=True)
        ours0 = None
        if row not in ("grpo", "rloo"):
            ours0 = rlhfkit_step0(row, model, files, work)
        for rep in range(args.repeats):
            order = ["rlhfkit", "trl"] if rep % 2 == 0 else ["trl", "rlhfkit"]
            for lib in order:
                gc.collect()
                if lib == "rlhfkit":
                    clock = run_rlhfkit(row, model, files, work, steps)
                else:
                    clock, theirs0 = run_trl(row, model, files, work, steps, args.trl_group_by_length,
                                             step0=rep == 0 and ours0 is not None,
                                             head=ours0.get("head") if ours0 else None)
                    if theirs0 is not None:
                        r["trl0"] = theirs0
                tps, n, secs = measured_rate(clock, args.warmup)
                r[lib].append(tps)
                print(f"   {lib:8s} run {rep + 1}: {tps:8,.0f} tok/s ({n:,} tokens in {secs:.2f} s; "
                      f"load {load_average()})", flush=True)
        if ours0 is not None:
            theirs0 = r["trl0"]
            r["loss_rlhfkit"], r["loss_trl"] = ours0["loss"], theirs0["loss"]
            extra = ""
            if "logp_chosen" in ours0 and "logp_chosen" in theirs0:
                extra = f"; mean chosen log-prob {ours0['logp_chosen']:.4f} vs {theirs0['logp_chosen']:.4f}"
            print(f"   step-0 loss on the same 8 rows: rlhfkit {ours0['loss']:.6f}, TRL {theirs0['loss']:.6f}, "
                  f"|diff| {abs(ours0['loss'] - theirs0['loss']):.2e} (tokens {ours0['tokens']} vs "
                  f"{theirs0['tokens']}){extra}", flush=True)
        else:
            r["loss_note"] = "sampled: n/a"
            print("   step-0 loss: not comparable (each library samples its own completions)", flush=True)
        ratio = median_ratio(r["rlhfkit"], r["trl"])
        print(f"   ratio {ratio:.2f}x ({verdict(ratio)})", flush=True)
        results.append(r)
    table = format_table(results, load_average())
    print("\n" + table)
    return table


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M full DPO: model FLOP utilisation
# ---------------------------------------------------------------------------------------------


def matmul_peak(threads: int, n: int = 2048, reps: int = 5) -> float:
    """Best fp32 FLOP/s of ``torch.matmul`` on n x n matrices (2 n^3 FLOPs each)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def matmul_params(model) -> int:
    """Parameters that take part in matmuls: all (unique) but the input embedding, unless it is
    tied to the LM head (then it is the head and counts once)."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    total = sum(p.numel() for p in model.parameters())  # unique parameters (tied ones once)
    tied = head is not None and head.weight is emb
    return total if tied else total - emb.numel()


def computed_tokens(batch: dict, min_shared: float = 0.1) -> int:
    """Tokens rlhfkit's forward actually runs for a causal ``collate`` batch: rows that share a
    prompt (a DPO pair) are one prefix tree, so the prompt counts once (``rlhfkit.policy.prefix_tree``)."""
    from rlhfkit.policy import prefix_tree

    rows, prompt_lens = [], []
    for ids, att, lab in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        real = att.bool()
        rows.append(ids[real].tolist())
        lab = lab[real]
        prompt_lens.append(int((lab != -100).nonzero()[0]) if bool((lab != -100).any()) else len(lab))
    tree = prefix_tree(rows, prompt_lens, min_shared)
    return sum(len(r) for r in rows) if tree is None else int((tree.segments >= 0).sum())


def mfu_part(args) -> str:
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlhfkit import assets
    from rlhfkit.recipes import dpo as dpo_recipe

    work = Path(args.work or tempfile.mkdtemp(prefix="rlhfkit-mfu-"))
    model_dir = assets.resolve("asset:smollm2")
    files = {"prefs": str(ROOT / "examples" / "data" / "toxicity_prefs.jsonl")}
    steps = args.mfu_warmup + args.mfu_steps
    print(f"# SmolLM2-135M-Instruct full DPO (rlhfkit), frozen reference copy, batch {BATCH} pairs, max length "
          f"{MAX_LENGTH}, fp32, {args.threads} threads, {args.mfu_warmup} warm-up + {args.mfu_steps} measured steps; "
          f"load average {load_average()}", flush=True)
    peak = matmul_peak(args.threads)
    print(f"   measured fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s (2,048 x 2,048 torch.matmul, best of 5)", flush=True)
    module, cfg = rlhfkit_config("dpo", model_dir, files, str(work / "rlhfkit-mfu"), steps)
    print("   rlhfkit dpo " + " ".join(rlhfkit_overrides("dpo", model_dir, files, str(work / "rlhfkit-mfu"), steps)),
          flush=True)
    clock: list[tuple[float, int]] = []
    per_step: list[tuple[float, int]] = []  # (mean attended context, tokens actually computed) per batch
    original = dpo_recipe.preference_loss

    def counting_loss(model, batch, *a, **kw):
        m = batch["attention_mask"]
        pos = m.cumsum(-1) * m  # 1-based position of each real token in its sequence
        per_step.append((float(pos.sum() / m.sum()), computed_tokens(batch)))
        return original(model, batch, *a, **kw)

    dpo_recipe.preference_loss = counting_loss
    try:
        with engine_clock(clock):
            module.run(cfg)
    finally:
        dpo_recipe.preference_loss = original
    tps, n, secs = measured_rate(clock, args.mfu_warmup)
    measured = per_step[args.mfu_warmup:] or per_step
    ctx = statistics.mean(c for c, _ in measured)
    computed_tps = tps * sum(k for _, k in measured) / max(1, n)
    hf_cfg = AutoConfig.from_pretrained(model_dir)
    n_params = matmul_params(AutoModelForCausalLM.from_pretrained(model_dir))
    d_attn = hf_cfg.num_attention_heads * getattr(hf_cfg, "head_dim", hf_cfg.hidden_size // hf_cfg.num_attention_heads)
    f = model_flops_per_token(n_params, hf_cfg.num_hidden_layers, d_attn, ctx)
    util = mfu(tps, tps, f, peak)  # the reference scores the same tokens as the policy
    hw = mfu(computed_tps, computed_tps, f, peak)
    lines = [
        "| model | tok/s | forward GFLOP/token | model GFLOP/s | fp32 matmul peak GFLOP/s | MFU | HFU |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| SmolLM2-135M full DPO, rlhfkit | {tps:,.0f} | {f / 1e9:.3f} | {4 * f * tps / 1e9:.1f} | {peak / 1e9:.1f} | "
        f"{100 * util:.1f}% | {100 * hw:.1f}% |",
        "",
        f"tok/s: real chosen + rejected tokens per second (the table's rule); {n:,} tokens in {secs:.1f} s. "
        f"FLOPs = 3 F per trained token + F per reference token, F = 2 N + 4 L d c with N = {n_params:,} matmul "
        f"parameters (tied embedding once), L = {hf_cfg.num_hidden_layers} layers, d = {d_attn}, c = {ctx:.1f} "
        f"(mean attended context). MFU counts every chosen and rejected token; HFU counts the tokens the "
        f"forward actually runs ({computed_tps:,.0f}/s: each pair's prompt once). Load average {load_average()}.",
    ]
    table = "\n".join(lines)
    print("\n" + table)
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["tiny", "mfu", "all"], default="tiny")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    ap.add_argument("--repeats", type=int, default=1, help="alternating runs per library and row (medians)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall time (default), or process CPU time for a busy machine (use with --threads 1)")
    ap.add_argument("--trl-group-by-length", action="store_true",
                    help="give TRL's SFT row length-grouped batches too (train_sampling_strategy=group_by_length)")
    ap.add_argument("--mfu-warmup", type=int, default=1)
    ap.add_argument("--mfu-steps", type=int, default=3)
    ap.add_argument("--work", default=None, help="folder for the model, data and run outputs (default: a temp dir)")
    ap.add_argument("--out", default=None, help="also write the markdown table(s) to this file")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    global NOW
    NOW = CLOCKS[args.clock]
    quiet()
    parts = []
    if args.part in ("tiny", "all"):
        parts.append(tiny_part(args))
    if args.part in ("mfu", "all"):
        parts.append(mfu_part(args))
    if args.out:
        from rlhfkit.utils import atomic_write_text

        header = (f"# rlhfkit vs TRL {_trl_version()}\n\n`python benchmarks/vs_trl.py {' '.join(sys.argv[1:])}` on "
                  f"{cpu_name()} ({os.cpu_count()} cores), torch {torch.__version__}, {args.threads} threads, "
                  f"{args.clock} clock.\n\n")
        atomic_write_text(args.out, header + "\n\n".join(parts) + "\n")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _trl_version() -> str:
    try:
        import trl

        return trl.__version__
    except ImportError:
        return "(not installed)"


if __name__ == "__main__":
    main()
