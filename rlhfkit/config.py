"""Typed configuration: dataclasses with a docstring per field, YAML files, dotted overrides.

Every command has one top-level dataclass (``SFTConfig``, ``PPOConfig``, ...), composed of the
shared sections defined here (``ModelConfig``, ``DataConfig``, ``TrainConfig``, ``LoraConfig``,
``GenerationConfig``, ``RewardConfig``). Loading works the same for all of them::

    cfg = load_config(SFTConfig, "examples/sft_smollm2.yaml", ["train.lr=1e-4", "data.max_rows=64"])

Rules (litgpt / tyro style):
- an unknown key is an error with a did-you-mean suggestion;
- values are converted to the field's type (``"1e-4"`` -> float) or rejected;
- ``validate()`` of each section rejects conflicting settings; nothing is changed silently.
  Config objects never rewrite themselves: "auto" values are resolved where they are used.

Errors raise ``ConfigError`` (a ``UserError``), which the CLI prints as one ``error:`` line and
exits with status 2.
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import inspect
import os
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class UserError(Exception):
    """Bad input or configuration: the CLI prints ``error: <message>`` and exits with status 2."""


class ConfigError(UserError):
    """A configuration key or value is wrong."""


# --------------------------------------------------------------------------------------------
# Shared sections
# --------------------------------------------------------------------------------------------


MIN_MAX_LENGTH = 16
"""The smallest ``model.max_length`` accepted: below it every row is cut to (almost) nothing."""


@dataclass
class ModelConfig:
    name_or_path: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    """Hugging Face hub name or local folder of the policy (or backbone). ``asset:smollm2`` names
    the offline SmolLM2-135M-Instruct asset (converted once to safetensors and cached)."""
    tokenizer: Optional[str] = None
    """Tokenizer name or path when it differs from ``name_or_path``."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) to load."""
    dtype: str = "auto"
    """Weights dtype: ``auto`` (fp32 on CPU, bf16 on a GPU that supports it, else fp32), ``float32``,
    ``bfloat16`` or ``float16``."""
    trust_remote_code: bool = False
    """Allow code from the model's repository to run. Off unless set here."""
    max_length: int = 512
    """Longest prompt + completion (tokens) the model is given; also the tokenizer's
    ``model_max_length`` when the tokenizer does not set a smaller one. At least 16. Above the
    model's position limit (``max_position_embeddings`` / ``n_positions`` in its config.json) it is
    lowered to that limit when the model loads, with a logged line."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory (slower)."""
    attn_implementation: Optional[str] = None
    """``eager``, ``sdpa`` or ``flash_attention_2``; None lets transformers choose."""

    def validate(self) -> None:
        _check_choice("model.dtype", self.dtype, ["auto", "float32", "bfloat16", "float16"])
        if self.max_length is None or self.max_length < MIN_MAX_LENGTH:
            raise ConfigError(f"model.max_length must be at least {MIN_MAX_LENGTH} tokens (a prompt and a "
                              f"completion must both fit), got {self.max_length}")


@dataclass
class LoraConfig:
    enabled: bool = False
    """Train low-rank adapters (peft LoRA) instead of all weights."""
    r: int = 16
    """Rank of the adapters."""
    alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: ["auto"])
    """Module names to adapt. ``["auto"]`` picks the attention projections for the architecture
    (peft's per-model defaults); ``["all-linear"]`` adapts every linear layer but the output."""
    adapter_path: Optional[str] = None
    """Start from a trained adapter (folder written by rlhfkit or peft) instead of a fresh one."""
    merge_on_save: bool = False
    """Also save the base with the adapter merged in (``<output_dir>/merged``)."""

    def validate(self) -> None:
        _check_positive("lora.r", self.r)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.adapter_path and not self.enabled:
            raise ConfigError("lora.adapter_path is set but lora.enabled is false; set lora.enabled=true")


