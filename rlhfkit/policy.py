"""The training wrapper and the reference: per-token log-probs (and values) of labelled tokens.

``PolicyModel`` wraps a loaded language model (``rlhfkit.models.load_policy``) so every recipe
gets (B, T) log-probs, values and entropies of the tokens it labels, in one of three layouts
(padded, compact, prefix tree) tested equal to one plain transformers forward. ``Reference``
gives the same log-probs under the frozen reference policy (a disabled or frozen adapter on the
policy's own base, or a separate copy).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from rlhfkit.config import LoraConfig, ModelConfig, UserError
from rlhfkit.models import is_seq2seq_config, left_pad_positions, load_model, peft_quiet, unwrap

# ---------------------------------------------------------------------------------------------
# The training wrapper: per-token log-probs (and values) of the labelled tokens
# ---------------------------------------------------------------------------------------------


class ValueHead(nn.Module):
    """Scalar head on the last hidden state: V(s_t) (PPO) or r(x, y) read at the last token."""

    def __init__(self, hidden_size: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.summary.weight, std=1.0 / (hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(self.dropout(hidden.to(self.summary.weight.dtype))).squeeze(-1)


def hidden_size(hf_config) -> int:
    for key in ("hidden_size", "d_model", "n_embd"):
        if getattr(hf_config, key, None):
            return int(getattr(hf_config, key))
    raise UserError(f"cannot find the hidden size of model type '{hf_config.model_type}'")


class PolicyModel(nn.Module):
    """A language model (optionally with a value head) whose forward returns, for the tokens
    marked in ``labels``, their log-probs and optionally values and entropies.

    All outputs are (B, T) aligned with ``labels``: ``logps[b, t] = log p(labels[b, t] | tokens
    before t)``. For causal models the LM head is applied only at positions that predict a label,
    and log-softmax is taken in chunks, so the full (B, T, V) log-softmax never exists. Models
    whose head does more than a linear map (logit soft-capping, scaling) take the plain forward.
    Training loops wrap this module (not the bare LM) so DDP sees one forward.

    ``plain_forward`` is the reference semantics (one transformers forward, full log-softmax);
    ``forward`` computes the same numbers in one of three layouts, chosen per batch by
    ``choose_layout`` or passed by the code that builds the batch (``layout=``), each logged the
    first time it is used and tested equal to ``plain_forward`` in outputs and gradients.

    ``padded``: the batch as laid out (seq2seq always; causal rows when position ids are given).

    ``compact``: causal rows are compacted before the forward: each row's real tokens (``attention_mask``)
    move to the front, in order, so the model runs on (B, max real length) instead of (B, T).
    The shared layout of ``rlhfkit.data.collate`` (prompts left-padded, completions right-padded
    so all completions start at one column) otherwise costs up to twice the compute; the
    outputs are put back in the caller's layout, and position ids count real tokens either way,
    so only float rounding changes.

    ``prefix``: rows that share a prompt (the real tokens before the first label: DPO's chosen and rejected,
    GRPO's group of samples, KTO's row and its KL pair) go through one forward as a prefix tree
    (:func:`prefix_tree`): the prompt once, then each completion attending to the prompt and to
    itself; and rows (or groups) of different lengths are packed side by side into the tree rows,
    so padding costs nothing. This path is taken where it runs at least ``min_shared`` fewer token
    slots than the compacted padded batch and the model passes :func:`prefix_sharing_supported`.
    """

    def __init__(self, lm: nn.Module, value_head: bool = False, chunk_tokens: int = 2048, min_shared: float = 0.1):
        super().__init__()
        self.min_shared = min_shared
        self.lm = lm
        hf = unwrap(lm)
        self.is_seq2seq = is_seq2seq_config(hf.config)
        self.value_head = ValueHead(hidden_size(hf.config)) if value_head else None
        if self.value_head is not None:
            # V starts at 0 everywhere: a randomly initialised head on a pretrained backbone gives
            # values of std ~1 (SmolLM2), larger than the reward signal, and that noise would swamp
            # the first iterations' advantages. The weight still gets gradient (dV/dw = h).
            nn.init.zeros_(self.value_head.summary.weight)
            self.value_head.to(next(lm.parameters()).device)
        self.chunk_tokens = chunk_tokens
        self._layouts_seen: set[str] = set()
        c = hf.config
        self._plain_head = (not self.is_seq2seq and not getattr(c, "final_logit_softcapping", None)
                            and not getattr(c, "logit_scale", None) and hf.get_output_embeddings() is not None)

    @property
    def config(self):
        return unwrap(self.lm).config

    def plain_forward(self, input_ids: torch.Tensor, labels: torch.Tensor,
                      attention_mask: Optional[torch.Tensor] = None,
                      decoder_attention_mask: Optional[torch.Tensor] = None,
                      with_entropy: bool = False, **_: object) -> dict[str, torch.Tensor]:
        """The reference semantics of ``forward``: one transformers forward over the batch as laid
        out, the full (B, T, V) log-softmax, and the log-prob of each label. Causal: the state at
        t - 1 predicts token t (position ids count real tokens, as ``generate`` does for left
        padding) and V(s_t) is read from that same state; seq2seq: the decoder state at t. Every
        layout of ``forward`` computes exactly this, faster (tests/test_models.py)."""
        mask = labels != -100  # (B, T)
        hf = unwrap(self.lm)
        if self.is_seq2seq:
            dec_in = hf.prepare_decoder_input_ids_from_labels(labels=labels.masked_fill(~mask, 0))
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=dec_in,
                          decoder_attention_mask=decoder_attention_mask, output_hidden_states=True, use_cache=False)
            logits, hidden = out.logits, out.decoder_hidden_states[-1]  # (B, T, V), (B, T, H)
        else:
            positions = left_pad_positions(attention_mask) if attention_mask is not None else None
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                          output_hidden_states=True, use_cache=False)
            logits = torch.cat([torch.zeros_like(out.logits[:, :1]), out.logits[:, :-1]], 1)  # (B, T, V): t-1 -> t
            h = out.hidden_states[-1]
            hidden = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], 1)  # (B, T, H)
            mask = mask.clone()
            mask[:, 0] = False  # nothing predicts the first column
        logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
        result = {"logps": logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1).masked_fill(~mask, 0.0),
                  "mask": mask}
        if with_entropy:
            result["entropy"] = (-(logp.exp() * logp).sum(-1)).masked_fill(~mask, 0.0)  # (B, T)
        if self.value_head is not None:
            result["values"] = self.value_head(hidden) * mask  # (B, T)
        return result

    def choose_layout(self, labels: torch.Tensor, attention_mask: Optional[torch.Tensor],
                      position_ids: Optional[torch.Tensor] = None) -> str:
        """The layout ``forward`` uses for a batch when none is given: ``prefix`` (rows that share a
        prompt go through one prefix tree, rows packed without padding; causal models with a plain
        LM head that pass :func:`prefix_sharing_supported`, when the tree saves ``min_shared``),
        ``compact`` (each row's real tokens moved to the front: (B, max real length) instead of
        (B, T)) or ``padded`` (the batch as laid out: seq2seq, given position ids, or nothing to
        save)."""
        if self.is_seq2seq or position_ids is not None or attention_mask is None:
            return "padded"
        real = attention_mask.bool()  # (B, T)
        width = int(real.sum(-1).max()) if real.numel() else 0
        if width == 0 or bool(((labels != -100) & ~real).any()):
            return "padded"
        if self._plain_head and prefix_sharing_supported(unwrap(self.lm)):
            return "prefix"  # forward falls back to compact / padded when the tree saves too little
        return "compact" if width < real.shape[1] else "padded"

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                decoder_attention_mask: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
                with_entropy: bool = False, layout: Optional[str] = None, **_: object) -> dict[str, torch.Tensor]:
        """``plain_forward``'s outputs, computed in ``layout`` (``prefix``, ``compact``, ``padded``;
        None: ``choose_layout``). The layout used is logged the first time it is used."""
        auto = layout is None
        layout = self.choose_layout(labels, attention_mask, position_ids) if auto else layout
        if layout == "prefix":
            if not auto and not (self._plain_head and prefix_sharing_supported(unwrap(self.lm))):
                raise ValueError(f"layout=prefix: {type(unwrap(self.lm)).__name__} cannot score a prefix tree")
            real = attention_mask.bool()  # (B, T)
            out = self._shared_prompts(input_ids, labels, real, with_entropy, 0.0 if not auto else self.min_shared)
            if out is not None:
                self._log_layout("prefix")
                return out
            if not auto:
                raise ValueError("layout=prefix: this batch does not fit a prefix tree (see prefix_tree)")
            width = int(real.sum(-1).max())
            layout = "compact" if width < real.shape[1] else "padded"
        if layout == "compact":
            self._log_layout("compact")
            real = attention_mask.bool()
            return self._compacted(input_ids, labels, real, int(real.sum(-1).max()), with_entropy)
        if layout != "padded":
            raise ValueError(f"unknown layout {layout!r}; expected prefix, compact or padded")
        self._log_layout("padded")
        return self._padded(input_ids, labels, attention_mask, decoder_attention_mask, position_ids, with_entropy)

    def _log_layout(self, layout: str) -> None:
        if layout not in self._layouts_seen:
            from rlhfkit.utils import logger

            self._layouts_seen.add(layout)
            logger.info(f"policy forward: {layout} layout ({LAYOUT_NOTES[layout]})")

    def _padded(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: Optional[torch.Tensor],
                decoder_attention_mask: Optional[torch.Tensor], position_ids: Optional[torch.Tensor],
                with_entropy: bool) -> dict[str, torch.Tensor]:
        """The batch as laid out; the LM head only at positions that predict a label, log-softmax in chunks."""
        mask = labels != -100  # (B, T)
        if self.is_seq2seq:
            hf = unwrap(self.lm)
            dec_in = hf.prepare_decoder_input_ids_from_labels(labels=labels.masked_fill(~mask, 0))
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=dec_in,
                          decoder_attention_mask=decoder_attention_mask, output_hidden_states=self.value_head is not None,
                          use_cache=False)
            logits = out.logits[mask]  # (N, V)
            hidden = out.decoder_hidden_states[-1] if self.value_head is not None else None  # (B, T, H)
            sel = mask
        else:
            hf = unwrap(self.lm)
            if position_ids is None and attention_mask is not None:
                position_ids = left_pad_positions(attention_mask)  # (B, T)
            sel = torch.zeros_like(mask)
            sel[:, 1:] = mask[:, 1:]  # position t is predicted by the hidden state at t - 1
            if self._plain_head:
                out = hf.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                    use_cache=False)
                h = out.last_hidden_state  # (B, T, H)
                hidden = None
                logits = hf.get_output_embeddings()(h[:, :-1][sel[:, 1:]])  # (N, V): state t - 1 predicts token t
                if self.value_head is not None:
                    hidden = torch.zeros_like(h)
                    hidden[:, 1:] = h[:, :-1]  # hidden[t] = state that predicts token t
            else:
                out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              output_hidden_states=self.value_head is not None, use_cache=False)
                logits = out.logits[:, :-1][sel[:, 1:]]  # (N, V)
                hidden = None
                if self.value_head is not None:
                    h = out.hidden_states[-1]
                    hidden = torch.zeros_like(h)
                    hidden[:, 1:] = h[:, :-1]
        targets = labels[sel]  # (N,)
        lp, ent = token_logprobs(logits, targets, self.chunk_tokens, with_entropy)
        logps = torch.zeros(labels.shape, dtype=lp.dtype, device=lp.device)  # (B, T)
        logps = logps.masked_scatter(sel, lp)
        result = {"logps": logps, "mask": sel}
        if with_entropy:
            result["entropy"] = torch.zeros_like(logps).masked_scatter(sel, ent)
        if self.value_head is not None:
            result["values"] = self.value_head(hidden) * sel  # (B, T)
        return result

    def _compacted(self, input_ids: torch.Tensor, labels: torch.Tensor, real: torch.Tensor, width: int,
                   with_entropy: bool) -> dict[str, torch.Tensor]:
        """The forward on each row's real tokens moved to the front (B, width); outputs back in (B, T)."""
        B, T = real.shape
        keep = torch.arange(width, device=real.device)[None, :] < real.sum(-1, keepdim=True)  # (B, width)
        ids = input_ids.new_zeros((B, width)).masked_scatter(keep, input_ids[real])  # (B, width)
        lab = labels.new_full((B, width), -100).masked_scatter(keep, labels[real])  # (B, width)
        out = self._padded(ids, lab, keep.long(), None, None, with_entropy)
        return {k: v.new_zeros((B, T)).masked_scatter(real, v[keep]) for k, v in out.items()}  # (B, T) each

    def _shared_prompts(self, input_ids: torch.Tensor, labels: torch.Tensor, real: torch.Tensor,
                        with_entropy: bool, min_shared: Optional[float] = None) -> Optional[dict[str, torch.Tensor]]:
        """The forward as a prefix tree (rows with the same prompt share it, all rows packed without
        padding); None when that saves too little (``min_shared``) or the model fails the probe."""
        B, T = labels.shape
        rows, labs, cols = [], [], []
        for b in range(B):
            c = real[b].nonzero().flatten()  # (n_b,) columns of the real tokens
            cols.append(c)
            rows.append(input_ids[b, c].tolist())
            labs.append(labels[b, c])
        prompt_lens = [int((lab != -100).nonzero()[0]) if bool((lab != -100).any()) else len(lab) for lab in labs]
        tree = prefix_tree(rows, prompt_lens, self.min_shared if min_shared is None else min_shared)
        if tree is None:
            return None
        hf = unwrap(self.lm)
        flat = prefix_tree_states(hf.base_model, tree)  # (R * L, H)
        src, targets = [], []
        sel = torch.zeros_like(real)  # (B, T): the positions that get a log-prob
        for b in range(B):
            j = (labs[b][1:] != -100).nonzero().flatten() + 1  # real tokens with a label (not the first)
            where = torch.tensor(tree.where[b], dtype=torch.long, device=flat.device)
            src.append(where[j - 1])  # the state of the previous real token predicts token j
            targets.append(labs[b][j])
            sel[b, cols[b][j]] = True
        hidden = flat[torch.cat(src)]  # (N, H), in the row-major order of sel
        logits = hf.get_output_embeddings()(hidden)  # (N, V)
        lp, ent = token_logprobs(logits, torch.cat(targets), self.chunk_tokens, with_entropy)
        result = {"logps": torch.zeros((B, T), dtype=lp.dtype, device=lp.device).masked_scatter(sel, lp), "mask": sel}
        if with_entropy:
            result["entropy"] = torch.zeros_like(result["logps"]).masked_scatter(sel, ent)
        if self.value_head is not None:
            v = self.value_head(hidden)  # (N,)
            result["values"] = torch.zeros((B, T), dtype=v.dtype, device=v.device).masked_scatter(sel, v)
        return result


