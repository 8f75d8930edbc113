"""Reward models written by ``rlhfkit reward``: :class:`RewardModel` (a one-logit HF classifier
folder, or an LM with a value head) and the tokenization and last-token scoring that training and
use share.
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Optional, Sequence

from rlhfkit.config import UserError
from rlhfkit.rewards.base import join_prompt_completion
from rlhfkit.rewards.classifiers import _default_device, _load_sequence_classifier, classifier_logits



REWARD_SPEC = "rlhfkit_reward.json"


def reward_input_ids(tokenizer, text: str, max_length: int, append_eos: bool) -> tuple[list[int], bool]:
    """(token ids a reward model scores, whether ``text`` was cut to fit ``max_length``).

    The tokenizer's own special tokens are kept (``[CLS] ... [SEP]`` for BERT, BOS for Llama);
    ``append_eos`` (LM value-head models) ends the text with EOS so the head reads an
    end-of-response state. Long texts are cut from the left so the completion is kept, as
    ``classifier_logits(..., truncation_side="left")`` does. ``rlhfkit reward`` trains on these ids.
    """
    if not append_eos:
        ids = tokenizer(text)["input_ids"]
        if len(ids) <= max_length:
            return ids, False
        old = tokenizer.truncation_side
        tokenizer.truncation_side = "left"
        try:
            return tokenizer(text, truncation=True, max_length=max_length)["input_ids"], True
        finally:
            tokenizer.truncation_side = old
    ids = tokenizer(text)["input_ids"]
    if not ids or ids[-1] != tokenizer.eos_token_id:
        ids = ids + [tokenizer.eos_token_id]
    return (ids[-max_length:], True) if len(ids) > max_length else (ids, False)


def pad_right(rows: Sequence[Sequence[int]], pad_id: int):
    """``input_ids`` and ``attention_mask`` (B, T), right-padded (the last real token is at mask.sum - 1)."""
    import torch

    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (B, T)
    att = torch.zeros((len(rows), T), dtype=torch.long)  # (B, T)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = torch.tensor(list(r), dtype=torch.long)
        att[b, :len(r)] = 1
    return ids, att


def last_token_rewards(lm, head, input_ids, attention_mask):
    """r(x, y): (B,) a value head on a language model, for right-padded ``input_ids`` (B, T).

    Causal LM: the head reads the last layer's state of the last real token (the EOS that
    :func:`reward_input_ids` appends), as in Ouyang et al. 2022 / Stiennon et al. 2020.
    Encoder-decoder: the encoder reads the whole text and the head reads the decoder's first
    state (decoder start token only), the way T5 preference models such as SteamSHP read their
    first decoder step. ``lm`` may be a peft model (its adapters stay active).
    """
    import torch

    from rlhfkit.models import unwrap

    hf = unwrap(lm)
    if getattr(hf.config, "is_encoder_decoder", False):
        start = torch.full((input_ids.shape[0], 1), hf.config.decoder_start_token_id, dtype=torch.long,
                           device=input_ids.device)  # (B, 1)
        enc = hf.get_encoder()(input_ids=input_ids, attention_mask=attention_mask)
        dec = hf.get_decoder()(input_ids=start, encoder_hidden_states=enc.last_hidden_state,
                               encoder_attention_mask=attention_mask, use_cache=False)
        hidden = dec.last_hidden_state[:, 0]  # (B, H)
    else:
        body = getattr(hf, hf.base_model_prefix, None)
        if isinstance(body, torch.nn.Module):  # the transformer without the (B, T, V) LM head
            states = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        else:
            states = hf(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                        use_cache=False).hidden_states[-1]  # (B, T, H)
        last = attention_mask.long().sum(1) - 1  # (B,)
        hidden = states[torch.arange(states.shape[0], device=states.device), last]  # (B, H)
    return head(hidden).float()  # (B,)


def reward_spec(path: str) -> dict:
    """The folder's ``rlhfkit_reward.json`` ({} for a plain HF classifier folder)."""
    file = Path(path) / REWARD_SPEC
    if not file.is_file():
        return {}
    try:
        spec = json.loads(file.read_text())
    except ValueError as e:
        raise UserError(f"{file}: malformed JSON ({e})") from None
    if not isinstance(spec, dict) or spec.get("kind") not in ("classifier", "lm_value_head"):
        raise UserError(f"{file}: 'kind' must be 'classifier' or 'lm_value_head'")
    return spec


