"""Offline RL from scored samples: ILQL, and filtered behaviour cloning as the baseline.

ILQL (Snell et al. 2022, "Offline RL for Natural Language Generation with Implicit Language Q
Learning"), as trlX implemented it. The data are samples of some behaviour policy with one scalar
reward each. Each completion token is an action a_t taken in state s_t (the prompt and the
completion so far); the reward sits on the last action, the episode ends after it. On the shared
backbone sit two per-vocabulary Q heads Q_1, Q_2 (hidden -> vocab), their target copies and a
scalar V head. The loss (``rlhfkit.losses.ilql_loss``) is

    sum_i (Q_i(s_t, a_t) - r_t - gamma V(s_{t+1}))^2                    TD, V(terminal) = 0
  + expectile_tau(min_i Q_target_i(s_t, a_t) - V(s_t))                  V -> upper expectile of Q
  + alpha * sum_i CE(softmax Q_i(s_t, .), a_t)                          CQL (the paper's eq. 5)
  + awac_weight * CE(pi(.|s_t), a_t) exp(awac_beta A)                   the policy: (A)WAC / BC

all averaged over the completion tokens of the batch (prompt tokens are states, never actions).
After every ``sync_every`` optimizer steps the target heads move towards the Q heads by Polyak
averaging, Q_target <- tau_target Q + (1 - tau_target) Q_target (``tau_target=1``: a hard copy).
Decoding samples from the policy's log-probs shifted by the learned advantage,

    log pi(a|s) + beta (min_i Q_target_i(s, a) - V(s)),  then temperature and top-k,

(the paper's section 4.3, trlX's ``ILQLModel.generate``); ``beta=0`` is the plain policy.

Deliberate deviations from trlX:
- the heads default to one linear map each (``heads=linear``); trlX's two-layer MLP
  (hidden -> 2 hidden -> out) is ``heads=mlp``. The two Q heads are one module;
- in training the target heads are evaluated only at the taken actions (the loss needs nothing
  else), never over the whole vocabulary;
- the target heads move every step, by 5% (``tau_target=0.05``, ``sync_every=1``). trlX's
  setting (``alpha=0.001`` every 5 steps) is ``tau_target=0.001 sync_every=5``; IQL's is
  ``tau_target=0.005``. Such slow targets suit runs of many thousands of steps: the reward on the
  last token reaches early states through V, which chases the target Q, so a lagging target
  slows every step of that chain. On the one-word reward of tests/test_ilql.py (600 rows, 300
  steps) beta=4 decoding reached 0.95-0.98 with 0.05 against 0.29-0.72 with 0.005 (behaviour 0.26-0.30);
- reward normalisation (trlX always standardised the returns) is ``normalize_rewards``;
- dropout is off by default (``disable_dropout``, TRL's default for RL fine-tuning).

``method: filtered_bc`` is the simple offline baseline: keep the ``top_fraction`` of the samples
with the highest reward and fine-tune on them with the SFT loss (``rlhfkit.recipes.sft.nll_loss``).

Data: rows with a ``text`` column (the whole sample is the completion; the start token is the only
state before it), or ``prompt`` (or ``data.prompt_template``) + ``output``; plus a numeric
``reward``. Every name is mappable with ``data.columns``, e.g. ``{output: completion, reward: score}``.

Steps: data -> tokenize -> for each optimizer step: micro-batches -> heads -> ILQL loss ->
engine.step -> target sync. The held-out loss and its parts (``eval/loss``, ``eval/loss/q``, ...,
``eval/advantage/mean``, the mean of min_i Q_target_i - V over the taken actions) are measured
before training, every ``eval.every`` steps and at the end; then, when ``eval_reward`` is set,
held-out prompts are decoded at every ``eval_betas`` and scored.

Python: ``train_offline(model, samples, rewards, config=None, **overrides) -> model``.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import numbers
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from rlhfkit import losses
from rlhfkit.config import (
    DataConfig, EvalConfig, GenerationConfig, LoraConfig, ModelConfig, RewardConfig, TrainConfig, UserError,
    check_best_metric, from_dict, make_config, validate,
)
from rlhfkit.data import (
    DataStats, Example, Table, check_some_kept, build_prompt, collate, encode_completion, encode_prompt, fit_lengths,
    parse_rows, require_text,
)
from rlhfkit.distributed import unsharded
from rlhfkit.engine import Engine
from rlhfkit.models import (
    apply_lora, disable_dropout, fuse_gelu, is_seq2seq_config, left_pad_positions, load_policy, save_pretrained,
    unwrap,
)
from rlhfkit.policy import PolicyModel, hidden_size
from rlhfkit.recipes._offline import OfflineData, load_data, make_engine, train_and_evaluate
from rlhfkit.utils import atomic_write_json, atomic_write_jsonl, keep_freed_memory, logger, seed_everything

HEADS_FILE = "ilql_heads.safetensors"
HEADS_CONFIG = "ilql_heads.json"


ILQL_EVAL_METRICS = ["eval/loss", "eval/loss/q", "eval/loss/v", "eval/loss/cql", "eval/loss/awac", "eval/qvalues/mean",
                     "eval/values/mean", "eval/advantage/mean"]
BC_EVAL_METRICS = ["eval/loss"]


@dataclass
class Config:
    RENAMED: ClassVar[dict[str, str]] = {"train.eval_every": "eval.every", "eval_max_prompts": "eval.max_rows"}
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy (backbone) to train."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters on the backbone (off: full fine-tune). The ILQL heads are always trained in full."""
    data: DataConfig = field(default_factory=DataConfig)
    """Rows with ``text`` (or ``prompt``/``prompt_template`` + ``output``) and a numeric ``reward``;
    map other column names with ``data.columns``."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-4))
    """Optimizer, schedule, steps and output."""
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(max_rows=64))
    """Held-out evaluation: ``every`` N steps (and at the start and the end) the held-out loss and its
    parts (``eval/loss``, ``eval/loss/q``, ..., ``eval/advantage/mean``; ``filtered_bc``: the NLL) on at
    most ``max_rows`` held-out rows, ``batch_size`` rows per forward; at the end, with
    ``eval_reward``, decoding for at most ``max_rows`` held-out prompts per beta."""
    method: Literal["ilql", "filtered_bc"] = "ilql"
    """``ilql``, or ``filtered_bc``: fine-tune on the ``top_fraction`` best samples with the SFT loss."""
    gamma: float = 0.99
    """Discount of the TD target r + gamma V(s')."""
    tau: float = 0.7
    """Expectile of the V loss (0.5: V is the mean of Q; towards 1: its maximum)."""
    cql_weight: float = 0.1
    """Weight of the CQL term (the paper's alpha, trlX's ``cql_scale``)."""
    awac_weight: float = 1.0
    """Weight of the policy (NLL) term (trlX's ``awac_scale``)."""
    awac_beta: float = 0.0
    """Advantage weighting of the policy term, exp(awac_beta A) (trlX's ``beta``; 0: plain behaviour
    cloning, trlX's setting)."""
    two_qs: bool = True
    """Two Q heads, the minimum of their targets used for V and decoding (clipped double Q)."""
    heads: Literal["linear", "mlp"] = "linear"
    """Head shape: ``linear`` (hidden -> vocab, hidden -> 1) or ``mlp`` (trlX's hidden -> 2 hidden ->
    ReLU -> out)."""
    tau_target: float = 0.05
    """Polyak rate of the target Q heads: Q_target <- tau_target Q + (1 - tau_target) Q_target
    (trlX's ``alpha``); 1 copies the Q heads."""
    sync_every: int = 1
    """Optimizer steps between target updates (trlX's ``steps_for_target_q_sync``)."""
    normalize_rewards: bool = True
    """Standardise the rewards over the training rows (mean 0, std 1) before training, as trlX does."""
    disable_dropout: bool = True
    """Set every dropout of the model (LoRA's included) to 0 for both methods, as TRL's RL trainers
    do: Q, target Q and V then see one deterministic network (trlX kept the model's dropout)."""
    top_fraction: float = 0.1
    """``filtered_bc``: fraction of the training rows (highest reward first) kept for fine-tuning."""
    beta: float = 1.0
    """Advantage scale of the decoding that ``train_offline``'s model uses by default."""
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(top_k=20, max_new_tokens=32))
    """Decoding for evaluation (temperature, top_k, max_new_tokens; the shift comes first)."""
    eval_reward: list[RewardConfig] = field(default_factory=list)
    """Rewards (summed with their weights) that score decoded held-out samples at the end; empty: no
    decoding evaluation."""
    eval_betas: list[float] = field(default_factory=lambda: [0.0, 1.0, 4.0])
    """``ilql``: the advantage scales evaluated (``filtered_bc`` decodes the plain policy only)."""

    def validate(self) -> None:
        check_best_metric(self.train, f"ilql (method={self.method})", eval_metrics(self))
        if not 0.0 <= self.gamma <= 1.0:
            raise UserError(f"gamma must be in [0, 1], got {self.gamma}")
        if not 0.0 < self.tau < 1.0:
            raise UserError(f"tau (the expectile) must be in (0, 1), got {self.tau}")
        if not 0.0 < self.tau_target <= 1.0:
            raise UserError(f"tau_target must be in (0, 1], got {self.tau_target}")
        if self.sync_every < 1:
            raise UserError(f"sync_every must be >= 1, got {self.sync_every}")
        if not 0.0 < self.top_fraction <= 1.0:
            raise UserError(f"top_fraction must be in (0, 1], got {self.top_fraction}")
        if self.cql_weight < 0 or self.awac_weight < 0:
            raise UserError("cql_weight and awac_weight must be >= 0")