@dataclass
class DataConfig:
    path: str = ""
    """A .jsonl / .json / .csv / .parquet file, a ``datasets.save_to_disk`` folder, or a hub dataset
    name for ``datasets.load_dataset``."""
    split: str = "train"
    """Split to read (hub datasets and DatasetDict folders)."""
    subset: Optional[str] = None
    """Hub dataset configuration name."""
    eval_path: Optional[str] = None
    """Held-out data in the same format; when unset, ``eval_fraction`` of ``path`` is held out."""
    eval_split: Optional[str] = None
    """Split of ``path`` to use as held-out data (hub datasets), e.g. ``test`` or ``validation``."""
    eval_fraction: float = 0.1
    """Fraction of rows held out when neither ``eval_path`` nor ``eval_split`` is set."""
    columns: dict[str, str] = field(default_factory=dict)
    """Map of the recipe's column names to the dataset's, e.g. ``{prompt: dialogue, completion: summary}``."""
    prompt_template: Optional[str] = None
    """Python format string that builds the prompt from row columns, e.g.
    ``"Summarize the following conversation.\\n\\n{dialogue}\\n\\nSummary:"``. None uses the
    ``prompt`` column as it is."""
    chat_template: str = "auto"
    """Wrap prompts in the tokenizer's chat template: ``auto`` (when the tokenizer has one), ``true``
    or ``false``."""
    system_prompt: Optional[str] = None
    """System message placed before the prompt when the chat template is used."""
    max_prompt_length: int = 384
    """Longest prompt in tokens; longer prompts follow ``overlong``."""
    max_completion_length: int = 128
    """Longest completion in tokens; longer completions follow ``overlong``."""
    overlong: str = "truncate"
    """Policy for over-long rows: ``truncate`` (prompt from the left, completion from the right) or
    ``drop``. Either way the count is logged and written to the summary."""
    drop_invalid: bool = False
    """Drop rows that fail the schema check (missing or empty field, chosen == rejected) with a
    counted warning, instead of stopping with an error."""
    where: dict[str, str] = field(default_factory=dict)
    """Keep only rows whose columns equal these values, e.g. ``{split: test}`` (applied to every
    table read, before the held-out split)."""
    max_rows: Optional[int] = None
    """Use only the first N rows (after the split), for quick runs."""
    shuffle_seed: int = 0
    """Seed of the held-out split."""

    def validate(self) -> None:
        _check_choice("data.chat_template", self.chat_template, ["auto", "true", "false"])
        _check_choice("data.overlong", self.overlong, ["truncate", "drop"])
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        _check_positive("data.max_prompt_length", self.max_prompt_length)
        _check_positive("data.max_completion_length", self.max_completion_length)


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    """Folder for the model, config.yaml, metrics.jsonl, summary.json and checkpoints."""
    seed: int = 0
    """Seed for torch, numpy and python random."""
    lr: float = 1e-5
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    scheduler: str = "constant"
    """Learning-rate schedule after warm-up: ``constant``, ``linear`` or ``cosine``."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    batch_size: int = 8
    """Rows per micro-batch on each process."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    max_steps: int = 100
    """Optimizer steps to run (online recipes: PPO/GRPO iterations)."""
    epochs: Optional[int] = None
    """If set, run this many passes over the training data instead of ``max_steps``."""
    max_grad_norm: Optional[float] = 1.0
    """Clip the gradient norm to this value; None disables clipping."""
    log_every: int = 1
    """Write metrics every N steps."""
    eval_every: int = 0
    """Evaluate on held-out data every N steps (0: only at the start and the end)."""
    checkpoint_every: int = 0
    """Write a resumable checkpoint every N steps (0: only on interrupt)."""
    keep_checkpoints: int = 1
    """How many checkpoints to keep."""
    precision: str = "auto"
    """``auto`` (fp32 on CPU, bf16 autocast on a GPU that supports it), ``fp32``, ``bf16`` or ``fp16``."""
    cpu: bool = False
    """Run on the CPU even when a GPU is present."""
    group_by_length: bool = True
    """Draw micro-batches of similar length (less padding)."""
    save_model: bool = True
    """Save the final model (adapter-only for LoRA) into ``output_dir``."""
    progress: bool = True
    """Show a progress bar with rate and ETA."""

    def validate(self) -> None:
        _check_choice("train.scheduler", self.scheduler, ["constant", "linear", "cosine"])
        _check_choice("train.precision", self.precision, ["auto", "fp32", "bf16", "fp16"])
        _check_positive("train.batch_size", self.batch_size)
        _check_positive("train.grad_accum", self.grad_accum)
        _check_positive("train.max_steps", self.max_steps)
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if len(self.adam_betas) != 2:
            raise ConfigError(f"train.adam_betas needs two numbers, got {self.adam_betas}")
        if self.precision in ("bf16", "fp16") and self.cpu:
            raise ConfigError(f"train.precision={self.precision} conflicts with train.cpu=true; use fp32 on CPU")


