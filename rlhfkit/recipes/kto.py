"""KTO: Kahneman-Tversky Optimization on unpaired binary feedback (Ethayarajh et al. 2024,
"KTO: Model Alignment as Prospect Theoretic Optimization").

Data: rows ``prompt, completion, label`` (``label`` true = desirable, false = undesirable; also
1/0 or the strings true/false/yes/no), names mappable with ``data.columns``; the prompt may come
from ``data.prompt_template``, and chat ``messages`` rows (the last assistant turn is the
completion) work too. Paired preference files (``prompt/chosen/rejected``, hh-rlhf dialogues or
chat pairs, recognised by a ``chosen`` column and no ``completion`` column) are unpaired: each
pair gives a desirable row (chosen) and an undesirable row (rejected) with the same prompt. The
held-out split of a paired file is made before unpairing, so both halves of a pair stay on the
same side.

Loss (``rlhfkit.losses.kto``), with r = log pi(y|x) - log ref(y|x) on summed completion
log-probs, s = sigmoid and z0 the reference point:

    desirable:   w_d (1 - s(beta (r - z0)))        undesirable:   w_u (1 - s(beta (z0 - r)))

z0 estimates KL(pi || ref) from mismatched pairs, as in the paper and TRL: for row i the
completion of another row j is scored after the prompt of row i, under the policy and the
reference; z0 = mean over the micro-batch of (log pi - log ref) on those pairs, clamped at 0 and
detached (no gradient flows through it; averaged over processes when there are several).

Deliberate choices:
- The mismatched partner j of each row is fixed once per run (the next row in a seeded shuffle
  of the training rows whose prompt differs, cyclically), as TRL fixes its KL pairs when it
  preprocesses the data. So the reference log-probs of the KL pairs can be precomputed and
  cached like the others (``reference.precompute``). The policy's KL log-probs are taken with
  the policy in training mode under ``no_grad``. A live reference scores the rows and their KL
  pairs in one forward (row b and KL pair b share row b's prompt, which is then computed once).
- The paper recommends w_d n_d / (w_u n_u) in [1, 4/3]; outside that range a warning is logged,
  nothing is changed.
- Held-out accuracy (``eval/accuracy``; ``eval_start`` / ``eval_end`` in summary.json): the
  fraction of held-out rows whose implicit reward beta * r has the sign of its label (desirable > 0, undesirable < 0;
  0 counts as wrong, so a policy equal to its reference starts at 0). When held-out rows share a
  prompt with both labels (always so for unpaired paired files), ``eval/pair_accuracy`` is the
  fraction of (desirable, undesirable) pairs with the same prompt whose reward margin is > 0, the
  quantity DPO's accuracy measures.
- Metrics averaged over a step weigh each micro-batch by its rows; ``rewards/chosen`` of a
  micro-batch without desirable rows counts as 0.
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch

from rlhfkit import losses
from rlhfkit.config import (ConfigError, DataConfig, EvalConfig, LoraConfig, ModelConfig, ReferenceConfig, TrainConfig,
                            UserError, check_best_metric)
from rlhfkit.data import (DataStats, Example, Table, check_some_kept, collate, encode_completion, encode_prompt, fit_lengths, parse_rows,
                          preference_examples, sft_examples)
from rlhfkit.engine import resolve_precision
from rlhfkit.recipes._offline import load_data, make_engine, train_and_evaluate
from rlhfkit.models import load_policy, save_pretrained
from rlhfkit.policy import PolicyModel, Reference, build_reference
from rlhfkit.recipes._preference import (concat_batches, default_cache_dir, model_inputs, policy_scores,
                                         precompute_reference, reference_identity, reference_sums, release_reference,
                                         sequence_logps)
from rlhfkit.utils import logger, seed_everything

TRUE = ("true", "1", "yes")
FALSE = ("false", "0", "no")


EVAL_METRICS = ["eval/accuracy", "eval/pair_accuracy", "eval/rewards_desirable", "eval/rewards_undesirable"]


@dataclass
class Config:
    RENAMED: ClassVar[dict[str, str]] = {
        "train.eval_every": "eval.every", "eval_batch_size": "eval.batch_size", "eval_max_rows": "eval.max_rows",
        "precompute_reference": "reference.precompute", "reference_cache_dir": "reference.cache_dir"}
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy to train (usually the SFT model)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters (off: full fine-tune)."""
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    """The frozen reference policy (KTO always needs one), and whether its log-probs are
    precomputed once (``reference.precompute``, ``reference.cache_dir``)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Unpaired rows ``prompt, completion, label`` (or ``prompt_template``/chat ``messages`` with a
    ``label``), or paired ``prompt/chosen/rejected`` rows, which are split into two rows each."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimizer, schedule, steps and output."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out accuracy: how often, sequences per forward (also of the reference
    precomputation), how many rows."""
    beta: float = 0.1
    """Inverse temperature of the implicit reward beta * log(pi / ref)."""
    desirable_weight: float = 1.0
    """w_d: weight of the desirable rows' loss."""
    undesirable_weight: float = 1.0
    """w_u: weight of the undesirable rows' loss (the paper suggests w_d n_d / (w_u n_u) in [1, 4/3])."""

    def validate(self) -> None:
        check_best_metric(self.train, "kto", EVAL_METRICS)
        if self.beta <= 0:
            raise ConfigError(f"beta must be > 0, got {self.beta}")
        if self.desirable_weight <= 0 or self.undesirable_weight <= 0:
            raise ConfigError("desirable_weight and undesirable_weight must be > 0")
        if self.reference.kind == "none":
            raise ConfigError("KTO needs a reference policy; reference.kind=none is not possible")