def eval_metrics(cfg: Config) -> list[str]:
    """The metrics each held-out evaluation of ``cfg.method`` logs."""
    return ILQL_EVAL_METRICS if cfg.method == "ilql" else BC_EVAL_METRICS


# ---------------------------------------------------------------------------------------------
# Data: (prompt, output, reward) rows -> tokenized examples
# ---------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One scored behaviour sample (text)."""

    prompt: str
    output: str
    reward: float


@dataclass
class ScoredExample(Example):
    """A tokenized sample with its (possibly normalised) reward."""

    reward: float = 0.0


def read_reward(table: Table, i: int, cfg: DataConfig) -> float:
    col = cfg.columns.get("reward", "reward")
    row = table.rows[i]
    if col not in row:
        raise UserError(f"{table.where(i)}: missing column '{col}' (columns: {', '.join(map(str, row))})")
    value = row[col]
    if isinstance(value, str):  # csv
        try:
            value = float(value)
        except ValueError:
            raise UserError(f"{table.where(i)}: column '{col}' must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise UserError(f"{table.where(i)}: column '{col}' must be a finite number, got {value!r}")
    return float(value)


def offline_samples(table: Table, cfg: DataConfig, tokenizer, stats: DataStats) -> list[Sample]:
    """Samples from rows: ``text`` alone, or ``prompt`` (or the template) + ``output``; and ``reward``."""
    text_col, prompt_col = cfg.columns.get("text", "text"), cfg.columns.get("prompt", "prompt")

    def parse(i: int, row: dict) -> Sample:
        if text_col in row and prompt_col not in row and cfg.prompt_template is None:
            prompt, output = "", require_text(table, i, "text", cfg)
        else:
            prompt, output = build_prompt(table, i, cfg, tokenizer), require_text(table, i, "output", cfg)
        return Sample(prompt, output, read_reward(table, i, cfg))

    return parse_rows(table, cfg, stats, parse)


def prompt_ids(tokenizer, prompt: str, is_seq2seq: bool) -> list[int]:
    """Prompt token ids; a sample without a prompt (``text`` rows) starts from BOS (EOS when the
    tokenizer has none), the state before its first action. Training and decoding both use this."""
    ids = encode_prompt(tokenizer, prompt, is_seq2seq) if prompt else []
    if ids:
        return ids
    return [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]


def tokenize_samples(samples: Sequence[Sample], tokenizer, cfg: DataConfig, max_length: int, is_seq2seq: bool,
                     stats: DataStats) -> list[ScoredExample]:
    """Tokenize; the completion ends with EOS (the last action, which carries the reward)."""
    out = []
    for s in samples:
        fitted = fit_lengths(prompt_ids(tokenizer, s.prompt, is_seq2seq),
                             encode_completion(tokenizer, s.output, is_seq2seq), cfg, max_length, stats, is_seq2seq)
        if fitted is not None:
            out.append(ScoredExample(fitted[0], fitted[1], s.reward))
    if stats.truncated or stats.dropped_overlong:
        logger.info(f"over-long rows: {stats.truncated} truncated, {stats.dropped_overlong} dropped (data.overlong)")
    check_some_kept(out, stats, cfg, max_length)
    return out


def collate_scored(examples: Sequence[ScoredExample], pad_id: int, is_seq2seq: bool) -> dict[str, torch.Tensor]:
    """``rlhfkit.data.collate`` plus ``rewards`` (B,)."""
    batch = collate(list(examples), pad_id, is_seq2seq)
    batch["rewards"] = torch.tensor([e.reward for e in examples], dtype=torch.float32)  # (B,)
    return batch


def terminal_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) per-action rewards: each row's reward on its last real action, 0 elsewhere."""
    last = (mask.long().sum(1) - 1).clamp(min=0)  # (B,)
    out = torch.zeros(mask.shape, dtype=rewards.dtype, device=rewards.device)  # (B, T)
    return out.scatter(1, last[:, None], rewards[:, None])