@dataclass
class ReferenceConfig:
    kind: str = "auto"
    """Reference policy: ``auto``, ``disabled_adapter`` (the LoRA base with the adapter switched
    off: no second copy in memory), ``copy`` (a frozen copy of the start model, or of ``model``),
    ``adapter`` (a trained adapter loaded frozen as a second, named adapter on the same base),
    or ``none`` (reference-free losses). ``auto``: ``adapter`` when the policy starts from
    ``lora.adapter_path``, ``disabled_adapter`` for a fresh LoRA, else ``copy``."""
    model: Optional[str] = None
    """``copy``: model name or path of the reference when it is not the policy's start model
    (e.g. the SFT model)."""
    adapter_path: Optional[str] = None
    """``adapter``: adapter folder to load as the reference (default: ``lora.adapter_path``)."""

    def validate(self) -> None:
        _check_choice("reference.kind", self.kind, ["auto", "disabled_adapter", "copy", "adapter", "none"])


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    """Most tokens generated per response."""
    min_new_tokens: int = 0
    """Fewest tokens generated per response (EOS is suppressed until then)."""
    do_sample: bool = True
    """Sample (True) or decode greedily (False)."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_k: int = 0
    """Keep the k most likely tokens (0: off)."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1.0: off)."""
    repetition_penalty: float = 1.0
    """transformers' repetition penalty (1.0: off)."""
    output_length_range: Optional[list[int]] = None
    """``[lo, hi]``: draw each batch's max_new_tokens uniformly from this range (trlX's
    LengthSampler), instead of using max_new_tokens."""
    batch_size: int = 16
    """Prompts per generate call."""
    backend: str = "hf"
    """``hf`` (transformers generate with KV cache) or ``vllm`` (GPU, optional extra)."""

    def validate(self) -> None:
        _check_positive("generation.max_new_tokens", self.max_new_tokens)
        _check_positive("generation.batch_size", self.batch_size)
        _check_choice("generation.backend", self.backend, ["hf", "vllm"])
        if self.min_new_tokens > self.max_new_tokens:
            raise ConfigError(
                f"generation.min_new_tokens ({self.min_new_tokens}) > generation.max_new_tokens ({self.max_new_tokens})"
            )
        if self.do_sample and self.temperature <= 0:
            raise ConfigError("generation.temperature must be > 0 when do_sample is true")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"generation.top_p must be in (0, 1], got {self.top_p}")
        if self.output_length_range is not None:
            lo_hi = self.output_length_range
            if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1]:
                raise ConfigError(f"generation.output_length_range must be [lo, hi] with 0 < lo <= hi, got {lo_hi}")


@dataclass
class RewardConfig:
    kind: str = "toxicity"
    """Reward function: ``classifier``, ``reward_model``, ``toxicity``, ``sentiment``,
    ``label_match``, ``length``, ``gibberish``, ``reference_normalized``, ``token_frequency``, or
    ``python``. Several rewards in a list are summed with their weights (the composite reward)."""
    weight: float = 1.0
    """Weight in the composite sum."""
    name: Optional[str] = None
    """Name used in logs (``reward/<name>``); defaults to ``kind``."""
    model: Optional[str] = None
    """Model name or path (``classifier``, ``reward_model``, ``gibberish`` with a hub classifier)."""
    label: Optional[str] = None
    """Classifier label to read (name or index), e.g. ``nothate``."""
    output: str = "logit"
    """What to read from a classifier: ``logit`` or ``probability``."""
    text: str = "completion"
    """``classifier``: the text classified, ``completion`` or ``prompt+completion`` (joined with a
    space, as for reward models)."""
    backend: str = "profanity_check"
    """``toxicity`` scorer: ``profanity_check`` (alt-profanity-check) or ``hatesonar``."""
    invert: bool = True
    """``toxicity``: return 1 - p(toxic) (non-toxicity, a reward) instead of p(toxic)."""
    target_column: Optional[str] = None
    """``label_match``: row column holding the target label (e.g. an emotion or sentiment)."""
    min_words: Optional[int] = None
    """``length``: lower end of the target range in words; with ``max_words`` unset and this unset
    the piecewise preference-generation formula is used."""
    max_words: Optional[int] = None
    """``length``: upper end of the target range in words."""
    reference_column: Optional[str] = None
    """``reference_normalized``: column with the reference completion y_ref; the reward is
    r(x, y) - r(x, y_ref) with r given by ``base``."""
    base: Optional[dict] = None
    """``reference_normalized``: the reward config (same keys as this section) of the inner reward."""
    normalize: bool = False
    """``reward_model``: standardise scores with the mean/std saved by ``rlhfkit reward``."""
    token: Optional[str] = None
    """``token_frequency``: the string whose frequency (per word) is rewarded (a test reward)."""
    function: Optional[str] = None
    """``python``: ``module:function`` with signature ``fn(prompts, completions, **columns)``."""
    batch_size: int = 32
    """Texts per classifier forward."""
    max_length: int = 512
    """Truncate classifier inputs to this many tokens."""

    def validate(self) -> None:
        kinds = [
            "classifier", "reward_model", "toxicity", "sentiment", "label_match", "length",
            "gibberish", "reference_normalized", "token_frequency", "python",
        ]
        _check_choice("reward.kind", self.kind, kinds)
        _check_choice("reward.output", self.output, ["logit", "probability"])
        _check_choice("reward.text", self.text, ["completion", "prompt+completion"])
        _check_choice("reward.backend", self.backend, ["profanity_check", "hatesonar"])
        needs = {
            "classifier": ["model"], "reward_model": ["model"], "label_match": ["target_column"],
            "reference_normalized": ["reference_column", "base"], "python": ["function"],
            "token_frequency": ["token"],
        }
        for key in needs.get(self.kind, []):
            if getattr(self, key) in (None, ""):
                raise ConfigError(f"reward kind '{self.kind}' needs '{key}'")