# ---------------------------------------------------------------------------------------------
# Data: unpaired rows (or unpaired pairs) -> examples + labels + mismatched KL partners
# ---------------------------------------------------------------------------------------------


def parse_label(table: Table, i: int, cfg: DataConfig) -> bool:
    col = cfg.columns.get("label", "label")
    row = table.rows[i]
    if col not in row:
        raise UserError(f"{table.where(i)}: missing column '{col}' (columns: {', '.join(map(str, row))})")
    v = row[col]
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in TRUE + FALSE:
        return v.strip().lower() in TRUE
    raise UserError(f"{table.where(i)}: column '{col}' must be true (desirable) or false (undesirable), got {v!r}")


def is_paired(table: Table, cfg: DataConfig) -> bool:
    """A preference file: its first row has a chosen column and no completion column."""
    if not table.rows:
        return False
    row = table.rows[0]
    return cfg.columns.get("completion", "completion") not in row and cfg.columns.get("chosen", "chosen") in row


def unpaired_examples(table: Table, cfg: DataConfig, tokenizer, stats: DataStats) -> list[tuple[str, str, bool]]:
    """(prompt, completion, desirable) rows; a paired file gives (prompt, chosen, True), (prompt, rejected, False)."""
    if is_paired(table, cfg):
        triples = preference_examples(table, cfg, tokenizer, stats)
        logger.info(f"{table.source}: paired rows, each split into a desirable and an undesirable row")
        out = [row for p, c, r in triples for row in ((p, c, True), (p, r, False))]
        stats.rows = len(out)
        return out
    strict = dataclasses.replace(cfg, drop_invalid=False)

    def parse(i: int, row: dict) -> tuple[str, str, bool]:
        label = parse_label(table, i, cfg)
        one = Table([row], table.source, [table.row_numbers[i] if table.row_numbers else i + 1])
        ((prompt, completion),) = sft_examples(one, strict, tokenizer, DataStats())
        return prompt, completion, label

    return parse_rows(table, cfg, stats, parse)


def tokenize_rows(rows: list[tuple[str, str, bool]], tokenizer, cfg: DataConfig, max_length: int, seq2seq: bool,
                  stats: DataStats) -> tuple[list[Example], list[bool]]:
    examples, labels = [], []
    for prompt, completion, label in rows:
        fitted = fit_lengths(encode_prompt(tokenizer, prompt, seq2seq), encode_completion(tokenizer, completion, seq2seq),
                             cfg, max_length, stats, seq2seq)
        if fitted is not None:
            examples.append(Example(*fitted))
            labels.append(label)
    if stats.truncated or stats.dropped_overlong:
        logger.info(f"over-long rows: {stats.truncated} truncated, {stats.dropped_overlong} dropped (data.overlong)")
    check_some_kept(examples, stats, cfg, max_length)
    return examples, labels


def kl_partners(examples: list[Example], seed: int, lookahead: int = 16) -> list[int]:
    """For each row i the row j whose completion is scored after i's prompt for the KL estimate:
    the next row in a seeded shuffle whose prompt differs (cyclic; itself only if n == 1)."""
    n = len(examples)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    partner = [0] * n
    for k, i in enumerate(order):
        j = order[(k + 1) % n]
        for step in range(1, min(lookahead, n - 1) + 1):
            cand = order[(k + step) % n]
            if examples[cand].prompt_ids != examples[i].prompt_ids:
                j = cand
                break
        partner[i] = j
    return partner