# ---------------------------------------------------------------------------------------------
# The model: backbone + Q heads, target Q heads and V head on the LM head's input
# ---------------------------------------------------------------------------------------------


class QHeads(nn.Module):
    """``n_q`` per-vocabulary Q heads in one module: Q_i(h) = W_i f(h) + b_i with f(h) = h
    (``linear``) or f(h) = ReLU(W1 h + b1) (``mlp``, width 2 hidden per head, trlX's make_head).

    ``forward(h)`` gives every head's (..., V) Q-values; ``at(h, actions)`` only the Q-values of
    the given actions (n_q, ...), a gather of weight rows instead of a (..., V) product.
    """

    def __init__(self, hidden: int, vocab: int, n_q: int, mlp: bool):
        super().__init__()
        self.n_q, self.vocab, self.mlp = n_q, vocab, mlp
        self.width = 2 * hidden if mlp else hidden
        if mlp:
            self.w1 = nn.Parameter(torch.empty(n_q * self.width, hidden))
            self.b1 = nn.Parameter(torch.empty(n_q * self.width))
            _uniform_init(self.w1, self.b1, hidden)
        # one (V, width) matrix per head, not one (n_q, V, width) tensor: a slice's gradient would
        # zero-fill and copy the whole tensor for every head
        self.weight = nn.ParameterList([nn.Parameter(torch.empty(vocab, self.width)) for _ in range(n_q)])
        self.bias = nn.ParameterList([nn.Parameter(torch.empty(vocab)) for _ in range(n_q)])
        for w, b in zip(self.weight, self.bias):
            _uniform_init(w, b, self.width)

    def features(self, h: torch.Tensor) -> list[torch.Tensor]:
        """f(h) of each head: (..., width)."""
        h = h.to(self.weight[0].dtype)
        if not self.mlp:
            return [h] * self.n_q
        z = F.relu(F.linear(h, self.w1, self.b1))  # (..., n_q * width)
        return list(z.split(self.width, dim=-1))

    def forward(self, h: torch.Tensor) -> list[torch.Tensor]:
        return [F.linear(f, self.weight[i], self.bias[i]) for i, f in enumerate(self.features(h))]  # each (..., V)

    def at(self, h: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """(n_q, ...) Q_i(h, a) for ``actions`` (...) aligned with ``h`` (..., hidden)."""
        return torch.stack([(f * self.weight[i][actions]).sum(-1) + self.bias[i][actions]
                            for i, f in enumerate(self.features(h))])


def _uniform_init(weight: nn.Parameter, bias: nn.Parameter, fan_in: int) -> None:
    """nn.Linear's default initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(weight, -bound, bound)
    nn.init.uniform_(bias, -bound, bound)


class ILQLHeads(nn.Module):
    """Q heads, their target copies (no gradient) and the V head."""

    def __init__(self, hidden: int, vocab: int, two_qs: bool = True, kind: str = "linear"):
        super().__init__()
        self.spec = {"hidden": hidden, "vocab": vocab, "two_qs": two_qs, "kind": kind}
        self.q = QHeads(hidden, vocab, 2 if two_qs else 1, kind == "mlp")
        self.target_q = copy.deepcopy(self.q).requires_grad_(False)
        if kind == "mlp":
            self.v = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, 1))
        else:
            self.v = nn.Linear(hidden, 1)

    def value(self, h: torch.Tensor) -> torch.Tensor:
        return self.v(h.to(self.q.weight[0].dtype)).squeeze(-1)

    @torch.no_grad()
    def sync_target(self, tau: float) -> None:
        """Q_target <- tau Q + (1 - tau) Q_target (Polyak averaging; tau = 1 copies)."""
        for t, p in zip(self.target_q.parameters(), self.q.parameters()):
            t.lerp_(p, tau)

    @torch.no_grad()
    def advantage(self, h: torch.Tensor) -> torch.Tensor:
        """(..., V) min_i Q_target_i(s, .) - V(s): the decoding shift."""
        tq = torch.stack(self.target_q(h)).min(dim=0).values  # (..., V)
        return tq - self.value(h)[..., None]


def _to_grid(x: torch.Tensor, mask: torch.Tensor, full: bool) -> torch.Tensor:
    """(N, ...) rows of the true positions of ``mask`` (B, T) -> (B, T, ...), zeros elsewhere."""
    if full:
        return x.view(*mask.shape, *x.shape[1:])
    out = x.new_zeros(*mask.shape, *x.shape[1:])
    return out.index_put(tuple(mask.nonzero().T), x)


@contextmanager
def lm_head_input(hf: nn.Module):
    """Record the input of the model's output embedding (its last hidden state as the LM head sees
    it, e.g. after T5's rescaling) in ``store["h"]`` during the forwards inside the block."""
    store: dict[str, torch.Tensor] = {}
    handle = hf.get_output_embeddings().register_forward_pre_hook(lambda _m, args: store.__setitem__("h", args[0]))
    try:
        yield store
    finally:
        handle.remove()


class ILQLModel(nn.Module):
    """A causal or encoder-decoder LM with ILQL heads.

    ``forward`` takes a batch in the shared training layout (``rlhfkit.data.collate``) and returns,
    for the completion columns only (column t = action t in state s_t): ``logits`` (B, T, V),
    ``q`` (one or two (B, T, V)), ``q_taken`` and ``target_q`` (one or two (B, T) each: Q and
    target Q of the actions), ``values`` (B, T), ``actions`` (B, T) and ``mask`` (B, T).
    ``generate(prompts, beta=...)`` decodes with the advantage shift (needs ``tokenizer``).
    """

    def __init__(self, lm: nn.Module, heads: Optional[ILQLHeads] = None, two_qs: bool = True, kind: str = "linear",
                 tokenizer=None, generation: Optional[GenerationConfig] = None, beta: float = 1.0):
        super().__init__()
        self.lm = lm
        hf = unwrap(lm)
        self.is_seq2seq = is_seq2seq_config(hf.config)
        vocab = hf.get_output_embeddings().weight.shape[0]
        self.heads = heads if heads is not None else ILQLHeads(hidden_size(hf.config), vocab, two_qs, kind)
        self.heads.to(next(lm.parameters()).device)
        c = hf.config  # as PolicyModel: a head that is more than a linear map takes the model's own forward
        self._plain_head = (not self.is_seq2seq and not getattr(c, "final_logit_softcapping", None)
                            and not getattr(c, "logit_scale", None))
        self.tokenizer = tokenizer
        self.generation = generation or GenerationConfig(top_k=20, max_new_tokens=32)
        self.beta = beta

    @property
    def config(self):
        return unwrap(self.lm).config

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                decoder_attention_mask: Optional[torch.Tensor] = None, **_: object) -> dict[str, Any]:
        hf = unwrap(self.lm)
        logits = None
        if self.is_seq2seq:
            mask = labels != -100  # (B, T)
            dec_in = hf.prepare_decoder_input_ids_from_labels(labels=labels.masked_fill(~mask, 0))
            with lm_head_input(hf) as cap:
                logits = self.lm(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=dec_in,
                                 decoder_attention_mask=decoder_attention_mask, use_cache=False).logits  # (B, T, V)
            hidden = cap["h"]  # (B, T, H)
            actions = labels
        else:
            # collate's layout: every completion starts at column P; hidden state t - 1 predicts token t
            P = int((labels != -100).any(0).long().argmax())
            position_ids = None
            if attention_mask is not None:  # left padding: count from each row's first real token
                position_ids = left_pad_positions(attention_mask)  # (B, T)
            if self._plain_head:  # the LM head runs below, on the real actions only
                h = hf.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  use_cache=False).last_hidden_state  # (B, T, H)
            else:
                with lm_head_input(hf) as cap:
                    logits = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                     use_cache=False).logits[:, P - 1: -1]  # (B, C, V)
                h = cap["h"]
            hidden = h[:, P - 1: -1]  # (B, C, H)
            actions = labels[:, P:]  # (B, C)
            mask = actions != -100
        # heads (and the LM head) only where there is an action: padding costs no vocabulary product
        full = bool(mask.all())
        h_act = hidden.reshape(-1, hidden.shape[-1]) if full else hidden[mask]  # (N, H)
        if logits is None:
            logits = _to_grid(hf.get_output_embeddings()(h_act), mask, full)  # (B, T, V)
        safe = actions.masked_fill(~mask, 0)  # (B, T) any id for padding; the losses mask it
        with torch.no_grad():
            target_q = list(self.heads.target_q.at(hidden.detach(), safe).unbind(0))  # each (B, T)
        return {"logits": logits, "q": [_to_grid(q, mask, full) for q in self.heads.q(h_act)],
                "q_taken": list(self.heads.q.at(hidden, safe).unbind(0)), "target_q": target_q,
                "values": self.heads.value(hidden), "actions": safe, "mask": mask}

    def shifted(self, beta: float) -> "AdvantageShiftedLM":
        return AdvantageShiftedLM(self, beta)

    def generate(self, prompts: Sequence[str], beta: Optional[float] = None, tokenizer=None, seed: Optional[int] = None,
                 **generation: Any) -> list[str]:
        """Completions for ``prompts`` sampled from log pi + beta (min Q_target - V).

        ``beta`` defaults to the model's ``beta``; ``generation`` overrides fields of its
        ``GenerationConfig`` (``temperature``, ``top_k``, ``max_new_tokens``, ...).
        """
        tok = tokenizer or self.tokenizer
        if tok is None:
            raise UserError("ILQLModel.generate needs a tokenizer (pass tokenizer=...)")
        gen = dataclasses.replace(self.generation, **generation)
        validate(gen)
        beta = self.beta if beta is None else beta
        return decode(self.shifted(beta), tok, prompts, gen, seed=seed)

    def save_pretrained(self, out_dir: Union[str, Path], tokenizer=None, merge: bool = False,
                        state_dict: Optional[dict[str, torch.Tensor]] = None) -> None:
        """The LM in Hugging Face format (adapter-only for LoRA) plus ``ilql_heads.safetensors``.
        ``state_dict``: this model's weights gathered from shards (``lm.*``, ``heads.*``), saved
        instead of its own tensors."""
        from safetensors.torch import save_file

        lm_state = heads = None
        if state_dict is not None:
            lm_state = {k[3:]: v for k, v in state_dict.items() if k.startswith("lm.")}
            heads = {k[6:]: v for k, v in state_dict.items() if k.startswith("heads.")}
        save_pretrained(self.lm, tokenizer or self.tokenizer, out_dir, merge=merge, state_dict=lm_state)
        state = {k: v.detach().cpu().contiguous() for k, v in (heads or self.heads.state_dict()).items()}
        save_file(state, str(Path(out_dir) / HEADS_FILE))
        atomic_write_json(Path(out_dir) / HEADS_CONFIG, {**self.heads.spec, "beta": self.beta,
                                                        "generation": dataclasses.asdict(self.generation)})