LAYOUT_NOTES = {
    "prefix": "rows sharing a prompt run it once, rows packed without padding",
    "compact": "each row's real tokens moved to the front",
    "padded": "the batch as laid out",
}


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, chunk: int = 2048,
                   with_entropy: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """log p(target) for each row of ``logits`` (N, V), computed ``chunk`` rows at a time.

    Equals ``log_softmax(logits).gather(targets)`` without materialising (N, V) log-probs.
    """
    lps, ents = [], []
    for s in range(0, logits.shape[0], chunk):
        lg = logits[s: s + chunk].float()  # (n, V)
        lse = torch.logsumexp(lg, dim=-1)  # (n,)
        lps.append(lg.gather(-1, targets[s: s + chunk, None]).squeeze(-1) - lse)
        if with_entropy:
            p = torch.softmax(lg, dim=-1)
            ents.append(lse - (p * lg).sum(-1))
    if not lps:
        empty = logits.new_zeros((0,), dtype=torch.float32)
        return empty, (empty if with_entropy else None)
    return torch.cat(lps), (torch.cat(ents) if with_entropy else None)


# ---------------------------------------------------------------------------------------------
# Shared prompts: one forward over a prompt and every continuation of it
# ---------------------------------------------------------------------------------------------


@dataclass
class PrefixTree:
    """Rows laid out without padding: rows that start with the same tokens form a group (the shared
    prefix once, then each row's remainder), and groups are packed side by side into tree rows.
    A remainder attends to its group's prefix and to itself (causally), never to other remainders
    or groups, and position ids restart in every group and continue from the prefix in every
    remainder, so every row's hidden states are those of its own plain forward."""

    input_ids: torch.Tensor
    """(R, L) tree rows, right-padded."""
    position_ids: torch.Tensor
    """(R, L) 0..p-1 on a group's prefix, p.. again on each of its remainders."""
    segments: torch.Tensor
    """(R, L) 0 on a prefix, k on the k-th remainder of its group, -1 on padding."""
    groups: torch.Tensor
    """(R, L) which group of its tree row a token belongs to, -1 on padding."""
    where: list[list[int]]
    """where[b][j]: index into the flattened (R * L) states of row b's j-th token."""

    def attention_mask(self, boolean: bool, dtype: torch.dtype) -> torch.Tensor:
        """(R, 1, L, L): True (or 0.0) where a query may attend to a key, else False (or the dtype's min)."""
        R, L = self.segments.shape
        ar = torch.arange(L, device=self.segments.device)
        sq, sk = self.segments[:, :, None], self.segments[:, None, :]  # (R, L, 1), (R, 1, L)
        same_group = self.groups[:, :, None] == self.groups[:, None, :]  # (R, L, L)
        allowed = (ar[None, None, :] <= ar[None, :, None]) & same_group & (sk >= 0) & ((sk == 0) | (sk == sq))
        allowed = allowed | torch.eye(L, dtype=torch.bool, device=allowed.device)  # padding sees itself: no empty row
        if boolean:
            return allowed[:, None]
        return torch.zeros((R, 1, L, L), dtype=dtype, device=allowed.device).masked_fill(~allowed[:, None],
                                                                                            torch.finfo(dtype).min)