# --------------------------------------------------------------------------------------------
# Loading: YAML + dotted overrides -> typed dataclass
# --------------------------------------------------------------------------------------------


def load_config(cls: type, path: Optional[str | os.PathLike] = None, overrides: list[str] | None = None):
    """Build ``cls`` from a YAML file plus ``key.sub=value`` overrides, then validate it."""
    raw: dict[str, Any] = {}
    source = str(path) if path else "<defaults>"
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{p}:{where} invalid YAML ({getattr(e, 'problem', e)})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of keys, got {type(loaded).__name__}")
        raw = loaded
    file_raw = copy.deepcopy(raw)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.sub=value")
        key, value = item.split("=", 1)
        set_dotted(raw, key.strip(), _parse_override(cls, key.strip(), value))
    try:
        cfg = from_dict(cls, raw, source=source)
    except ConfigError:
        if overrides:
            _blame_override(cls, file_raw, overrides, source)
        raise
    validate(cfg)
    return cfg


def _blame_override(cls: type, file_raw: dict, overrides: list[str], source: str) -> None:
    """The config failed to build: when the file alone builds, re-raise the error as the first
    command-line override's that breaks it (a typo in ``trian.lr=1`` is not the YAML file's)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from_dict(cls, copy.deepcopy(file_raw), source=source)
        except ConfigError:
            return  # the file itself is at fault: the original error stands
        raw = copy.deepcopy(file_raw)
        for item in overrides:
            key, value = item.split("=", 1)
            set_dotted(raw, key.strip(), _parse_override(cls, key.strip(), value))
            try:
                from_dict(cls, copy.deepcopy(raw), source=f"override '{item}'")
            except ConfigError as e:
                raise ConfigError(str(e)) from None


def from_dict(cls: type, data: dict, source: str = "<dict>", prefix: str = "", base: Any = None):
    """Convert a nested dict into dataclass ``cls``; unknown keys raise with a suggestion.

    Keys not given keep their defaults, including a section default set by the enclosing
    dataclass (a recipe's ``data: DataConfig = field(default_factory=lambda: DataConfig(...))``);
    ``base`` is that default.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or 'config'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = list(fields)
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            guess = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{guess[0]}'?" if guess else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"{source}: unknown key '{prefix}{key}'{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp) and (value is None or isinstance(value, dict)):
            section = _field_default(fields[key])
            kwargs[key] = section if value is None else from_dict(tp, value, source, f"{prefix}{key}.", section)
        else:
            kwargs[key] = _convert(tp, value, f"{prefix}{key}", source)
    return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    if f.default is not dataclasses.MISSING:
        return copy.deepcopy(f.default)
    return None


def validate(cfg) -> None:
    """Call ``validate()`` on ``cfg`` and on every nested section."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            validate(value)
        elif isinstance(value, list):
            for v in value:
                if dataclasses.is_dataclass(v):
                    validate(v)
    check = getattr(cfg, "validate", None)
    if callable(check):
        check()


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: str | os.PathLike) -> None:
    """Write ``cfg`` as YAML to ``path`` (a run's ``config.yaml``). A ``summary.json`` beside it is
    removed: it marked an earlier run finished, and with this config beside it a pipeline would take
    the new run, should it fail, for finished (recipes write ``summary.json`` last, on success)."""
    from rlhfkit.utils import atomic_write_text

    Path(path).with_name("summary.json").unlink(missing_ok=True)
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass (the string right after each field)."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    tree = ast.parse(src)
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                if isinstance(nxt.value.value, str):
                    docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe(cls: type, prefix: str = "", defaults: Any = None) -> list[tuple[str, str, str]]:
    """(dotted key, default, doc) for every field, recursing into sections: the ``--help`` text.

    ``defaults``: the section's default instance as the enclosing dataclass builds it."""
    rows = []
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if defaults is not None:
            default = getattr(defaults, f.name)
        elif f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = _field_default(f)
        else:
            default = ""
        if dataclasses.is_dataclass(t):
            rows.extend(describe(t, f"{prefix}{f.name}.", default if dataclasses.is_dataclass(default) else None))
            continue
        rows.append((f"{prefix}{f.name}", repr(default), docs.get(f.name, "")))
    return rows


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _parse_override(cls: type, key: str, text: str) -> Any:
    """The value of ``key=text``: verbatim for a text field (a prompt template may hold ``:``,
    ``{}`` or ``#``) unless YAML-quoted (``'"a\\nb"'`` has a newline), else YAML (numbers,
    booleans, null, ``[lists]``, ``{maps}``)."""
    tp: Any = cls
    for part in key.split("."):
        hints = typing.get_type_hints(tp) if dataclasses.is_dataclass(tp) else {}
        tp = hints.get(part)
    args = set(typing.get_args(tp))
    if tp is str or (typing.get_origin(tp) in (Union, types.UnionType) and args == {str, type(None)}):
        if len(text) >= 2 and text[0] in "\"'" and text[-1] == text[0]:
            try:
                return str(yaml.safe_load(text))
            except yaml.YAMLError:
                return text
        return None if tp is not str and text.strip() in ("null", "~", "None") else text
    if text == "":
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{key}': cannot parse value {text!r} ({getattr(e, 'problem', e)})") from None


def set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{key}': '{part}' is not a section")
        node = nxt
    node[parts[-1]] = value


def section_items(cls: type, key: str, value: Any) -> list[tuple[str, Any]]:
    """``(dotted key, value)`` pairs for setting ``key`` of ``cls``: a dict given for a section (a
    dataclass field) becomes one pair per entry, recursively, so it merges into the section; any
    other value (a dict-valued field such as ``data.columns`` too) is one pair that replaces."""
    tp: Any = cls
    for part in key.split("."):
        hints = typing.get_type_hints(tp) if dataclasses.is_dataclass(tp) else {}
        tp = hints.get(part)
    if isinstance(value, dict) and dataclasses.is_dataclass(tp):
        return [pair for k, v in value.items() for pair in section_items(cls, f"{key}.{k}", v)]
    return [(key, value)]


def make_config(cls: type, config: Any = None, source: str = "train()", **overrides: Any):
    """A validated ``cls`` for the Python API: from a ``cls`` object, a YAML path or a dict of
    (nested or dotted) keys, then ``overrides`` (dotted keys with ``__`` for ``.``, e.g.
    ``train__lr=1e-4``, or whole sections as dicts, merged into them)."""
    if isinstance(config, cls):
        base = to_dict(config)
    elif isinstance(config, (str, os.PathLike)):
        base = to_dict(load_config(cls, config))
    elif config is None or isinstance(config, dict):
        base = to_dict(cls())
        for key, value in (config or {}).items():
            for k, v in section_items(cls, key, value):
                set_dotted(base, k, v)
    else:
        raise UserError(f"{source}: config must be a {cls.__name__}, a YAML path or a dict, got {type(config).__name__}")
    for key, value in overrides.items():
        for k, v in section_items(cls, key.replace("__", "."), value):
            set_dotted(base, k, v)
    cfg = from_dict(cls, base, source=source)
    validate(cfg)
    return cfg


def _convert(tp: Any, value: Any, key: str, source: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    bad = ConfigError(f"{source}: '{key}' expects {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, key, source)
            except ConfigError as e:
                errors.append(e)
        raise bad
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{source}: '{key}' must be one of {list(args)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if value is None:
            return tp()
        return from_dict(tp, value, source, prefix=f"{key}.")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            value = [value]
        (inner,) = args or (Any,)
        return [_convert(inner, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, bool):  # YAML reads `true` as a bool: `data.chat_template=true` means "true"
            return "true" if value else "false"
        if isinstance(value, (str, int, float)):
            return str(value)
        raise bad
    return value


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (Union, types.UnionType):  # Optional[str] -> "str or None"
        return " or ".join("None" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_choice(key: str, value: Any, choices: list) -> None:
    if value not in choices:
        guess = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f"; did you mean '{guess[0]}'?" if guess else ""
        raise ConfigError(f"{key} must be one of {choices}, got '{value}'{hint}")


def _check_positive(key: str, value: Any) -> None:
    if value is None or value <= 0:
        raise ConfigError(f"{key} must be > 0, got {value}")