def kl_examples(examples: list[Example], partners: list[int], cfg: DataConfig, max_length: int,
                seq2seq: bool) -> list[Example]:
    """Prompt of row i + completion of its partner, cut to the length limits if the pair is too long."""
    trunc = dataclasses.replace(cfg, overlong="truncate")
    return [Example(*fit_lengths(e.prompt_ids, examples[j].completion_ids, trunc, max_length, DataStats(), seq2seq))
            for e, j in zip(examples, partners)]


# ---------------------------------------------------------------------------------------------
# Loss of one micro-batch
# ---------------------------------------------------------------------------------------------


def kto_loss(model: torch.nn.Module, batch: dict, cfg: Config, reference: Optional[Reference] = None,
             reduce_kl=None) -> tuple[torch.Tensor, dict]:
    """``batch``: a ``collate`` batch of rows + ``desirable`` (B,) + ``kl`` (the mismatched pairs'
    batch); ``ref_logps`` / ``ref_kl_logps`` (B,) when precomputed. ``reduce_kl`` averages the KL
    estimate over processes."""
    inputs = model_inputs(batch)
    out = model(**inputs)
    logps, _ = sequence_logps(out["logps"], out["mask"])  # (B,)
    device = logps.device
    kl_inputs = {k: v.to(device) for k, v in model_inputs(batch["kl"]).items()}
    with torch.no_grad():
        kl_out = getattr(model, "module", model)(**kl_inputs)
        kl_logps, _ = sequence_logps(kl_out["logps"], kl_out["mask"])  # (B,)
        if "ref_logps" in batch:
            ref, kl_ref = batch["ref_logps"], batch["ref_kl_logps"]  # (B,), (B,)
        else:  # one reference forward over rows and KL pairs: row b and KL pair b share their prompt
            both = reference_sums(reference, concat_batches(inputs, kl_inputs))  # (2B,)
            ref, kl_ref = both[: len(logps)], both[len(logps):]
        kl = (kl_logps - kl_ref).mean()
        if reduce_kl is not None:
            kl = reduce_kl(kl)
    desirable = batch["desirable"].bool()  # (B,)
    loss, metrics = losses.kto(logps, ref, desirable, kl, beta=cfg.beta, desirable_weight=cfg.desirable_weight,
                               undesirable_weight=cfg.undesirable_weight)
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    lp = logps.detach()
    metrics["logps/chosen"] = lp[desirable].mean().item() if desirable.any() else 0.0
    metrics["logps/rejected"] = lp[~desirable].mean().item() if (~desirable).any() else 0.0
    return loss, metrics


