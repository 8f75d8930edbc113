"""Pairwise reward-model training (Bradley-Terry), as in Stiennon et al. 2020 and Ouyang et al. 2022.

The model maps a text to a scalar r(x, y); on preference pairs it minimises
``-log s(r(x, y_c) - r(x, y_r) - margin)`` (``rlhfkit.losses.pairwise_reward``; the optional
per-row margin is Llama 2's preference-strength margin, Touvron et al. 2023). Chosen and rejected
texts of a micro-batch go through one concatenated forward (rows 0..B-1 chosen, B..2B-1 rejected);
with a causal value-head model the tokens a pair has in common (its prompt) are computed once
for both texts (``rlhfkit.policy.prefix_tree``: the same states, only float rounding differs).

Text scored: ``rlhfkit.rewards.join_prompt_completion(prompt, completion)``, the same join the
``reward_model`` reward uses at scoring time, tokenized by ``rlhfkit.rewards.reward_input_ids``
(cut from the left so the completion is kept), so training and use see the same ids.

Two heads (``head``):
- ``classifier``: an encoder (BERT-style, e.g. ``asset:minilm``) with a fresh one-logit
  ``AutoModelForSequenceClassification`` head. BERT has no EOS; its tokenizer ends every text
  with ``[SEP]``. Saved as a plain HF classifier folder.
- ``value_head``: a causal or seq2seq LM with ``rlhfkit.policy.ValueHead`` read at the last real
  token (an appended EOS; seq2seq: the first decoder state), see
  ``rlhfkit.rewards.last_token_rewards``. Saved as the LM folder + ``value_head.safetensors`` +
  ``rlhfkit_reward.json`` ``{"kind": "lm_value_head", "model_type": "causal"|"seq2seq", ...}``.

Either folder loads with ``rlhfkit.rewards.RewardModel(path)`` and holds ``reward_stats.json``
``{"mean", "std"}``: the mean and (population) standard deviation of the trained model's rewards
over every chosen and rejected text of the training set, so scores can be normalised.

Deliberate deviations: with LoRA the saved model is the merged one (a reward model is consumed
as a whole scorer), the adapter goes to ``<output_dir>/adapter``; the tokenizer is saved with
``model_max_length = model.max_length`` so scoring truncates exactly as training did. The
summary's ``samples`` counts scored texts (two per pair); ``pairs`` counts pairs.

Held-out accuracy (fraction of pairs with r_c > r_r) and mean margin r_c - r_r are measured before
training, every ``eval.every`` steps, and at the end (``eval_start`` / ``eval_end`` in summary.json).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional

import torch
from torch import nn

from rlhfkit.config import DataConfig, EvalConfig, LoraConfig, ModelConfig, TrainConfig, UserError, check_best_metric
from rlhfkit.data import DataStats, Table, check_some_kept, preference_examples
from rlhfkit.recipes._offline import load_data, make_engine, train_and_evaluate
from rlhfkit.losses import pairwise_reward
from rlhfkit.models import (
    apply_lora, peft_quiet, is_quantized, load_hf_config, load_model, load_tokenizer, lora_targets,
    merge_dequantized, pick_device, unwrap,
)
from rlhfkit.policy import ValueHead, hidden_size, prefix_sharing_supported, prefix_tree, prefix_tree_states
from rlhfkit.rewards import REWARD_SPEC, join_prompt_completion, last_token_rewards, pad_right, reward_input_ids
from rlhfkit.utils import atomic_write_json, logger, seed_everything

LM_ARCHITECTURES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


EVAL_METRICS = ["eval/loss", "eval/accuracy", "eval/margin"]


@dataclass
class Config:
    RENAMED: ClassVar[dict[str, str]] = {"train.eval_every": "eval.every", "eval_batch_size": "eval.batch_size",
                                         "eval_max_rows": "eval.max_rows"}
    # a reward model scores whole texts cut to model.max_length, in training as when it is used
    UNUSED: ClassVar[tuple[str, ...]] = ("data.max_prompt_length", "data.max_completion_length")
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name_or_path="asset:minilm", max_length=256))
    """The backbone: an encoder (``asset:minilm``) or a causal / seq2seq language model."""
    head: Literal["auto", "classifier", "value_head"] = "auto"
    """``classifier`` (AutoModelForSequenceClassification, num_labels=1), ``value_head`` (a language
    model with a value head read at the last real token), or ``auto``: ``value_head`` when the
    checkpoint is a language model (its architecture ends in ForCausalLM, LMHeadModel or
    ForConditionalGeneration), else ``classifier``."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters (off: full fine-tune). The new head is always trained in full."""
    data: DataConfig = field(default_factory=lambda: DataConfig(
        columns={"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}))
    """Preference rows: ``prompt/chosen/rejected``, ``chosen/rejected`` dialogues with a shared
    prefix, or chat-message ``chosen/rejected`` lists."""
    margin_column: Optional[str] = None
    """Column with a per-pair margin m (a number): the loss becomes -log s(r_c - r_r - m)."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="runs/reward", lr=5e-5, batch_size=16,
                                                                       max_steps=300))
    """Optimizer, schedule, steps and output."""
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(batch_size=32))
    """Held-out accuracy: how often, pairs per forward (also of the reward statistics), how many pairs."""

    def validate(self) -> None:
        check_best_metric(self.train, "reward", EVAL_METRICS)


# ---------------------------------------------------------------------------------------------
# The scorer: backbone + scalar head, r(x, y) for a batch of right-padded texts
# ---------------------------------------------------------------------------------------------


class RewardNet(nn.Module):
    """``forward(input_ids, attention_mask) -> (B,)`` rewards, for either head."""

    def __init__(self, backbone: nn.Module, head: str):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.value_head = None
        if head == "value_head":
            self.value_head = ValueHead(hidden_size(unwrap(backbone).config))
            self.value_head.to(next(backbone.parameters()).device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix_lens: Optional[list[int]] = None,
                **_: object) -> torch.Tensor:
        """``prefix_lens[b]``: leading tokens row b shares with other rows (its pair's common
        prefix); a causal value-head model then reads them once (``rlhfkit.policy.prefix_tree``)."""
        if self.value_head is None:
            return self.backbone(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()  # (B,)
        if prefix_lens is not None:
            shared = self._shared_prefix_rewards(input_ids, attention_mask, prefix_lens)
            if shared is not None:
                return shared
        return last_token_rewards(self.backbone, self.value_head, input_ids, attention_mask)  # (B,)

    def _shared_prefix_rewards(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                               prefix_lens: list[int]) -> Optional[torch.Tensor]:
        """The rewards from one prefix-tree forward (right-padded rows); None when it does not apply."""
        hf = unwrap(self.backbone)
        body = getattr(hf, hf.base_model_prefix, None)
        if hf.config.is_encoder_decoder or not isinstance(body, nn.Module) or not prefix_sharing_supported(hf):
            return None
        rows = [input_ids[b, :n].tolist() for b, n in enumerate(attention_mask.sum(-1).tolist())]
        tree = prefix_tree(rows, prefix_lens)
        if tree is None:
            return None
        flat = prefix_tree_states(body, tree)  # (R * L, H)
        last = torch.tensor([tree.where[b][len(r) - 1] for b, r in enumerate(rows)], device=flat.device)  # (B,)
        return self.value_head(flat[last]).float()  # (B,)


def resolve_head(cfg: Config) -> str:
    if cfg.head != "auto":
        return cfg.head
    archs = getattr(load_hf_config(cfg.model.name_or_path, cfg.model), "architectures", None) or []
    return "value_head" if any(a.endswith(LM_ARCHITECTURES) for a in archs) else "classifier"


def build_net(cfg: Config, head: str, device: torch.device) -> tuple[RewardNet, object]:
    tok = load_tokenizer(cfg.model)
    # saved with the model: the scorer then truncates exactly where training did
    tok.model_max_length = min(tok.model_max_length, cfg.model.max_length)
    if head == "classifier":
        backbone = load_model(cfg.model, device, task="classifier", num_labels=1)
        if backbone.config.pad_token_id is None:
            backbone.config.pad_token_id = tok.pad_token_id
        if cfg.lora.enabled:
            backbone = _classifier_lora(backbone, cfg.lora)
    else:
        backbone = load_model(cfg.model, device)
        if cfg.lora.enabled:
            backbone = apply_lora(backbone, cfg.lora)
    return RewardNet(backbone, head), tok


def _classifier_lora(model: nn.Module, lora: LoraConfig) -> nn.Module:
    """peft LoRA for sequence classification (its SEQ_CLS task trains the new head in full)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, TaskType, get_peft_model

    if lora.adapter_path:
        with peft_quiet():
            return PeftModel.from_pretrained(model, lora.adapter_path, is_trainable=True)
    pcfg = PeftLoraConfig(task_type=TaskType.SEQ_CLS, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=lora_targets(model, lora))
    with peft_quiet():
        return get_peft_model(model, pcfg)


# ---------------------------------------------------------------------------------------------
# Data: (chosen ids, rejected ids, margin) per pair
# ---------------------------------------------------------------------------------------------


@dataclass
class Pair:
    chosen: list[int]
    rejected: list[int]
    margin: float = 0.0

    def __len__(self) -> int:
        return max(len(self.chosen), len(self.rejected))


def pair_texts(table: Table, cfg: Config, tok, stats: DataStats) -> list[tuple[str, str, float]]:
    """(joined chosen text, joined rejected text, margin) of every valid row, in row order."""
    out = []
    nums = table.row_numbers or list(range(1, len(table.rows) + 1))
    for i, row in enumerate(table.rows):
        one = DataStats()
        triples = preference_examples(Table([row], table.source, [nums[i]]), cfg.data, tok, one)
        stats.dropped_invalid += one.dropped_invalid
        stats.dropped_identical += one.dropped_identical
        if not triples:
            continue
        prompt, chosen, rejected = triples[0]
        margin = 0.0
        if cfg.margin_column is not None:
            if cfg.margin_column not in row:
                raise UserError(f"{table.where(i)}: missing column '{cfg.margin_column}' (margin_column)")
            value = row[cfg.margin_column]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise UserError(f"{table.where(i)}: column '{cfg.margin_column}' must be a finite number, got {value!r}")
            margin = float(value)
        out.append((join_prompt_completion(prompt, chosen), join_prompt_completion(prompt, rejected), margin))
    stats.rows = len(out)
    return out


def tokenize(texts: list[tuple[str, str, float]], tok, cfg: Config, append_eos: bool, stats: DataStats) -> list[Pair]:
    """Token ids per pair; the over-long policy applies when either text exceeds ``model.max_length``."""
    out = []
    for chosen, rejected, margin in texts:
        c, cut_c = reward_input_ids(tok, chosen, cfg.model.max_length, append_eos)
        r, cut_r = reward_input_ids(tok, rejected, cfg.model.max_length, append_eos)
        if cut_c or cut_r:
            if cfg.data.overlong == "drop":
                stats.dropped_overlong += 1
                continue
            stats.truncated += 1
        out.append(Pair(c, r, margin))
    if stats.truncated or stats.dropped_overlong:
        logger.info(f"over-long pairs: {stats.truncated} cut from the left, {stats.dropped_overlong} dropped (data.overlong)")
    check_some_kept(out, stats, cfg.data, cfg.model.max_length)
    return out


def collate_pairs(pairs: list[Pair], pad_id: int, with_margin: bool) -> dict[str, torch.Tensor]:
    """One concatenated batch: rows 0..B-1 chosen, B..2B-1 rejected; ``margin`` (B,) when used."""
    ids, att = pad_right([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)  # (2B, T)
    batch = {"input_ids": ids, "attention_mask": att}
    if with_margin:
        batch["margin"] = torch.tensor([p.margin for p in pairs], dtype=torch.float32)  # (B,)
    return batch


# ---------------------------------------------------------------------------------------------
# Loss, held-out accuracy, reward statistics
# ---------------------------------------------------------------------------------------------


def pair_prefix_lens(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[int]:
    """For right-padded rows 0..B-1 (chosen) and B..2B-1 (rejected): the length of the common
    prefix of each pair, for both of its rows."""
    B = input_ids.shape[0] // 2
    same = (input_ids[:B] == input_ids[B:]) & attention_mask[:B].bool() & attention_mask[B:].bool()  # (B, T)
    n = same.long().cumprod(-1).sum(-1).tolist()  # (B,) leading tokens in common
    return n + n


def reward_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    prefix = pair_prefix_lens(batch["input_ids"], batch["attention_mask"])
    r = model(batch["input_ids"], batch["attention_mask"], prefix_lens=prefix)  # (2B,)
    B = r.shape[0] // 2
    return pairwise_reward(r[:B], r[B:], batch.get("margin"))


@torch.no_grad()
def score_pairs(net: RewardNet, pairs: list[Pair], pad_id: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected), each (N,), in eval mode."""
    was = net.training
    net.eval()
    device = next(net.parameters()).device
    rc, rr = [], []
    for s in range(0, len(pairs), batch_size):
        batch = collate_pairs(pairs[s: s + batch_size], pad_id, False)
        r = net(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                prefix_lens=pair_prefix_lens(batch["input_ids"], batch["attention_mask"])).cpu()  # (2b,)
        rc.append(r[: len(r) // 2])
        rr.append(r[len(r) // 2:])
    net.train(was)
    return torch.cat(rc), torch.cat(rr)


def heldout_metrics(net: RewardNet, pairs: list[Pair], pad_id: int, batch_size: int) -> dict[str, float]:
    """Held-out loss, accuracy (r_c > r_r) and mean margin r_c - r_r."""
    rc, rr = score_pairs(net, pairs, pad_id, batch_size)
    margin = torch.tensor([p.margin for p in pairs]) if any(p.margin for p in pairs) else None
    _, m = pairwise_reward(rc, rr, margin)
    return {"eval/loss": m["loss"], "eval/accuracy": m["rewards/accuracies"], "eval/margin": m["rewards/margins"]}


def reward_stats(net: RewardNet, pairs: list[Pair], pad_id: int, batch_size: int) -> dict[str, float]:
    """Mean and population std of the rewards of every chosen and rejected training text."""
    rc, rr = score_pairs(net, pairs, pad_id, batch_size)
    r = torch.cat([rc, rr]).double()
    return {"mean": float(r.mean()), "std": float(r.std(unbiased=False))}


# ---------------------------------------------------------------------------------------------
# Save: a folder rlhfkit.rewards.RewardModel loads
# ---------------------------------------------------------------------------------------------


def save_reward_model(net: RewardNet, tok, out, stats: dict, cfg: Config,
                      state_dict: Optional[dict[str, torch.Tensor]] = None) -> None:
    """``state_dict``: ``net``'s weights gathered from shards (``Engine.saved_state()`` under
    ``train.strategy=fsdp``), saved instead of the module's own (sharded) tensors."""
    from pathlib import Path

    from safetensors.torch import save_file

    from rlhfkit.models import merged_copy

    out = Path(out)
    backbone = net.backbone
    weights = None if state_dict is None else {k[len("backbone."):]: v for k, v in state_dict.items()
                                               if k.startswith("backbone.")}
    if hasattr(backbone, "peft_config"):
        backbone.save_pretrained(out / "adapter", safe_serialization=True,
                                 **({"state_dict": weights} if weights else {}))
        backbone = (merge_dequantized(backbone, out / "adapter") if is_quantized(backbone)  # QLoRA: dequantise
                    else merged_copy(backbone, weights))
        weights = None
    backbone.save_pretrained(out, safe_serialization=True, **({"state_dict": weights} if weights else {}))
    tok.save_pretrained(out)
    spec = {"kind": "classifier", "max_length": cfg.model.max_length}
    if net.value_head is not None:
        head = (net.value_head.state_dict() if state_dict is None else
                {k[len("value_head."):]: v for k, v in state_dict.items() if k.startswith("value_head.")})
        save_file({k: v.detach().cpu().contiguous() for k, v in head.items()}, str(out / "value_head.safetensors"))
        spec = {"kind": "lm_value_head", "model_type": "seq2seq" if backbone.config.is_encoder_decoder else "causal",
                "hf_model_type": backbone.config.model_type, "max_length": cfg.model.max_length}
    atomic_write_json(out / REWARD_SPEC, spec)
    atomic_write_json(out / "reward_stats.json", stats)


# ---------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------


def run(cfg: Config, resume: bool = False) -> dict:
    head = resolve_head(cfg)
    seed_everything(cfg.train.seed)  # the new head's initial weights
    net, tok = build_net(cfg, head, pick_device(cfg.train.cpu))
    append_eos = head == "value_head"
    data = load_data(cfg, lambda table, stats: tokenize(pair_texts(table, cfg, tok, stats), tok, cfg, append_eos, stats))
    train, held = data.train, data.held
    logger.info(f"reward: {head} head on {cfg.model.name_or_path}; {len(train)} training pairs, {len(held)} held-out pairs")

    with_margin = cfg.margin_column is not None
    engine, batcher = make_engine(cfg, "reward", net, [len(p) for p in train], data, resume, EVAL_METRICS)
    engine.extra_summary["head"] = head

    def train_step(step_idx: list[list[int]]) -> dict:
        micro = [collate_pairs([train[i] for i in idx], tok.pad_token_id, with_margin) for idx in step_idx]
        return engine.step(reward_loss, micro, [float(len(mb["input_ids"]) // 2) for mb in micro])

    def evaluate() -> Optional[dict]:
        if not held:
            return None
        return heldout_metrics(engine.unwrapped(), held, tok.pad_token_id, cfg.eval.batch_size)

    def stats() -> dict[str, float]:  # every process: a forward of the (sharded) model
        return reward_stats(engine.unwrapped(), train, tok.pad_token_id, cfg.eval.batch_size)

    def save(out, stats_rm):
        save_reward_model(engine.unwrapped(), tok, out, stats_rm, cfg, state_dict=engine.saved_state())

    start, end = train_and_evaluate(engine, batcher, cfg, train_step, evaluate, save, prepare=stats)
    stats_rm = stats()
    extra: dict = {"pairs": engine.samples * engine.world_size // 2, "reward_mean": stats_rm["mean"],
                   "reward_std": stats_rm["std"]}
    if start is not None and end is not None:
        logger.info(f"reward: held-out accuracy {start['eval/accuracy']:.3f} -> {end['eval/accuracy']:.3f}, "
                    f"mean margin {start['eval/margin']:.3f} -> {end['eval/margin']:.3f}")
    logger.info(f"reward: training-set rewards mean {stats_rm['mean']:.4f} std {stats_rm['std']:.4f} (reward_stats.json)")
    return engine.finish((lambda out: save(out, stats_rm)) if cfg.train.save_model else None, extra)


__all__ = ["Config", "RewardNet", "run", "reward_loss", "pair_prefix_lens", "heldout_metrics", "reward_stats", "save_reward_model"]