def prefix_tree(rows: list[list[int]], prefix_lens: list[int], min_shared: float = 0.1) -> Optional[PrefixTree]:
    """Group the rows whose first ``prefix_lens[b]`` tokens are equal, and pack the groups (first
    fit, longest first) into tree rows no longer than the longest group.

    Returns None when the tree would run fewer than ``min_shared`` fewer token slots than the rows
    padded to the longest one (then the plain padded forward is as good), or when the tree rows
    get so long that their attention area (R L^2) exceeds four times that of the padded rows (many
    long completions per prompt: attention and the (R, 1, L, L) mask would cost more than the
    prompt saves).
    """
    keyed: dict[tuple, list[int]] = {}
    for b, (r, p) in enumerate(zip(rows, prefix_lens)):
        keyed.setdefault(tuple(r[:p]) if p > 0 else ("row", b), []).append(b)
    seqs: list[tuple[list[int], list[int], list[int], list[tuple[int, list[int]]]]] = []
    for key, g in keyed.items():  # one (tokens, positions, segments, [(row, its columns)]) per group
        p = len(key) if len(g) > 1 and key[:1] != ("row",) else len(rows[g[0]])
        toks, pos, seg, members = list(rows[g[0]][:p]), list(range(p)), [0] * p, []
        for k, b in enumerate(g, start=1):
            rest = rows[b][p:]
            members.append((b, list(range(p)) + list(range(len(toks), len(toks) + len(rest)))))
            toks, pos, seg = toks + list(rest), pos + list(range(p, p + len(rest))), seg + [k] * len(rest)
        seqs.append((toks, pos, seg, members))
    capacity = max(len(t) for t, *_ in seqs)
    bins: list[list[int]] = []  # groups of each tree row
    fill: list[int] = []
    for i in sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0])):
        n = len(seqs[i][0])
        j = next((j for j, f in enumerate(fill) if f + n <= capacity), None)
        if j is None:
            bins.append([]), fill.append(0)
            j = len(bins) - 1
        bins[j].append(i)
        fill[j] += n
    R, L, longest = len(bins), max(fill), max(len(r) for r in rows)
    if R * L > (1.0 - min_shared) * len(rows) * longest or R * L ** 2 > 4 * len(rows) * longest ** 2:
        return None
    ids = torch.zeros((R, L), dtype=torch.long)  # (R, L)
    positions = torch.zeros((R, L), dtype=torch.long)  # (R, L)
    segments = torch.full((R, L), -1, dtype=torch.long)  # (R, L)
    groups = torch.full((R, L), -1, dtype=torch.long)  # (R, L)
    where: list[list[int]] = [[] for _ in rows]
    for r, members in enumerate(bins):
        start = 0
        for k, i in enumerate(members):
            toks, pos, seg, rows_cols = seqs[i]
            end = start + len(toks)
            ids[r, start:end] = torch.tensor(toks, dtype=torch.long)
            positions[r, start:end] = torch.tensor(pos, dtype=torch.long)
            segments[r, start:end] = torch.tensor(seg, dtype=torch.long)
            groups[r, start:end] = k
            for b, cols in rows_cols:
                where[b] = [r * L + start + c for c in cols]
            start = end
    return PrefixTree(ids, positions, segments, groups, where)