@functools.lru_cache(maxsize=4)
def _load_lm_value_head(path: str, device: str):
    """(tokenizer, lm, value head) of an ``lm_value_head`` reward folder, eval mode; cached."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    from rlhfkit.policy import ValueHead, hidden_size

    head_file = Path(path) / "value_head.safetensors"
    if not head_file.is_file():
        raise UserError(f"{head_file}: not found (an lm_value_head reward model needs it)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        cls = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
        lm = cls.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load reward model '{path}': {first}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    head = ValueHead(hidden_size(config))
    head.load_state_dict(load_file(str(head_file)))
    lm.eval().to(device).requires_grad_(False)
    head.eval().to(device).requires_grad_(False)
    return tokenizer, lm, head


class RewardModel:
    """A reward model written by ``rlhfkit reward``: scalar r(x, y) of ``prompt + " " + completion``.

    Two folder layouts (``rlhfkit_reward.json`` says which; a folder without it is a classifier):

    * ``classifier``: a HF ``AutoModelForSequenceClassification`` with ``num_labels=1``
      (safetensors + tokenizer), e.g. MiniLM with a scalar head;
    * ``lm_value_head``: a causal or seq2seq LM folder (safetensors + tokenizer) plus
      ``value_head.safetensors`` (``rlhfkit.policy.ValueHead``: ``summary.weight`` (1, H),
      ``summary.bias`` (1,)) and ``rlhfkit_reward.json`` ``{"kind": "lm_value_head",
      "model_type": "causal" | "seq2seq", "max_length": L}``; scored by :func:`last_token_rewards`.

    Both hold ``reward_stats.json`` ``{"mean": m, "std": s}`` (reward statistics on the training
    data); ``normalize=True`` returns ``(r - m) / s``. Long inputs are truncated from the left so
    the completion is kept.
    """

    def __init__(self, path: str, normalize: bool = False, batch_size: int = 32, max_length: int = 512,
                 device: Optional[str] = None):
        self.path, self.normalize = path, normalize
        self.batch_size, self.max_length, self.device = batch_size, max_length, device
        self.name = f"reward_model:{path}"
        self._stats: Optional[tuple[float, float]] = None

    def stats(self) -> tuple[float, float]:
        """(mean, std) from ``reward_stats.json``."""
        if self._stats is None:
            file = Path(self.path) / "reward_stats.json"
            if not file.is_file():
                raise UserError(f"{file}: not found; reward.normalize needs the statistics that "
                                "'rlhfkit reward' writes next to the model")
            try:
                data = json.loads(file.read_text())
                mean, std = float(data["mean"]), float(data["std"])
            except (ValueError, KeyError, TypeError) as e:
                raise UserError(f"{file}: expected {{\"mean\": float, \"std\": float}} ({e})") from None
            if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
                raise UserError(f"{file}: std must be a positive number, got mean={mean} std={std}")
            self._stats = (mean, std)
        return self._stats

    def score_texts(self, texts: Sequence[str]) -> list[float]:
        """Raw rewards of already-joined texts."""
        device = self.device or _default_device()
        if reward_spec(self.path).get("kind") == "lm_value_head":
            r = self._lm_value_head_scores(list(texts), device)
        else:
            _, model = _load_sequence_classifier(self.path, device)
            if model.config.num_labels != 1:
                raise UserError(f"reward model '{self.path}' has {model.config.num_labels} outputs; "
                                "a reward model has one (num_labels=1)")
            r = classifier_logits(self.path, list(texts), self.batch_size, self.max_length, "left", device)[:, 0]
        if self.normalize:
            mean, std = self.stats()
            r = (r - mean) / std
        return r.tolist()

    def _lm_value_head_scores(self, texts: list[str], device: str):
        import torch

        tokenizer, lm, head = _load_lm_value_head(self.path, device)
        max_length = min(self.max_length, tokenizer.model_max_length or self.max_length)
        ids = [reward_input_ids(tokenizer, t, max_length, append_eos=True)[0] for t in texts]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = torch.empty(len(ids))  # (N,)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                input_ids, att = pad_right([ids[i] for i in idx], tokenizer.pad_token_id)
                out[idx] = last_token_rewards(lm, head, input_ids.to(device), att.to(device)).cpu()
        return out

    def __call__(self, prompts, completions, **columns) -> list[float]:
        if self.normalize:
            self.stats()  # fail before loading the model
        return self.score_texts([join_prompt_completion(p, c) for p, c in zip(prompts, completions)])
