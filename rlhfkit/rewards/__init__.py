"""Reward functions: ``fn(prompts, completions, **columns) -> list[float]``.

Every reward in rlhfkit, and every Python callable a user hands to ``rlhfkit.train(reward_fn=...)``,
has the same signature: ``prompts`` and ``completions`` are lists of strings of equal length, and
``columns`` holds the other dataset columns of the same rows as per-row lists (e.g.
``target_label=[...]``, ``summary=[...]``). The result is one float per completion.

Two ways to get one:

* from config (``reward:`` sections of a recipe): ``build_reward(cfgs, bias)`` returns a
  :class:`Composite` (weighted sum plus bias; ``.score()`` also returns every part's raw values for
  logging as ``reward/<name>``);
* from Python: the classes below, e.g. ``Toxicity(backend="hatesonar")``, ``Length(min_words=5)``,
  ``Composite([("label", 0.4, LabelMatch("emotion")), ("len", 0.25, Length())], bias=0.001)``.

Models (HF classifiers, reward models, the hatesonar ONNX graph, VADER) load on the first call and
are cached for the life of the process. Nothing here trains.

Every reward built by ``build_reward`` or placed in a ``Composite`` runs behind
:func:`validate_reward`, which turns a wrong count, a non-number, NaN or inf into a ``UserError``
naming the function, e.g. ``reward 'python:mymod:f' returned 3 values for 4 completions``.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import math
import numbers
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from rlhfkit.config import ConfigError, RewardConfig, UserError, from_dict

RewardFn = Callable[..., list[float]]

GIBBERISH_LABELS = ("clean", "mild gibberish", "word salad", "noise")
RESOURCES = Path(__file__).resolve().parent.parent / "resources"  # rlhfkit/resources


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


class ValidatedReward:
    """Wraps a reward function and checks what it returns (count, numbers, finite)."""

    def __init__(self, fn: RewardFn, name: str):
        self.fn = fn
        self.name = name

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns) -> list[float]:
        if len(prompts) != len(completions):
            raise UserError(
                f"reward '{self.name}' got {len(prompts)} prompts for {len(completions)} completions"
            )
        return check_rewards(self.fn(list(prompts), list(completions), **columns), len(completions), self.name)

    def __getattr__(self, attr: str) -> Any:  # expose the wrapped reward's extras (e.g. .labels)
        if attr == "fn":
            raise AttributeError(attr)
        return getattr(self.fn, attr)

    def __repr__(self) -> str:
        return f"ValidatedReward({self.name!r})"


def validate_reward(fn: RewardFn, name: Optional[str] = None) -> ValidatedReward:
    """Wrap ``fn`` so that a bad result raises ``UserError`` naming it (idempotent)."""
    if isinstance(fn, ValidatedReward):
        return fn
    if not callable(fn):
        raise UserError(f"reward '{name or fn!r}' is not callable")
    return ValidatedReward(fn, name or _callable_name(fn))


def check_rewards(values: Any, n: int, name: str) -> list[float]:
    """``values`` as ``list[float]`` of length ``n``, or ``UserError`` naming reward ``name``."""
    if hasattr(values, "tolist") and not isinstance(values, (list, tuple)):  # torch / numpy
        values = values.tolist()
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
        raise UserError(f"reward '{name}' returned {type(values).__name__}, expected a list of {n} numbers")
    values = list(values)
    if len(values) != n:
        raise UserError(f"reward '{name}' returned {len(values)} values for {n} completions")
    out = []
    for i, v in enumerate(values):
        if hasattr(v, "item") and getattr(v, "ndim", 0) == 0 and not isinstance(v, numbers.Real):
            v = v.item()  # 0-d tensor
        if not isinstance(v, numbers.Real):
            raise UserError(
                f"reward '{name}' returned a non-number for completion {i}: {v!r} ({type(v).__name__})"
            )
        v = float(v)
        if not math.isfinite(v):
            raise UserError(f"reward '{name}' returned {v} for completion {i}")
        out.append(v)
    return out


def _callable_name(fn: Any) -> str:
    name = getattr(fn, "name", None)
    if isinstance(name, str):
        return name
    qual = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    module = getattr(fn, "__module__", None)
    return f"{module}:{qual}" if module and module != "__main__" else qual


def _column(columns: dict, key: str, n: int, reward: str) -> list:
    if key not in columns:
        raise UserError(
            f"reward '{reward}' needs the column '{key}'; the rows have: {', '.join(sorted(columns)) or 'none'}"
        )
    values = list(columns[key])
    if len(values) != n:
        raise UserError(f"reward '{reward}': column '{key}' has {len(values)} values for {n} completions")
    return values


def join_prompt_completion(prompt: str, completion: str) -> str:
    """The text a reward model scores: ``prompt + " " + completion``.

    No space is added when the prompt is empty, already ends with whitespace, or the completion
    starts with whitespace. No chat template is applied even when the tokenizer has one (a
    deliberate simplification): ``rlhfkit reward`` trains on the same join, so train and use match.
    """
    if not prompt:
        return completion
    if prompt[-1].isspace() or (completion and completion[0].isspace()):
        return prompt + completion
    return prompt + " " + completion


# --------------------------------------------------------------------------------------------
# Hugging Face sequence classifiers (shared by classifier, reward_model, label_match, gibberish)
# --------------------------------------------------------------------------------------------


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@functools.lru_cache(maxsize=8)
def _load_sequence_classifier(name_or_path: str, device: str):
    """(tokenizer, model) for any HF sequence classifier, eval mode, on ``device``; cached."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhfkit.assets import resolve

    path = resolve(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load classifier '{name_or_path}': {first}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"classifier '{name_or_path}': tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:  # causal-LM classifiers find the last token through it
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval().to(device)
    model.requires_grad_(False)
    return tokenizer, model


def classifier_logits(
    name_or_path: str,
    texts: Sequence[str],
    batch_size: int = 32,
    max_length: int = 512,
    truncation_side: str = "right",
    device: Optional[str] = None,
):
    """Logits ``(N, num_labels)`` (float32, CPU) of a sequence classifier on ``texts``.

    Texts are sorted by length into batches (less padding) and the rows put back in order.
    """
    import torch

    tokenizer, model = _load_sequence_classifier(name_or_path, device or _default_device())
    max_length = min(max_length, tokenizer.model_max_length or max_length)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), model.config.num_labels)  # (N, C)
    old_side = tokenizer.truncation_side
    tokenizer.truncation_side = truncation_side
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                enc = tokenizer(
                    [texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt",
                ).to(model.device)
                out[idx] = model(**enc).logits.float().cpu()  # (B, C)
    finally:
        tokenizer.truncation_side = old_side
    return out


def _label_names(name_or_path: str, device: str) -> list[str]:
    _, model = _load_sequence_classifier(name_or_path, device)
    id2label = model.config.id2label or {}
    return [str(id2label.get(i, f"LABEL_{i}")) for i in range(model.config.num_labels)]


def _label_index(name_or_path: str, label: Any, device: str, what: str) -> int:
    """Index of ``label`` (a name from config.label2id, matched case-insensitively, or an index)."""
    names = _label_names(name_or_path, device)
    if label is None:
        if len(names) == 1:
            return 0
        raise UserError(f"{what}: classifier '{name_or_path}' has labels {names}; choose one with 'label'")
    if isinstance(label, int) or (isinstance(label, str) and label.strip().lstrip("-").isdigit()):
        idx = int(label)
        if not 0 <= idx < len(names):
            raise UserError(f"{what}: label index {idx} is out of range for labels {names}")
        return idx
    lowered = [n.lower() for n in names]
    if str(label) in names:
        return names.index(str(label))
    if str(label).lower() in lowered:
        return lowered.index(str(label).lower())
    raise UserError(f"{what}: classifier '{name_or_path}' has no label '{label}'; labels: {names}")


class Classifier:
    """Score of one label of any HF sequence classifier (``AutoModelForSequenceClassification``).

    ``output="logit"`` returns the raw logit of ``label``; ``"probability"`` its softmax probability
    (sigmoid for a one-logit head). ``text="completion"`` classifies the completion alone,
    ``"prompt+completion"`` the joined text (:func:`join_prompt_completion`). Inputs are truncated to
    ``max_length`` tokens (from the right); ``trust_remote_code`` is never enabled.
    """

    def __init__(
        self,
        model: str,
        label: Any = None,
        output: str = "logit",
        text: str = "completion",
        batch_size: int = 32,
        max_length: int = 512,
        device: Optional[str] = None,
    ):
        if output not in ("logit", "probability"):
            raise ConfigError(f"classifier output must be 'logit' or 'probability', got '{output}'")
        if text not in ("completion", "prompt+completion"):
            raise ConfigError(f"classifier text must be 'completion' or 'prompt+completion', got '{text}'")
        self.model, self.label, self.output, self.text = model, label, output, text
        self.batch_size, self.max_length, self.device = batch_size, max_length, device
        self.name = f"classifier:{model}"

    def _texts(self, prompts, completions) -> list[str]:
        if self.text == "completion":
            return list(completions)
        return [join_prompt_completion(p, c) for p, c in zip(prompts, completions)]

    def __call__(self, prompts, completions, **columns) -> list[float]:
        device = self.device or _default_device()
        logits = classifier_logits(self.model, self._texts(prompts, completions), self.batch_size,
                                   self.max_length, "right", device)  # (N, C)
        idx = _label_index(self.model, self.label, device, f"reward '{self.name}'")
        if self.output == "logit":
            return logits[:, idx].tolist()
        probs = logits.sigmoid() if logits.shape[1] == 1 else logits.softmax(-1)  # (N, C)
        return probs[:, idx].tolist()


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

    from rlhfkit.models import ValueHead, hidden_size

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
      ``value_head.safetensors`` (``rlhfkit.models.ValueHead``: ``summary.weight`` (1, H),
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


# --------------------------------------------------------------------------------------------
# Toxicity (offline scorers)
# --------------------------------------------------------------------------------------------


def toxicity_prob(texts: Sequence[str], backend: str = "profanity_check") -> list[float]:
    """p(toxic) of each text.

    ``profanity_check``: alt-profanity-check's calibrated linear SVM on TF-IDF features.
    ``hatesonar``: HateSonar's TF-IDF + logistic regression (three classes), p(toxic) =
    p(hate_speech) + p(offensive_language). Both are trained on tweets / Wikipedia comments.
    """
    texts = list(texts)
    if not texts:
        return []
    if backend == "profanity_check":
        from profanity_check import predict_prob

        return [float(p) for p in predict_prob(texts)]
    if backend == "hatesonar":
        import numpy as np

        session = _hatesonar_session()
        _, probs = session.run(None, {"text": np.array(texts, dtype=object)})  # ZipMap: [{class: p}]
        return [float(p[0] + p[1]) for p in probs]
    raise ConfigError(f"toxicity backend must be 'profanity_check' or 'hatesonar', got '{backend}'")


@functools.lru_cache(maxsize=1)
def _hatesonar_session():
    """onnxruntime session of HateSonar's model.

    Its ``StringNormalizer`` node carries no ``locale`` attribute, so onnxruntime uses
    ``en_US.UTF-8``, which many machines (containers) lack: session creation then fails. In that
    case the model is loaded again with ``locale = "C.UTF-8"`` written into those nodes. The
    ``onnx`` package is not a dependency, so the edit is done on the protobuf wire format.
    """
    import onnxruntime as ort

    from rlhfkit.assets import package_dir

    model_file = package_dir("hatesonar") / "model" / "model.onnx"
    data = model_file.read_bytes()
    quiet = ort.SessionOptions()
    quiet.log_severity_level = 4  # the expected locale failure would otherwise be logged as an error
    try:
        return ort.InferenceSession(data, quiet, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail type
        if "locale" not in str(e):
            raise
    return ort.InferenceSession(_onnx_set_locale(data, "C.UTF-8"), providers=["CPUExecutionProvider"])


def _onnx_set_locale(model: bytes, locale: str) -> bytes:
    """Add ``locale`` to every top-level StringNormalizer node of a serialised ONNX ModelProto.

    Field numbers (onnx.proto): ModelProto.graph = 7; GraphProto.node = 1; NodeProto.op_type = 4,
    NodeProto.attribute = 5; AttributeProto.name = 1, .s = 4, .type = 20 (STRING = 3).
    """
    attr = _pb_bytes(1, b"locale") + _pb_bytes(4, locale.encode()) + _pb_varint_field(20, 3)

    def patch_graph(graph: bytes) -> bytes:
        out = bytearray()
        for num, raw, payload in _pb_fields(graph):
            if num == 1 and any(n == 4 and p == b"StringNormalizer" for n, _, p in _pb_fields(payload)):
                raw = _pb_bytes(1, payload + _pb_bytes(5, attr))
            out += raw
        return bytes(out)

    return b"".join(_pb_bytes(7, patch_graph(p)) if n == 7 else raw for n, raw, p in _pb_fields(model))


def _pb_read_varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def _pb_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b, value = value & 0x7F, value >> 7
        out.append(b | 0x80 if value else b)
        if not value:
            return bytes(out)


def _pb_fields(buf: bytes):
    """(field number, raw bytes of the field, payload of a length-delimited field or None)."""
    i = 0
    while i < len(buf):
        key, j = _pb_read_varint(buf, i)
        num, wire = key >> 3, key & 7
        payload = None
        if wire == 0:
            _, k = _pb_read_varint(buf, j)
        elif wire == 1:
            k = j + 8
        elif wire == 5:
            k = j + 4
        elif wire == 2:
            length, j = _pb_read_varint(buf, j)
            k = j + length
            payload = buf[j:k]
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield num, buf[i:k], payload
        i = k


def _pb_bytes(num: int, payload: bytes) -> bytes:
    return _pb_varint(num << 3 | 2) + _pb_varint(len(payload)) + payload


def _pb_varint_field(num: int, value: int) -> bytes:
    return _pb_varint(num << 3) + _pb_varint(value)


class Toxicity:
    """Toxicity of the completion by an offline scorer (see :func:`toxicity_prob`).

    ``invert=True`` (the default) returns ``1 - p(toxic)``, a non-toxicity reward for detoxification;
    ``invert=False`` returns ``p(toxic)`` (an evaluation metric).
    """

    def __init__(self, backend: str = "profanity_check", invert: bool = True):
        if backend not in ("profanity_check", "hatesonar"):
            raise ConfigError(f"toxicity backend must be 'profanity_check' or 'hatesonar', got '{backend}'")
        self.backend, self.invert = backend, invert
        self.name = f"toxicity:{backend}"

    def __call__(self, prompts, completions, **columns) -> list[float]:
        p = toxicity_prob(completions, self.backend)
        return [1.0 - x for x in p] if self.invert else p


# --------------------------------------------------------------------------------------------
# Sentiment and label match
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader_compound(text: str) -> float:
    """VADER compound score in [-1, 1] (Hutto & Gilbert, 2014)."""
    return float(_vader().polarity_scores(text)["compound"])


def vader_label(text: str) -> str:
    """``positive`` if compound >= 0.05, ``negative`` if <= -0.05, else ``neutral`` (VADER's own cut-offs)."""
    c = vader_compound(text)
    return "positive" if c >= 0.05 else "negative" if c <= -0.05 else "neutral"


class Sentiment:
    """VADER compound sentiment of the completion, in [-1, 1] (1 = most positive)."""

    name = "sentiment"

    def __call__(self, prompts, completions, **columns) -> list[float]:
        return [vader_compound(c) for c in completions]


class LabelMatch:
    """Does the completion carry the row's target label (``columns[target_column]``)?

    * default labeller (VADER, :func:`vader_label`): 1.0 if the label equals the target (case-
      insensitive), else 0.0; targets must be ``positive`` / ``negative`` / ``neutral``;
    * ``model`` (a HF classifier, e.g. an emotion classifier): the classifier's softmax probability
      of the target label (a smooth version of the 0/1 match; targets must be among its labels);
    * ``labeller`` (a Python callable ``list[str] -> list[str]``): 1.0 on an exact match, else 0.0.
    """

    def __init__(self, target_column: str, model: Optional[str] = None,
                 labeller: Optional[Callable[[list[str]], list[str]]] = None, batch_size: int = 32,
                 max_length: int = 512, device: Optional[str] = None):
        if model and labeller:
            raise ConfigError("label_match: give either a classifier 'model' or a 'labeller', not both")
        self.target_column, self.model, self.labeller = target_column, model, labeller
        self.batch_size, self.max_length, self.device = batch_size, max_length, device
        self.name = f"label_match:{model}" if model else "label_match"

    def labels(self, completions: Sequence[str]) -> list[str]:
        """The label the labeller gives each completion."""
        if self.labeller is not None:
            return list(self.labeller(list(completions)))
        if self.model is None:
            return [vader_label(c) for c in completions]
        device = self.device or _default_device()
        logits = classifier_logits(self.model, completions, self.batch_size, self.max_length, "right", device)
        names = _label_names(self.model, device)
        return [names[i] for i in logits.argmax(-1).tolist()]

    def __call__(self, prompts, completions, **columns) -> list[float]:
        targets = _column(columns, self.target_column, len(completions), self.name)
        if self.labeller is not None:
            return [float(a == t) for a, t in zip(self.labels(completions), targets)]
        if self.model is None:
            known = ("positive", "negative", "neutral")
            for i, t in enumerate(targets):
                if str(t).strip().lower() not in known:
                    raise UserError(f"reward '{self.name}': row {i}, column '{self.target_column}': target "
                                    f"'{t}' is not a VADER label {list(known)}; set 'model' to a classifier")
            return [float(a == str(t).strip().lower()) for a, t in zip(self.labels(completions), targets)]
        device = self.device or _default_device()
        probs = classifier_logits(self.model, completions, self.batch_size, self.max_length, "right",
                                  device).softmax(-1)  # (N, C)
        out = []
        for i, t in enumerate(targets):
            idx = _label_index(self.model, str(t), device,
                               f"reward '{self.name}': row {i}, column '{self.target_column}'")
            out.append(float(probs[i, idx]))
        return out


# --------------------------------------------------------------------------------------------
# Length, token frequency
# --------------------------------------------------------------------------------------------


def preference_length_reward(n: int) -> float:
    """The piecewise length score of the preference-generation recipe, implemented literally.

    With ``d_min = (n - 5) / 5`` and ``d_max = (n - 20) / 20``: ``d_min * 1e-4`` if ``|d_min| < 1``
    (0 <= n < 10: almost flat), ``|d_min + d_max| * 10`` if ``|d_min| > 1 > |d_max|`` (10 < n < 40:
    grows as ``|5n - 40| / 2``, e.g. 10 at n = 12, 55 at n = 30), else ``d_max * 0.9`` (n = 10 and
    n >= 40, e.g. 0.9 at n = 40). Note the jump at n = 40 (77.5 just before, 0.9 at 40).
    """
    d_min = (n - 5) / 5
    d_max = (n - 20) / 20
    if abs(d_min) < 1:
        return d_min * 1e-4
    if abs(d_min) > 1 > abs(d_max):
        return abs(d_min + d_max) * 10
    return d_max * 0.9


class Length:
    """Length of the completion in words (whitespace-separated).

    With ``min_words`` and/or ``max_words``: 1.0 inside ``[min_words, max_words]``, falling linearly
    outside it: ``n / min_words`` below (0 at n = 0) and ``max(0, 1 - (n - max_words) / max_words)``
    above (0 at twice ``max_words``). An unset end is open. With neither set:
    :func:`preference_length_reward`.
    """

    def __init__(self, min_words: Optional[int] = None, max_words: Optional[int] = None):
        if min_words is not None and min_words < 0:
            raise ConfigError(f"length: min_words must be >= 0, got {min_words}")
        if max_words is not None and max_words <= 0:
            raise ConfigError(f"length: max_words must be > 0, got {max_words}")
        if min_words is not None and max_words is not None and min_words > max_words:
            raise ConfigError(f"length: min_words ({min_words}) > max_words ({max_words})")
        self.min_words, self.max_words = min_words, max_words
        self.name = "length"

    def score(self, n: int) -> float:
        if self.min_words is None and self.max_words is None:
            return preference_length_reward(n)
        if self.min_words and n < self.min_words:
            return n / self.min_words
        if self.max_words is not None and n > self.max_words:
            return max(0.0, 1.0 - (n - self.max_words) / self.max_words)
        return 1.0

    def __call__(self, prompts, completions, **columns) -> list[float]:
        return [float(self.score(len(c.split()))) for c in completions]


class TokenFrequency:
    """Fraction of the completion's whitespace-separated words equal to ``token`` (0 when empty).

    A test reward: a policy trained on it must learn to emit ``token`` more often.
    """

    def __init__(self, token: str):
        self.token = token
        self.name = f"token_frequency:{token}"

    def __call__(self, prompts, completions, **columns) -> list[float]:
        out = []
        for c in completions:
            words = c.split()
            out.append(sum(w == self.token for w in words) / len(words) if words else 0.0)
        return out


# --------------------------------------------------------------------------------------------
# Gibberish
# --------------------------------------------------------------------------------------------

_STRIP = ".,;:!?\"'()[]{}<>«»“”‘’`*_-—–…/\\"
_NUMBER = re.compile(r"[$€£]?\d+(?:[.,:]\d+)*(?:%|st|nd|rd|th|s|am|pm|k)?")
_CLITIC = re.compile(r"'(?:s|t|re|ve|ll|d|m)$")


@functools.lru_cache(maxsize=1)
def english_words() -> frozenset[str]:
    """The bundled English word list (SCOWL via Debian wamerican + wbritish; resources/README.md)."""
    return frozenset((RESOURCES / "words.txt").read_text(encoding="ascii").split())


def _is_word(token: str, words: frozenset[str]) -> Optional[bool]:
    """True for a dictionary word, False for a non-word, None for punctuation and numbers (ignored)."""
    t = token.replace("’", "'").strip(_STRIP).lower()
    if not t or _NUMBER.fullmatch(t):
        return None
    t = _CLITIC.sub("", t)  # don't -> don, cat's -> cat
    if len(t) == 1:
        return t in ("a", "i")
    parts = [p for p in re.split(r"[-']", t) if p]
    return bool(parts) and all(p in words for p in parts)


def _repeat_fraction(tokens: list[str], n: int = 3) -> float:
    """Fraction of word n-grams that repeat an earlier n-gram of the text (repetition loops)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    if len(grams) < 2:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def gibberish_parts(text: str) -> tuple[float, float]:
    """(dictionary-word ratio, repeated-trigram fraction) of ``text``; the ratio is 0 with no words."""
    words = english_words()
    tokens = text.split()
    status = [s for s in (_is_word(t, words) for t in tokens) if s is not None]
    ratio = sum(status) / len(status) if status else 0.0
    normalised = [t.replace("’", "'").strip(_STRIP).lower() for t in tokens]
    return ratio, _repeat_fraction([t for t in normalised if t])


def gibberish_score(text: str) -> float:
    """Offline cleanliness score in [0, 1]: dictionary-word ratio * (1 - repeated-trigram fraction).

    Fluent English scores ~1, random letters ~0, loops ("the the the the") are pulled down. A
    heuristic: it cannot see word salad made of real words; use a hub classifier (``model``) for that.
    """
    ratio, loops = gibberish_parts(text)
    return ratio * (1.0 - loops)


def gibberish_label(text: str, model: Optional[str] = None, device: Optional[str] = None) -> tuple[str, float]:
    """(label, confidence) with labels clean / mild gibberish / word salad / noise.

    With ``model`` (a HF classifier with those labels): the argmax label and its probability.
    Offline, from :func:`gibberish_parts` (ratio r, loops l, score s = r (1 - l)):
    ``("clean", s)`` if s >= 0.5; else ``("noise", 1 - r)`` if r < 0.5; else
    ``("word salad", l)`` if l >= 0.5; else ``("mild gibberish", 1 - s)``.
    """
    if model is not None:
        return gibberish_labels([text], model, device)[0]
    ratio, loops = gibberish_parts(text)
    s = ratio * (1.0 - loops)
    if s >= 0.5:
        return "clean", s
    if ratio < 0.5:
        return "noise", 1.0 - ratio
    if loops >= 0.5:
        return "word salad", loops
    return "mild gibberish", 1.0 - s


def gibberish_labels(texts: Sequence[str], model: Optional[str] = None, device: Optional[str] = None,
                     batch_size: int = 32, max_length: int = 512) -> list[tuple[str, float]]:
    """:func:`gibberish_label` of many texts (one batched classifier pass when ``model`` is set)."""
    if model is None:
        return [gibberish_label(t) for t in texts]
    device = device or _default_device()
    probs = classifier_logits(model, texts, batch_size, max_length, "right", device).softmax(-1)  # (N, C)
    names = _label_names(model, device)
    conf, idx = probs.max(-1)
    return [(names[i], float(c)) for i, c in zip(idx.tolist(), conf)]


class Gibberish:
    """p(clean) of the completion: a HF gibberish classifier (``model``, labels clean / mild
    gibberish / word salad / noise, e.g. ``madhurjindal/autonlp-Gibberish-Detector-492513457``) or,
    by default, the offline :func:`gibberish_score`."""

    def __init__(self, model: Optional[str] = None, batch_size: int = 32, max_length: int = 512,
                 device: Optional[str] = None):
        self.model, self.batch_size, self.max_length, self.device = model, batch_size, max_length, device
        self.name = f"gibberish:{model}" if model else "gibberish"

    def __call__(self, prompts, completions, **columns) -> list[float]:
        if self.model is None:
            return [gibberish_score(c) for c in completions]
        return Classifier(self.model, "clean", "probability", "completion", self.batch_size,
                          self.max_length, self.device)(prompts, completions)

    def labels(self, completions: Sequence[str]) -> list[tuple[str, float]]:
        return gibberish_labels(completions, self.model, self.device, self.batch_size, self.max_length)


# --------------------------------------------------------------------------------------------
# Combinators and user functions
# --------------------------------------------------------------------------------------------


class ReferenceNormalized:
    """``r(x, y) - r(x, y_ref)`` with ``y_ref`` from ``columns[reference_column]``.

    The reward of the human reference summary is subtracted (Stiennon et al., 2020, "Learning to
    summarize from human feedback": the reward model is normalised so that reference summaries
    score 0).
    """

    def __init__(self, base: RewardFn, reference_column: str):
        self.base = validate_reward(base)
        self.reference_column = reference_column
        self.name = f"reference_normalized:{self.base.name}"

    def __call__(self, prompts, completions, **columns) -> list[float]:
        refs = _column(columns, self.reference_column, len(completions), self.name)
        r = self.base(prompts, completions, **columns)
        r_ref = self.base(prompts, [str(y) for y in refs], **columns)
        return [a - b for a, b in zip(r, r_ref)]


class Composite:
    """Weighted sum of rewards plus a bias: ``bias + sum_k w_k r_k(x, y)``.

    ``parts`` is a list of ``(name, weight, fn)``; names must be distinct (they become the log keys
    ``reward/<name>``). ``score()`` returns the total and every part's raw (unweighted) values.
    """

    def __init__(self, parts: Sequence[tuple[str, float, RewardFn]], bias: float = 0.0):
        if not parts:
            raise ConfigError("composite reward needs at least one part")
        names = [p[0] for p in parts]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"composite reward: part names must be distinct, repeated: {dupes}")
        self.parts = [(str(name), float(w), validate_reward(fn, getattr(fn, "name", None) or str(name)))
                      for name, w, fn in parts]
        self.bias = float(bias)
        self.name = "composite"

    def score(self, prompts, completions, **columns) -> tuple[list[float], dict[str, list[float]]]:
        total = [self.bias] * len(completions)
        raw: dict[str, list[float]] = {}
        for name, weight, fn in self.parts:
            values = fn(prompts, completions, **columns)
            raw[name] = values
            total = [t + weight * v for t, v in zip(total, values)]
        return total, raw

    def __call__(self, prompts, completions, **columns) -> list[float]:
        return self.score(prompts, completions, **columns)[0]


class PythonReward:
    """A user's function named ``module:function`` (or ``path/to/file.py:function``).

    It is imported only when a config names it. A module not found on ``sys.path`` is looked up in
    the current directory as well (the ``rlhfkit`` console script does not put it on the path).
    """

    def __init__(self, spec: str):
        self.spec = spec
        self.name = f"python:{spec}"
        self.fn = load_function(spec)

    def __call__(self, prompts, completions, **columns) -> list[float]:
        return self.fn(prompts, completions, **columns)


def load_function(spec: str) -> Callable:
    """Import ``module:function`` or ``file.py:function`` and return the callable."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"reward function '{spec}' must look like module:function")
    try:
        if module_name.endswith(".py"):
            file = Path(module_name)
            if not file.is_file():
                raise UserError(f"reward function '{spec}': file {file} not found")
            mod_spec = importlib.util.spec_from_file_location(f"rlhfkit_user_reward_{file.stem}", file)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as e:
                if e.name != module_name.split(".")[0] or os.getcwd() in sys.path:
                    raise
                sys.path.insert(0, os.getcwd())
                module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"reward function '{spec}': cannot import '{module_name}' ({e})") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise UserError(f"reward function '{spec}': module '{module_name}' has no '{attr}'")
    if not callable(fn):
        raise UserError(f"reward function '{spec}': '{attr}' is not callable")
    return fn


# --------------------------------------------------------------------------------------------
# From config
# --------------------------------------------------------------------------------------------


def reward_from_config(cfg: RewardConfig | dict, device: Optional[str] = None) -> RewardFn:
    """One reward function (unweighted, not validated) from a ``RewardConfig`` section."""
    if isinstance(cfg, dict):
        cfg = from_dict(RewardConfig, cfg, source="reward config", prefix="reward.")
    cfg.validate()
    kind = cfg.kind
    if kind == "classifier":
        return Classifier(cfg.model, cfg.label, cfg.output, cfg.text, cfg.batch_size, cfg.max_length, device)
    if kind == "reward_model":
        return RewardModel(cfg.model, cfg.normalize, cfg.batch_size, cfg.max_length, device)
    if kind == "toxicity":
        return Toxicity(cfg.backend, cfg.invert)
    if kind == "sentiment":
        return Sentiment()
    if kind == "label_match":
        return LabelMatch(cfg.target_column, cfg.model, None, cfg.batch_size, cfg.max_length, device)
    if kind == "length":
        return Length(cfg.min_words, cfg.max_words)
    if kind == "gibberish":
        return Gibberish(cfg.model, cfg.batch_size, cfg.max_length, device)
    if kind == "token_frequency":
        return TokenFrequency(cfg.token)
    if kind == "python":
        return PythonReward(cfg.function)
    if kind == "reference_normalized":
        base = from_dict(RewardConfig, cfg.base, source="reward config", prefix="reward.base.")
        if base.kind == "reference_normalized":
            raise ConfigError("reward.base of reference_normalized cannot itself be reference_normalized")
        return ReferenceNormalized(validate_reward(reward_from_config(base, device)), cfg.reference_column)
    raise ConfigError(f"unknown reward kind '{kind}'")  # validate() already rejects it


def build_reward(cfgs: Sequence[RewardConfig | dict] | RewardConfig | dict, bias: float = 0.0,
                 device: Optional[str] = None) -> Composite:
    """The recipe's reward: ``bias + sum_k weight_k r_k`` over the configured rewards.

    Always a :class:`Composite` (one part for a single config), so recipes can log every part via
    ``.score()``. Part names are ``cfg.name`` or the kind, numbered when a kind repeats
    (``classifier``, ``classifier_2``).
    """
    if isinstance(cfgs, (RewardConfig, dict)):
        cfgs = [cfgs]
    parts = []
    seen: dict[str, int] = {}
    for cfg in cfgs:
        if isinstance(cfg, dict):
            cfg = from_dict(RewardConfig, cfg, source="reward config", prefix="reward.")
        fn = reward_from_config(cfg, device)
        name = cfg.name or cfg.kind
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            if cfg.name:
                raise ConfigError(f"two rewards are named '{name}'; names must be distinct")
            name = f"{name}_{seen[name]}"
        label = f"{cfg.name} ({fn.name})" if cfg.name and cfg.name != fn.name else fn.name
        parts.append((name, cfg.weight, validate_reward(fn, label)))
    return Composite(parts, bias)


__all__ = [
    "RewardFn", "ValidatedReward", "validate_reward", "check_rewards", "join_prompt_completion",
    "classifier_logits", "Classifier", "RewardModel", "reward_input_ids", "pad_right",
    "last_token_rewards", "reward_spec", "toxicity_prob", "Toxicity", "vader_compound",
    "vader_label", "Sentiment", "LabelMatch", "preference_length_reward", "Length", "TokenFrequency",
    "english_words", "gibberish_parts", "gibberish_score", "gibberish_label", "gibberish_labels",
    "Gibberish", "ReferenceNormalized", "Composite", "PythonReward", "load_function",
    "reward_from_config", "build_reward", "GIBBERISH_LABELS",
]