def prefix_tree_states(body: nn.Module, tree: PrefixTree) -> torch.Tensor:
    """Last hidden states (R * L, H) of ``body`` (a decoder without its LM head) over ``tree``."""
    device = next(body.parameters()).device
    impl = getattr(body.config, "_attn_implementation", "eager")
    mask = tree.attention_mask(boolean=impl == "sdpa", dtype=next(body.parameters()).dtype).to(device)
    out = body(input_ids=tree.input_ids.to(device), attention_mask=mask, position_ids=tree.position_ids.to(device),
               use_cache=False)
    h = out.last_hidden_state  # (R, L, H)
    return h.reshape(-1, h.shape[-1])


_PREFIX_SUPPORT: dict[tuple, bool] = {}


def prefix_sharing_supported(hf: nn.Module) -> bool:
    """Whether ``hf`` (a causal LM) honours a 4D attention mask and position ids, checked once per
    model class and attention implementation on a tiny input against plain forwards."""
    impl = getattr(hf.config, "_attn_implementation", None)
    key = (type(hf), impl)
    if key not in _PREFIX_SUPPORT:
        ok = impl in ("sdpa", "eager") and hasattr(hf, "base_model") and hf.get_output_embeddings() is not None
        if ok:
            ok = _probe_prefix_sharing(hf)
        if not ok:
            from rlhfkit.utils import logger

            logger.info(f"{type(hf).__name__} ({impl}): rows that share a prompt are scored separately")
        _PREFIX_SUPPORT[key] = ok
    return _PREFIX_SUPPORT[key]