def heldout_metrics(rewards: torch.Tensor, labels: torch.Tensor, examples: list[Example]) -> dict[str, float]:
    """Sign accuracy over rows, and accuracy over (desirable, undesirable) pairs sharing a prompt."""
    labels = labels.bool()
    correct = torch.where(labels, rewards > 0, rewards < 0)  # (N,)
    metrics = {"eval/accuracy": correct.float().mean().item(),
               "eval/rewards_desirable": rewards[labels].mean().item() if labels.any() else 0.0,
               "eval/rewards_undesirable": rewards[~labels].mean().item() if (~labels).any() else 0.0}
    groups: dict[tuple, tuple[list[int], list[int]]] = {}
    for i, e in enumerate(examples):
        groups.setdefault(tuple(e.prompt_ids), ([], []))[0 if labels[i] else 1].append(i)
    wins = [float(rewards[d] > rewards[u]) for good, bad in groups.values() for d in good for u in bad]
    if wins:
        metrics["eval/pair_accuracy"] = sum(wins) / len(wins)
    return metrics


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def run(cfg: Config, resume: bool = False) -> dict:
    seed_everything(cfg.train.seed)  # before the fresh LoRA weights are drawn: the run is reproducible
    model, tok = load_policy(cfg.model, cfg.lora)
    seq2seq = bool(model.config.is_encoder_decoder)
    data = load_data(cfg, lambda table, stats: list(zip(*tokenize_rows(
        unpaired_examples(table, cfg.data, tok, stats), tok, cfg.data, cfg.model.max_length, seq2seq, stats))))
    train, train_labels = [e for e, _ in data.train], [lab for _, lab in data.train]
    held, held_labels = [e for e, _ in data.held], [lab for _, lab in data.held]
    kl_train = kl_examples(train, kl_partners(train, cfg.train.seed), cfg.data, cfg.model.max_length, seq2seq)
    n_good = sum(train_labels)
    n_bad = len(train_labels) - n_good
    logger.info(f"kto: {len(train)} training rows ({n_good} desirable, {n_bad} undesirable), {len(held)} held-out rows")
    if n_good and n_bad:
        ratio = cfg.desirable_weight * n_good / (cfg.undesirable_weight * n_bad)
        if not 1.0 <= ratio <= 4 / 3:
            logger.warning(f"kto: desirable_weight * n_desirable / (undesirable_weight * n_undesirable) = {ratio:.3f}; "
                           "the paper recommends [1, 4/3]")

    policy = PolicyModel(model)
    reference = build_reference(cfg.reference, cfg.model, cfg.lora, policy)
    engine, batcher = make_engine(cfg, "kto", policy, [len(e) for e in train], data, resume, EVAL_METRICS)
    engine.prepare_frozen(reference.model)  # the frozen copy: on the Engine's device, sharded under fsdp
    autocast = engine.accelerator.autocast
    pad = tok.pad_token_id
    ref_kind = reference.kind

    # Reference log-probs: held-out rows always once; training rows and KL pairs once when asked.
    common = dict(pad_id=pad, seq2seq=seq2seq, batch_size=cfg.eval.batch_size, device=engine.device, autocast=autocast)
    ref_train, cache_info = None, {}
    if cfg.reference.precompute:
        common.update(
            cache_dir=cfg.reference.cache_dir or default_cache_dir(),
            identity=reference_identity(reference, cfg.model, cfg.lora, cfg.reference, next(policy.parameters()).dtype,
                                        resolve_precision(cfg.train, engine.device.type), engine.device.type),
            lengths={"max_length": cfg.model.max_length, "max_prompt_length": cfg.data.max_prompt_length,
                     "max_completion_length": cfg.data.max_completion_length})
        ref_train, cache_info["train"] = precompute_reference(reference, train + kl_train, what="kto-train", **common)
    ref_held = None
    if held:
        ref_held, info = precompute_reference(reference, held, what="kto-heldout", **common)
        if cfg.reference.precompute:
            cache_info["heldout"] = info
    if cfg.reference.precompute:
        release_reference(reference)

    def make_batch(idx: list[int]) -> dict:
        batch = collate([train[i] for i in idx], pad, seq2seq)
        batch["desirable"] = torch.tensor([train_labels[i] for i in idx])
        batch["kl"] = collate([kl_train[i] for i in idx], pad, seq2seq)  # nested: not counted as trained tokens
        if ref_train is not None:
            t = torch.tensor(idx)
            batch["ref_logps"] = ref_train[t]  # (B,)
            batch["ref_kl_logps"] = ref_train[len(train) + t]  # (B,)
        return batch

    reduce_kl = (lambda x: engine.accelerator.reduce(x, reduction="mean")) if engine.world_size > 1 else None

    def loss_fn(m, batch):
        return kto_loss(m, batch, cfg, reference, reduce_kl)

    def train_step(step_idx: list[list[int]]) -> dict:
        return engine.step(loss_fn, [make_batch(idx) for idx in step_idx])

    labels_held = torch.tensor(held_labels)

    def evaluate() -> Optional[dict]:
        if not held:
            return None
        pi, _ = policy_scores(engine.unwrapped(), held, pad, seq2seq, cfg.eval.batch_size, autocast)
        return heldout_metrics(cfg.beta * (pi - ref_held), labels_held, held)

    def save(out):
        save_pretrained(engine.unwrapped().lm, tok, out, merge=cfg.lora.merge_on_save,
                        state_dict=engine.saved_state("lm."))  # gathered weights under fsdp / ZeRO-3

    start, end = train_and_evaluate(engine, batcher, cfg, train_step, evaluate, save)
    if start and "eval/pair_accuracy" in start:
        logger.info(f"kto: held-out pair accuracy {start['eval/pair_accuracy']:.3f} -> {end['eval/pair_accuracy']:.3f}")
    if start:
        logger.info(f"kto: held-out sign accuracy {start['eval/accuracy']:.3f} -> {end['eval/accuracy']:.3f}")
    extra = {"beta": cfg.beta, "reference": ref_kind, "reference_precomputed": bool(cache_info)}
    if cache_info:
        extra["reference_cache"] = cache_info
    return engine.finish(save if cfg.train.save_model else None, extra)


__all__ = ["Config", "run", "kto_loss", "unpaired_examples", "kl_partners", "kl_examples", "heldout_metrics"]
