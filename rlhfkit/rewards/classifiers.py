"""Rewards from classifiers: any Hugging Face sequence classifier (:class:`Classifier`), VADER
sentiment (:class:`Sentiment`) and label match (:class:`LabelMatch`, by VADER, a classifier or a
user's labeller). The classifier loading and batched logits here are shared with the reward-model
and gibberish rewards.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

from rlhfkit.config import ConfigError, UserError
from rlhfkit.rewards.base import _column, join_prompt_completion



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



# --------------------------------------------------------------------------------------------
# Sentiment and label match
# --------------------------------------------------------------------------------------------


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