@torch.no_grad()
def _probe_prefix_sharing(hf: nn.Module) -> bool:
    body = hf.base_model
    was = body.training
    body.eval()
    try:  # an architecture that rejects 4D masks or position ids raises here: that is a bug to see
        vocab = hf.get_output_embeddings().weight.shape[0]
        rows = [[1, 2, 3, 4], [1, 2, 5], [6, 7], [8]]  # a shared prompt, and two rows packed into one
        rows = [[t % vocab for t in r] for r in rows]
        tree = prefix_tree(rows, [2, 2, 0, 0], 0.0)
        flat = prefix_tree_states(body, tree).float()
        device = flat.device
        for b, r in enumerate(rows):
            plain = body(input_ids=torch.tensor([r], device=device), use_cache=False).last_hidden_state[0].float()
            got = flat[torch.tensor(tree.where[b], device=device)]
            if not torch.allclose(got, plain, atol=1e-3 + 1e-2 * float(plain.abs().max()), rtol=0):
                return False
        return True
    finally:
        body.train(was)


def load_value_head(model: PolicyModel, folder: str | os.PathLike) -> None:
    from safetensors.torch import load_file

    f = Path(folder) / "value_head.safetensors"
    if model.value_head is not None and f.is_file():
        model.value_head.load_state_dict(load_file(str(f)))