class AdvantageShiftedLM(nn.Module):
    """The LM seen by ``rlhfkit.generation.generate``: its ``generate`` adds the ILQL shift as the first
    logits processor (before the sampler's temperature, top-k and top-p)."""

    def __init__(self, model: ILQLModel, beta: float):
        super().__init__()
        self.model = model
        self.beta = beta

    @property
    def config(self):
        return self.model.config

    def generate(self, **kwargs: Any) -> torch.Tensor:
        from transformers import LogitsProcessor, LogitsProcessorList

        heads, beta = self.model.heads, self.beta
        hf = unwrap(self.model.lm)
        if beta == 0:
            return self.model.lm.generate(**kwargs)

        with lm_head_input(hf) as cap:
            class Shift(LogitsProcessor):
                def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
                    h = cap["h"][:, -1]  # (B, H) the state whose next token is drawn
                    return F.log_softmax(scores.float(), dim=-1) + beta * heads.advantage(h).float()  # (B, V)

            after = kwargs.pop("logits_processor", None) or []  # rollout's NucleusSampler when sampling
            return self.model.lm.generate(**kwargs, logits_processor=LogitsProcessorList([Shift(), *after]))


@torch.no_grad()
def decode(model: nn.Module, tokenizer, prompts: Sequence[str], gen: GenerationConfig,
           seed: Optional[int] = None) -> list[str]:
    """Completions (text) for ``prompts`` from a ``PolicyModel`` or an ``ILQLModel.shifted(beta)``,
    ``gen.batch_size`` prompts of similar length at a time (``rlhfkit.generation.generate_ids``)."""
    from rlhfkit.generation import generate_ids, sample_max_new_tokens

    seq2seq = is_seq2seq_config(model.config)
    if seed is not None:
        torch.manual_seed(seed)
    rng = random.Random(seed)
    ids = [prompt_ids(tokenizer, p, seq2seq) for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = [""] * len(ids)
    for s in range(0, len(order), gen.batch_size):
        chunk = order[s: s + gen.batch_size]
        responses = generate_ids(model, tokenizer, [ids[i] for i in chunk], gen, sample_max_new_tokens(gen, rng))
        for i, r in zip(chunk, responses):
            out[i] = tokenizer.decode(r, skip_special_tokens=True).strip()
    return out


def load_ilql(path: str, device: Optional[torch.device] = None, model_cfg: Optional[ModelConfig] = None) -> ILQLModel:
    """An ``ILQLModel`` saved by ``rlhfkit ilql`` (or ``ILQLModel.save_pretrained``), ready to decode."""
    from safetensors.torch import load_file

    folder = Path(path)
    if not (folder / HEADS_FILE).is_file():
        raise UserError(f"{folder}: no {HEADS_FILE} (not an ILQL output folder)")
    spec = json.loads((folder / HEADS_CONFIG).read_text())
    mcfg = model_cfg or ModelConfig(name_or_path=str(folder))
    if (folder / "adapter_config.json").is_file():
        base = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
        model, tok = load_policy(dataclasses.replace(mcfg, name_or_path=base, tokenizer=str(folder)),
                                 LoraConfig(enabled=True, adapter_path=str(folder)), device)
    else:
        model, tok = load_policy(mcfg, None, device)
    heads = ILQLHeads(spec["hidden"], spec["vocab"], spec["two_qs"], spec["kind"])
    heads.load_state_dict(load_file(str(folder / HEADS_FILE)))
    gen = from_dict(GenerationConfig, spec.get("generation", {}), source=str(folder / HEADS_CONFIG))
    return ILQLModel(model, heads, tokenizer=tok, generation=gen, beta=spec.get("beta", 1.0)).eval()


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


def ilql_batch_loss(model: nn.Module, batch: dict, cfg: Config) -> tuple[torch.Tensor, dict]:
    """ILQL on one micro-batch: heads forward, then ``rlhfkit.losses.ilql_loss`` over its actions."""
    out = model(**batch)
    rewards = terminal_rewards(batch["rewards"], out["mask"])  # (B, T)
    return losses.ilql_loss(out["logits"], out["q"], out["target_q"], out["values"], out["actions"], rewards,
                            out["mask"], gamma=cfg.gamma, tau=cfg.tau, alpha=cfg.cql_weight,
                            awac_weight=cfg.awac_weight, awac_beta=cfg.awac_beta, q_taken=out["q_taken"])


def top_samples(examples: list[ScoredExample], fraction: float) -> list[ScoredExample]:
    """The ceil(fraction n) examples with the highest reward (ties: earlier rows first)."""
    k = max(1, math.ceil(fraction * len(examples)))
    return sorted(examples, key=lambda e: -e.reward)[:k]


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


class _ILQLEngine(Engine):
    """The Engine, whose checkpoints also hold the target Q heads: they take no gradient, but move
    towards the Q heads (``sync_target``), so a resumed run needs them."""

    CHECKPOINT_FROZEN = ("heads.target_q.",)


def run(cfg: Config, resume: bool = False) -> dict:
    """``rlhfkit ilql``: train on the configured data; returns the summary."""
    seed_everything(cfg.train.seed)  # LoRA and head initialisation happen before the Engine seeds
    model, tok = load_policy(cfg.model, cfg.lora)
    data = load_data(cfg, lambda table, stats: offline_samples(table, cfg.data, tok, stats))
    return train_samples(cfg, model, tok, data.train, data.held, data.stats, resume, held_scored=True)[0]


@torch.no_grad()
def heldout_metrics(model: nn.Module, examples: list[ScoredExample], cfg: Config, pad_id: int, seq2seq: bool,
                    device: torch.device) -> dict[str, float]:
    """The training loss and its parts on held-out rows, in eval mode, weighted by completion tokens
    (``eval/loss``, ``eval/loss/q``, ...), and the mean advantage min_i Q_target_i(s, a) - V(s) of
    the taken actions (``eval/advantage/mean``); ``filtered_bc``: the NLL (``eval/loss``)."""
    from rlhfkit.recipes.sft import nll_loss

    was = model.training
    model.eval()
    sums: dict[str, float] = {}
    total = 0.0
    for s in range(0, len(examples), cfg.eval.batch_size):
        batch = {k: v.to(device) for k, v in
                 collate_scored(examples[s: s + cfg.eval.batch_size], pad_id, seq2seq).items()}
        n = float((batch["labels"] != -100).sum())  # completion tokens
        if isinstance(model, ILQLModel):
            out = model(**batch)
            rewards = terminal_rewards(batch["rewards"], out["mask"])  # (B, T)
            loss, metrics = losses.ilql_loss(out["logits"], out["q"], out["target_q"], out["values"], out["actions"],
                                             rewards, out["mask"], gamma=cfg.gamma, tau=cfg.tau, alpha=cfg.cql_weight,
                                             awac_weight=cfg.awac_weight, awac_beta=cfg.awac_beta,
                                             q_taken=out["q_taken"])
            target = torch.stack(out["target_q"]).min(0).values  # (B, T)
            metrics = {k: v for k, v in metrics.items() if f"eval/{k}" in ILQL_EVAL_METRICS}
            metrics["advantage/mean"] = float(losses.masked_mean(target - out["values"], out["mask"]))
        else:
            batch = {k: v for k, v in batch.items() if k != "rewards"}
            loss, metrics = nll_loss(model, batch)
        for k, v in {"loss": float(loss), **metrics}.items():
            sums[k] = sums.get(k, 0.0) + float(v) * n
        total += n
    model.train(was)
    return {f"eval/{k}": v / max(total, 1.0) for k, v in sums.items()}


def train_samples(cfg: Config, model: nn.Module, tok, samples: list[Sample], held: list[Sample],
                  stats: Optional[DataStats] = None, resume: bool = False,
                  held_scored: bool = False) -> tuple[dict, nn.Module]:
    """Train ``model`` (a loaded HF or peft model) on ``samples``; returns (summary, trained model:
    an ``ILQLModel`` for ``ilql``, the ``PolicyModel`` for ``filtered_bc``). ``held_scored``: the
    held-out samples carry rewards, so the held-out loss is measured (else they only give prompts to
    the end-of-run decoding)."""
    stats = stats or DataStats(rows=len(samples))
    keep_freed_memory()
    fuse_gelu(model)
    if cfg.disable_dropout:
        disable_dropout(model)
    seq2seq = is_seq2seq_config(unwrap(model).config)
    if not samples:
        raise UserError(f"{cfg.data.path or 'samples'}: no training rows")
    examples = tokenize_samples(samples, tok, cfg.data, cfg.model.max_length, seq2seq, stats)
    held_examples = tokenize_samples(held[: cfg.eval.max_rows], tok, cfg.data, cfg.model.max_length, seq2seq,
                                     DataStats()) if held_scored and held else []
    raw = torch.tensor([e.reward for e in examples], dtype=torch.float64)
    extra: dict[str, Any] = {"method": cfg.method, "behaviour_reward_mean": float(raw.mean()),
                             "behaviour_reward_std": float(raw.std()) if len(raw) > 1 else 0.0}

    if cfg.method == "filtered_bc":
        from rlhfkit.recipes.sft import nll_loss

        examples = top_samples(examples, cfg.top_fraction)
        extra["kept_rows"] = len(examples)
        extra["kept_reward_min"] = min(e.reward for e in examples)
        logger.info(f"filtered_bc: kept the best {len(examples)} of {len(raw)} rows "
                    f"(reward >= {extra['kept_reward_min']:.4g})")
        policy: nn.Module = PolicyModel(model)
        loss_fn = nll_loss
    else:
        if cfg.normalize_rewards:
            mean, std = float(raw.mean()), float(raw.std()) if len(raw) > 1 else 1.0
            std = std if std > 1e-8 else 1.0
            examples = [dataclasses.replace(e, reward=(e.reward - mean) / std) for e in examples]
            held_examples = [dataclasses.replace(e, reward=(e.reward - mean) / std) for e in held_examples]
            extra["reward_normalization"] = {"mean": mean, "std": std}
        seed_everything(cfg.train.seed)
        policy = ILQLModel(model, two_qs=cfg.two_qs, kind=cfg.heads, tokenizer=tok, generation=cfg.generation,
                           beta=cfg.beta)

        def loss_fn(m, batch):
            return ilql_batch_loss(m, batch, cfg)

    data = OfflineData(examples, held_examples, stats)
    engine, batcher = make_engine(cfg, "ilql", policy, [len(e) for e in examples], data, resume, eval_metrics(cfg),
                                  engine_cls=_ILQLEngine if cfg.method == "ilql" else Engine)
    logger.info(f"ilql: method {cfg.method}, {len(examples)} training rows, {len(held_examples)} held-out rows, "
                f"behaviour reward mean {extra['behaviour_reward_mean']:.4g}")

    def train_step(step_idx: list[list[int]]) -> dict:
        micro = [collate_scored([examples[i] for i in idx], tok.pad_token_id, seq2seq) for idx in step_idx]
        weights = [float((mb["labels"] != -100).sum()) for mb in micro]  # completion tokens
        metrics = engine.step(loss_fn, micro, weights)
        if cfg.method == "ilql" and (engine.step_count + 1) % cfg.sync_every == 0:
            engine.unwrapped().heads.sync_target(cfg.tau_target)
        return metrics

    def evaluate() -> Optional[dict]:
        if not held_examples:
            return None
        return heldout_metrics(engine.unwrapped(), held_examples, cfg, tok.pad_token_id, seq2seq, engine.device)

    def save(out: Path) -> None:
        trained = engine.unwrapped()
        if isinstance(trained, ILQLModel):  # gathered weights under fsdp / ZeRO-3 (saved_state)
            trained.save_pretrained(out, tok, merge=cfg.lora.merge_on_save, state_dict=engine.saved_state())
        else:
            save_pretrained(trained.lm, tok, out, merge=cfg.lora.merge_on_save, state_dict=engine.saved_state("lm."))

    train_and_evaluate(engine, batcher, cfg, train_step, evaluate, save)
    trained = engine.unwrapped()
    if cfg.eval_reward:
        extra["eval_reward"] = evaluate_decoding(trained, tok, cfg, held or samples, engine)
    summary = engine.finish(save if cfg.train.save_model else None, extra)
    return summary, trained


def evaluate_decoding(model: nn.Module, tok, cfg: Config, samples: list[Sample],
                      engine: Optional[Engine] = None) -> dict:
    """Mean ``eval_reward`` of completions decoded for up to ``eval.max_rows`` distinct prompts, per
    beta (``filtered_bc``: the plain policy). Writes ``eval_samples.jsonl`` into the output folder."""
    from rlhfkit.rewards import build_reward

    reward = build_reward(cfg.eval_reward)
    n = cfg.eval.max_rows if cfg.eval.max_rows is not None else len(samples)
    prompts = list(dict.fromkeys(s.prompt for s in samples))[:n]
    if len(prompts) == 1:  # one shared prompt (or text rows): sample it eval.max_rows times
        prompts = prompts * n
    betas = cfg.eval_betas if isinstance(model, ILQLModel) else [0.0]
    results, rows = {}, []
    t0 = time.perf_counter()
    for beta in betas:
        shown = model.shifted(beta) if isinstance(model, ILQLModel) else model
        with unsharded(engine.model if engine is not None else model):  # fsdp: the root's weights (heads)
            outs = decode(shown, tok, prompts, cfg.generation, seed=cfg.train.seed)
        scores = reward(prompts, outs)
        results[f"beta={beta:g}"] = sum(scores) / len(scores)
        rows += [{"beta": beta, "prompt": p, "completion": c, "reward": r} for p, c, r in zip(prompts, outs, scores)]
        logger.info(f"ilql: eval reward {results[f'beta={beta:g}']:.4g} at beta={beta:g} ({len(prompts)} samples)")
    if engine is not None:
        engine.log({f"eval/reward/{k}": v for k, v in results.items()})
        if engine.is_main:
            atomic_write_jsonl(engine.out / "eval_samples.jsonl", rows)
        engine.log_table("eval/samples", rows)
        engine.extra_summary["eval_seconds"] = round(time.perf_counter() - t0, 3)
    return results


# ---------------------------------------------------------------------------------------------
# Python API
# ---------------------------------------------------------------------------------------------


def train_offline(model: Union[str, nn.Module], samples: Sequence[Union[str, tuple[str, str]]],
                  rewards: Sequence[float], config: Union[Config, dict, str, None] = None, *, tokenizer=None,
                  eval_samples: Optional[Sequence[Union[str, tuple[str, str]]]] = None,
                  **overrides: Any) -> nn.Module:
    """Offline RL on scored samples from Python (what ``rlhfkit.train(model, samples=..., rewards=...)``
    runs); returns the trained model.

    ``model``: a hub name or local folder, or a loaded Hugging Face model (causal or seq2seq,
    optionally a peft model) together with ``tokenizer=``. ``samples``: texts (the whole text is the
    completion) or ``(prompt, output)`` pairs; ``rewards``: one number per sample.
    ``config``: a ``Config``, a YAML file, or a dict of its fields (nested, or dotted keys such as
    ``{"train.lr": 1e-4}``); ``overrides`` replace fields of it: sections as dicts or dotted keys
    with ``__`` for ``.``, e.g. ``train_offline("gpt2", texts, scores, beta=2.0, train__lr=1e-4,
    train={"max_steps": 500}, eval_reward=[{"kind": "python", "function": "m:f"}])``.
    ``eval_samples`` (same form) give the prompts of the end-of-run evaluation.

    Returns an ``ILQLModel`` for ``method="ilql"``: ``.generate(prompts, beta=...)`` decodes with
    the advantage shift, ``.lm`` is the Hugging Face model, ``.save_pretrained(folder)`` writes the
    model and the heads. For ``method="filtered_bc"``, the fine-tuned Hugging Face model.
    The run's files (metrics, summary) go to ``train.output_dir``.
    """
    cfg = make_config(Config, config, source="train_offline(...)", **overrides)
    if isinstance(model, str):
        cfg.model.name_or_path = model
    if len(samples) != len(rewards):
        raise UserError(f"train_offline: {len(samples)} samples but {len(rewards)} rewards")

    seed_everything(cfg.train.seed)
    if isinstance(model, str):
        lm, tok = load_policy(cfg.model, cfg.lora)
    else:
        if tokenizer is None:
            raise UserError("train_offline: pass tokenizer= with a loaded model")
        lm, tok = model, tokenizer
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        if cfg.lora.enabled and not hasattr(lm, "peft_config"):
            lm = apply_lora(lm, cfg.lora)
    rows = [_as_sample(s, r, i) for i, (s, r) in enumerate(zip(samples, rewards))]
    held = [_as_sample(s, 0.0, i) for i, s in enumerate(eval_samples or [])]
    _, trained = train_samples(cfg, lm, tok, rows, held)
    return trained if isinstance(trained, ILQLModel) else trained.lm


def _as_sample(s: Union[str, tuple[str, str]], reward: float, i: int) -> Sample:
    if isinstance(s, str):
        return Sample("", s, float(reward))
    if isinstance(s, (tuple, list)) and len(s) == 2 and all(isinstance(x, str) for x in s):
        return Sample(s[0], s[1], float(reward))
    raise UserError(f"train_offline: sample {i} must be a text or a (prompt, output) pair, got {s!r:.80}")


__all__ = [
    "Config", "run", "train_offline", "train_samples", "evaluate_decoding", "heldout_metrics", "ILQLModel", "ILQLHeads", "QHeads",
    "AdvantageShiftedLM", "load_ilql", "decode", "prompt_ids", "ilql_batch_loss", "terminal_rewards", "top_samples",
    "offline_samples", "keep_freed_memory", "disable_dropout", "fuse_gelu",
    "tokenize_samples", "collate_scored", "Sample",
]