# ---------------------------------------------------------------------------------------------
# The reference policy
# ---------------------------------------------------------------------------------------------


class Reference:
    """Per-token log-probs under the reference policy, in the same (B, T) layout as PolicyModel.

    Kinds (``ReferenceConfig.kind``):
    - ``disabled_adapter``: the policy's own base with its LoRA adapter switched off;
    - ``adapter``: a trained adapter loaded frozen as adapter ``reference`` on the policy's base;
    - ``copy``: a separate frozen model;
    - ``none``: no reference (``logps`` raises).
    """

    def __init__(self, kind: str, policy: Optional[PolicyModel] = None, model: Optional[nn.Module] = None):
        self.kind = kind
        self.policy = policy
        self.model = PolicyModel(model) if model is not None else None
        if self.model is not None:
            self.model.eval().requires_grad_(False)

    @torch.no_grad()
    def logps(self, batch: dict) -> torch.Tensor:
        if self.kind == "none":
            raise RuntimeError("this run has no reference model (reference.kind=none)")
        if self.kind == "copy":
            device = next(self.model.parameters()).device
            return self.model(**{k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)})["logps"]
        policy = self.policy
        peft_model = policy.lm
        was = policy.training
        policy.eval()
        try:
            if self.kind == "disabled_adapter":
                with peft_model.disable_adapter():
                    return policy(**batch)["logps"]
            # 'adapter': switch the active adapter; set_adapter also flips requires_grad, so restore it
            grads = {n: p.requires_grad for n, p in peft_model.named_parameters()}
            active = peft_model.active_adapter
            peft_model.set_adapter("reference")
            try:
                return policy(**batch)["logps"]
            finally:
                peft_model.set_adapter(active)
                for n, p in peft_model.named_parameters():
                    p.requires_grad_(grads[n])
        finally:
            policy.train(was)


def build_reference(ref_cfg, model_cfg: ModelConfig, lora: Optional[LoraConfig], policy: PolicyModel,
                    needed: bool = True, start_model: Optional[nn.Module] = None) -> Reference:
    """The reference the config asks for; ``auto`` never drops a trained adapter silently.
    ``start_model``: a model object the policy starts from (Python API); a ``copy`` reference
    without ``reference.model`` is then a frozen deep copy of it, not a load of ``model_cfg``."""
    from rlhfkit.utils import logger

    if not needed:
        return Reference("none")
    kind = ref_cfg.kind
    lora_on = lora is not None and lora.enabled
    if kind == "auto":
        kind = "adapter" if (lora_on and lora.adapter_path) else ("disabled_adapter" if lora_on else "copy")
    if kind in ("disabled_adapter", "adapter") and not lora_on:
        raise UserError(f"reference.kind={kind} needs lora.enabled=true")
    if kind == "disabled_adapter" and lora.adapter_path:
        logger.warning("reference: the bare base without the trained adapter lora.adapter_path (asked for by "
                       "reference.kind=disabled_adapter)")
    if kind == "adapter":
        path = ref_cfg.adapter_path or lora.adapter_path
        if not path:
            raise UserError("reference.kind=adapter needs reference.adapter_path or lora.adapter_path")
        with peft_quiet():
            policy.lm.load_adapter(path, adapter_name="reference", is_trainable=False)
        logger.info(f"reference: frozen adapter {path} on the policy's base (two adapters, one base)")
        return Reference("adapter", policy=policy)
    if kind == "disabled_adapter":
        logger.info("reference: the policy's base with the LoRA adapter disabled (no second copy)")
        return Reference("disabled_adapter", policy=policy)
    if kind == "none":
        logger.info("reference: none")
        return Reference("none")
    if start_model is not None and not ref_cfg.model:
        import copy

        logger.info("reference: frozen copy of the model object the policy starts from")
        return Reference("copy", model=copy.deepcopy(start_model))
    name = ref_cfg.model or model_cfg.name_or_path
    import dataclasses

    device = next(policy.parameters()).device
    ref = load_model(dataclasses.replace(model_cfg, name_or_path=name, gradient_checkpointing=False), device)
    logger.info(f"reference: frozen copy of {name}")
    return Reference("copy", model=ref)
