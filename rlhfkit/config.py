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
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
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
    load_in_4bit: bool = False
    """QLoRA: load the linear layers of the base in 4 bits (bitsandbytes ``Linear4bit``, through
    transformers' ``BitsAndBytesConfig``) and train LoRA adapters on it; needs ``lora.enabled`` and
    the ``quant`` extra (``pip install 'rlhfkit[quant]'``)."""
    load_in_8bit: bool = False
    """Load the linear layers of the base in 8 bits (bitsandbytes LLM.int8, ``Linear8bitLt``);
    needs ``lora.enabled`` and the ``quant`` extra."""
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type: ``nf4`` (NormalFloat, the QLoRA paper's) or ``fp4``."""
    bnb_4bit_use_double_quant: bool = False
    """Quantise the 4-bit blocks' scales too (about 0.4 bits per parameter less)."""
    bnb_4bit_compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype the 4-bit weights are dequantised to for each matmul; ``auto``: the model's dtype."""

    def validate(self) -> None:
        if self.max_length is None or self.max_length < MIN_MAX_LENGTH:
            raise ConfigError(f"model.max_length must be at least {MIN_MAX_LENGTH} tokens (a prompt and a "
                              f"completion must both fit), got {self.max_length}")
        if self.load_in_4bit and self.load_in_8bit:
            raise ConfigError("model.load_in_4bit and model.load_in_8bit are both set; choose one")

    @property
    def quantized(self) -> bool:
        return self.load_in_4bit or self.load_in_8bit


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
    chat_template: Literal["auto", "true", "false"] = "auto"
    """Wrap prompts in the tokenizer's chat template: ``auto`` (when the tokenizer has one), ``true``
    or ``false``."""
    system_prompt: Optional[str] = None
    """System message placed before the prompt when the chat template is used."""
    max_prompt_length: int = 384
    """Longest prompt in tokens; longer prompts follow ``overlong``."""
    max_completion_length: int = 128
    """Longest completion in tokens; longer completions follow ``overlong``."""
    overlong: Literal["truncate", "drop"] = "truncate"
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
    scheduler: Literal["constant", "linear", "cosine"] = "constant"
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
    checkpoint_every: int = 0
    """Write a resumable checkpoint every N steps (0: only on interrupt)."""
    keep_checkpoints: int = 1
    """How many checkpoints to keep."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """``auto`` (fp32 on CPU, bf16 autocast on a GPU that supports it), ``fp32``, ``bf16`` or ``fp16``."""
    cpu: bool = False
    """Run on the CPU even when a GPU is present."""
    group_by_length: bool = True
    """Draw micro-batches of similar length (less padding)."""
    save_model: bool = True
    """Save the final model (adapter-only for LoRA) into ``output_dir``."""
    progress: bool = True
    """Show a progress bar with rate and ETA."""
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    """How several processes share the work: ``auto`` (one process, or what the launcher asked
    for: DDP under ``torchrun``/``accelerate launch``, FSDP2 or DeepSpeed from an accelerate config
    file), ``ddp`` (a full copy per process, gradients averaged) or ``fsdp`` (FSDP2: parameters,
    gradients and optimizer state sharded across the processes; sft, reward, dpo and kto only)."""
    fsdp_cpu_offload: bool = False
    """``strategy=fsdp`` on GPUs: keep the parameter shards, their gradients and the optimizer step
    in CPU memory (fits larger models on small GPUs; slower)."""
    report_to: list[Literal["tensorboard", "wandb", "trackio", "mlflow"]] = field(default_factory=list)
    """Experiment trackers (accelerate's) that get every metric of ``metrics.jsonl`` at the same step,
    the resolved config once, and evaluation sample tables where the tracker has tables (wandb):
    ``tensorboard`` (events under ``<output_dir>/tensorboard``), ``wandb``, ``trackio``, ``mlflow``
    (``MLFLOW_TRACKING_URI``). Each is an optional extra, e.g. ``pip install 'rlhfkit[trackers]'``."""
    run_name: Optional[str] = None
    """Run name shown by the trackers; None: the name of ``output_dir``."""
    project: str = "rlhfkit"
    """Tracker project (wandb/trackio project, MLflow experiment, TensorBoard sub-folder)."""
    best_metric: Optional[str] = None
    """Keep the model with the best value of this evaluation metric (e.g. ``eval/loss``,
    ``eval/accuracy``, ``eval/reward``) in ``output_dir/best`` and record ``best_step`` /
    ``best_value`` in summary.json; the metric must be one the recipe logs at each evaluation.
    None: keep only the last model."""
    best_mode: Literal["max", "min"] = "max"
    """Whether a larger (``max``) or smaller (``min``, e.g. a loss) ``best_metric`` is better."""

    def validate(self) -> None:
        _check_positive("train.batch_size", self.batch_size)
        _check_positive("train.grad_accum", self.grad_accum)
        _check_positive("train.max_steps", self.max_steps)
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if len(self.adam_betas) != 2:
            raise ConfigError(f"train.adam_betas needs two numbers, got {self.adam_betas}")
        if self.precision in ("bf16", "fp16") and self.cpu:
            raise ConfigError(f"train.precision={self.precision} conflicts with train.cpu=true; use fp32 on CPU")
        import importlib.util

        for name in self.report_to:
            if importlib.util.find_spec(name) is None:
                raise ConfigError(f"train.report_to: {name} is not installed; pip install 'rlhfkit[{name}]'")


@dataclass
class EvalConfig:
    every: int = 0
    """Evaluate on held-out data every N steps (0: only at the start and the end)."""
    batch_size: int = 16
    """Rows (pairs, prompts) per forward or generate call when evaluating."""
    max_rows: Optional[int] = None
    """Evaluate on at most this many held-out rows (online recipes: prompts; ilql: rows of the held-out
    loss and prompts decoded); None: all."""

    def validate(self) -> None:
        if self.every < 0:
            raise ConfigError(f"eval.every must be >= 0, got {self.every}")
        _check_positive("eval.batch_size", self.batch_size)
        if self.max_rows is not None and self.max_rows < 0:
            raise ConfigError(f"eval.max_rows must be >= 0, got {self.max_rows}")


@dataclass
class ReferenceConfig:
    kind: Literal["auto", "disabled_adapter", "copy", "adapter", "none"] = "auto"
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

    precompute: bool = False
    """Offline preference recipes (dpo, kto): compute the reference log-probs of all training rows
    once before training (one no-grad pass), cache them on disk and free the reference; a later run
    with the same reference, data and lengths reuses the cache."""
    cache_dir: Optional[str] = None
    """Folder of the precomputed reference log-probs; None: ``$RLHFKIT_CACHE/reference_logps``
    (``~/.cache/rlhfkit/reference_logps``)."""


@dataclass
class VLLMConfig:
    """``generation.vllm``: the colocated vLLM engine of ``generation.backend: vllm`` (one per process)."""

    gpu_memory_utilization: float = 0.3
    """Share of the GPU memory vLLM may take for weights and KV cache (the trainer keeps the
    rest). On a CPU the KV cache size comes from ``VLLM_CPU_KVCACHE_SPACE`` (GiB; 1 when unset)."""
    max_model_len: Optional[int] = None
    """Longest prompt + completion (tokens) the engine serves; None: the tokenizer's
    ``model_max_length`` (which rlhfkit sets from ``model.max_length``) when the model allows it,
    else the model's own limit."""
    dtype: str = "auto"
    """Engine weights dtype: ``auto`` (the policy's own dtype), ``float32``, ``bfloat16`` or
    ``float16``. Synced weights are cast to it."""
    enable_sleep_mode: bool = False
    """Between rollouts put the engine to sleep (KV cache freed, weights offloaded to CPU memory)
    so the training step has the GPU; woken before the next weight sync. CUDA only."""
    tensor_parallel_size: int = 1
    """GPUs the engine shards the policy over (vLLM tensor parallelism)."""

    def validate(self) -> None:
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError("generation.vllm.gpu_memory_utilization must be in (0, 1], "
                              f"got {self.gpu_memory_utilization}")
        if self.max_model_len is not None:
            _check_positive("generation.vllm.max_model_len", self.max_model_len)
        _check_choice("generation.vllm.dtype", self.dtype, ["auto", "float32", "bfloat16", "float16"])
        _check_positive("generation.vllm.tensor_parallel_size", self.tensor_parallel_size)


@dataclass
class OpenAIConfig:
    """``generation.openai``: an OpenAI-compatible endpoint for ``generation.backend: openai``
    (generation-only commands: eval, prefs, judge, constitutional, redteam)."""

    base_url: str = "https://api.openai.com/v1"
    """Endpoint root, e.g. ``http://127.0.0.1:8000/v1`` for ``vllm serve``."""
    model: str = ""
    """Model name the endpoint serves (required)."""
    api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable holding the API key (the key itself never goes in a
    config). Unset variable: the key ``EMPTY`` (local servers take any key)."""
    max_concurrency: int = 8
    """Requests in flight at once."""
    max_retries: int = 3
    """Retries of a failed request (connection error, timeout, 408/409/429/5xx), with
    exponential backoff (the ``openai`` client's own); then the command stops with an error."""
    timeout: float = 120.0
    """Seconds before one request times out."""
    cache: Optional[str] = ".cache/openai"
    """Folder of the response cache (an SQLite file keyed by endpoint, model, request and seed):
    a re-run with the same config sends nothing already answered, and an interrupted run keeps
    what was answered. None: no cache."""

    def validate(self) -> None:
        _check_positive("generation.openai.max_concurrency", self.max_concurrency)
        if self.max_retries < 0:
            raise ConfigError(f"generation.openai.max_retries must be >= 0, got {self.max_retries}")
        _check_positive("generation.openai.timeout", self.timeout)


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
    """``hf`` (transformers ``generate`` with KV cache), ``vllm`` (a colocated vLLM engine that
    holds the policy's current weights; the ``gpu`` extra, or ``vllm-cpu``) or ``openai`` (an
    OpenAI-compatible endpoint; generation-only commands; the ``openai`` extra)."""
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    """Engine settings of ``backend: vllm``."""
    openai: OpenAIConfig = field(default_factory=OpenAIConfig)
    """Endpoint settings of ``backend: openai``."""

    def validate(self) -> None:
        _check_positive("generation.max_new_tokens", self.max_new_tokens)
        _check_positive("generation.batch_size", self.batch_size)
        _check_choice("generation.backend", self.backend, ["hf", "vllm", "openai"])
        if self.backend == "openai" and not self.openai.model:
            raise ConfigError("generation.backend=openai needs generation.openai.model")
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
    kind: Literal["classifier", "reward_model", "toxicity", "sentiment", "label_match", "length", "gibberish",
                  "copy", "relevance", "reference_normalized", "token_frequency", "python"] = "toxicity"
    """Reward function: ``classifier``, ``reward_model``, ``toxicity``, ``sentiment``,
    ``label_match``, ``length``, ``gibberish``, ``copy`` (minus the share of the completion's word
    n-grams copied verbatim from the prompt), ``relevance`` (cosine of sentence embeddings between
    the completion, copied spans removed, and the row's ``source_column``),
    ``reference_normalized``, ``token_frequency``, or ``python``. Several rewards in a list are
    summed with their weights (the composite reward)."""
    weight: float = 1.0
    """Weight in the composite sum."""
    name: Optional[str] = None
    """Name used in logs (``reward/<name>``); defaults to ``kind``."""
    model: Optional[str] = None
    """Model name or path (``classifier``, ``reward_model``, ``gibberish`` with a hub classifier,
    ``relevance``: a sentence-embedding model, default the all-MiniLM-L6-v2 asset)."""
    label: Optional[str] = None
    """Classifier label to read (name or index), e.g. ``nothate``."""
    output: Literal["logit", "probability"] = "logit"
    """What to read from a classifier: ``logit`` or ``probability``."""
    text: Literal["completion", "prompt+completion"] = "completion"
    """``classifier``: the text classified, ``completion`` or ``prompt+completion`` (joined with a
    space, as for reward models)."""
    backend: Literal["profanity_check", "hatesonar"] = "profanity_check"
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
    source_column: Optional[str] = None
    """``relevance``: row column with the text the completion should stay relevant to (as
    ``rlhfkit eval``'s ``source_column``)."""
    reference_column: Optional[str] = None
    """``reference_normalized``: column with the reference completion y_ref; the reward is
    r(x, y) - r(x, y_ref) with r given by ``base``."""
    base: Optional[dict] = None
    """``reference_normalized``: the reward config (same keys as this section) of the inner reward."""
    normalize: bool = False
    """``reward_model``: standardise scores with the mean/std saved by ``rlhfkit reward``."""
    ngram: int = 4
    """``copy``, ``relevance``: the word n-gram size of a copied span (as ``rlhfkit eval``'s
    ``copy_ngram``)."""
    token: Optional[str] = None
    """``token_frequency``: the string whose frequency (per word) is rewarded (a test reward)."""
    function: Optional[str] = None
    """``python``: ``module:function`` with signature ``fn(prompts, completions, **columns)``."""
    batch_size: int = 32
    """``classifier``, ``reward_model``, ``label_match``, ``gibberish``: texts per classifier forward."""
    max_length: int = 512
    """``classifier``, ``reward_model``, ``label_match``, ``gibberish``: truncate inputs to this many tokens."""

    def validate(self) -> None:
        needs = {
            "classifier": ["model"], "reward_model": ["model"], "label_match": ["target_column"],
            "reference_normalized": ["reference_column", "base"], "python": ["function"],
            "token_frequency": ["token"], "relevance": ["source_column"],
        }
        for key in needs.get(self.kind, []):
            if getattr(self, key) in (None, ""):
                raise ConfigError(f"reward kind '{self.kind}' needs '{key}'")
        defaults = RewardConfig()
        for key, kinds in REWARD_KEY_KINDS.items():
            if self.kind not in kinds and getattr(self, key) != getattr(defaults, key):
                raise ConfigError(f"reward key '{key}' applies to kind {' / '.join(kinds)}, not '{self.kind}'")


REWARD_KEY_KINDS: dict[str, tuple[str, ...]] = {
    "model": ("classifier", "reward_model", "label_match", "gibberish", "relevance"),
    "label": ("classifier",), "output": ("classifier",), "text": ("classifier",),
    "backend": ("toxicity",), "invert": ("toxicity",), "target_column": ("label_match",),
    "min_words": ("length",), "max_words": ("length",), "source_column": ("relevance",),
    "reference_column": ("reference_normalized",), "base": ("reference_normalized",),
    "normalize": ("reward_model",), "ngram": ("copy", "relevance"), "token": ("token_frequency",),
    "function": ("python",),
    "batch_size": ("classifier", "reward_model", "label_match", "gibberish"),
    "max_length": ("classifier", "reward_model", "label_match", "gibberish"),
}
"""The reward kinds that read each kind-specific ``RewardConfig`` key; setting one on another kind
is refused (it would be ignored)."""


def check_best_metric(train: TrainConfig, command: str, logged: list[str]) -> None:
    """Refuse a ``train.best_metric`` that ``command``'s evaluation never logs (``logged``)."""
    if train.best_metric is not None and train.best_metric not in logged:
        have = f"its evaluation logs {', '.join(logged)}" if logged else "it has no periodic evaluation"
        guess = difflib.get_close_matches(train.best_metric, logged, n=1)
        hint = f"; did you mean '{guess[0]}'?" if guess else ""
        raise ConfigError(f"train.best_metric='{train.best_metric}' is never logged by {command} ({have}){hint}")


def check_live_reference(reference: ReferenceConfig, command: str) -> None:
    """Online recipes score fresh samples: refuse the offline recipes' precomputed reference keys."""
    for key in ("precompute", "cache_dir"):
        if getattr(reference, key) not in (False, None):
            raise ConfigError(f"reference.{key} applies to dpo and kto only; {command} computes the reference "
                              "log-probs of its fresh samples live")


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
    if getattr(cls, "RENAMED", None):
        data = apply_renames(cls, data, source, prefix)
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


def apply_renames(cls: type, data: dict, source: str = "<dict>", prefix: str = "") -> dict:
    """A copy of ``data`` (the raw keys of ``cls``) with the deprecated names of ``cls.RENAMED``
    moved to their new names, one ``[rlhfkit] warning:`` line each; both names given is an error.

    ``RENAMED = {"old": "new"}`` holds keys relative to ``cls``; dotted keys move a value between
    sections (``{"train.eval_every": "eval.every"}`` on a recipe's config)."""
    data = copy.deepcopy(data)
    for old, new in getattr(cls, "RENAMED", {}).items():
        found, value = _pop_dotted(data, old)
        if not found:
            continue
        if _pop_dotted(copy.deepcopy(data), new)[0]:
            raise ConfigError(f"{source}: both '{prefix}{old}' and '{prefix}{new}' are set; '{prefix}{old}' is the "
                              f"deprecated name of '{prefix}{new}': keep only '{prefix}{new}'")
        deprecated(f"{prefix}{old}", f"{prefix}{new}")
        set_dotted(data, new, value)
    return data


def deprecated(old: str, new: str) -> None:
    """The one warning line of a deprecated key (``rlhfkit``'s logger, ``[rlhfkit] warning: ...``)."""
    import logging

    logging.getLogger("rlhfkit").warning(f"warning: '{old}' is deprecated, use '{new}'")


def renamed_key(cls: type, key: str) -> str:
    """The current name of dotted ``key`` of ``cls``: ``key`` itself unless it (or a section above
    it) is a deprecated name in some dataclass's ``RENAMED`` on the way down."""
    parts = key.split(".")
    tp: Any = cls
    for i in range(len(parts)):
        rest = ".".join(parts[i:])
        for old, new in getattr(tp, "RENAMED", {}).items():
            if rest == old or rest.startswith(old + "."):
                return renamed_key(cls, ".".join(parts[:i] + [new]) + rest[len(old):])
        tp = typing.get_type_hints(tp).get(parts[i]) if dataclasses.is_dataclass(tp) else None
        if not dataclasses.is_dataclass(tp):
            break
    return key


def _get_dotted(obj: Any, key: str) -> Any:
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _pop_dotted(data: dict, key: str) -> tuple[bool, Any]:
    node: Any = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            return False, None
    if not isinstance(node, dict) or parts[-1] not in node:
        return False, None
    return True, node.pop(parts[-1])


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    if f.default is not dataclasses.MISSING:
        return copy.deepcopy(f.default)
    return None


def validate(cfg, prefix: str = "") -> None:
    """Check every ``Literal`` field's value and call ``validate()`` on ``cfg`` and on every nested
    section."""
    unused = getattr(type(cfg), "UNUSED", ())
    if unused:  # shared keys this command has no use for: a value other than the default is refused
        default, command = type(cfg)(), type(cfg).__module__.rsplit(".", 1)[-1]
        for key in unused:
            if _get_dotted(cfg, key) != _get_dotted(default, key):
                raise ConfigError(f"'{prefix}{key}' is not used by {command}: remove it")
    for name, tp in typing.get_type_hints(type(cfg)).items():
        if typing.get_origin(tp) is Literal and name in {f.name for f in dataclasses.fields(cfg)}:
            _check_choice(f"{prefix}{name}", getattr(cfg, name), list(typing.get_args(tp)))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            validate(value, f"{prefix}{f.name}.")
        elif isinstance(value, list):
            for v in value:
                if dataclasses.is_dataclass(v):
                    validate(v, f"{prefix}{f.name}.")
    check = getattr(cfg, "validate", None)
    if callable(check):
        check()
    _check_quantized(cfg)


def _check_quantized(cfg) -> None:
    """A 4-/8-bit base cannot be trained in full: it needs LoRA adapters (QLoRA)."""
    model, lora = getattr(cfg, "model", None), getattr(cfg, "lora", None)
    if not isinstance(model, ModelConfig) or not model.quantized:
        return
    bits = "model.load_in_4bit" if model.load_in_4bit else "model.load_in_8bit"
    if isinstance(lora, LoraConfig) and not lora.enabled:
        raise ConfigError(f"{bits} needs lora.enabled=true (a quantised base is frozen; only adapters train)")
    if getattr(cfg, "value_model", None):
        raise ConfigError(f"{bits} with value_model: a separate critic would be quantised and frozen; "
                          "use the value head (value_model unset) or load the model in full precision")


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
        doc = docs.get(f.name, "")
        if typing.get_origin(t) is Literal:
            doc = f"{doc} One of: {', '.join(map(str, typing.get_args(t)))}.".strip()
        rows.append((f"{prefix}{f.name}", show_default(default), doc))
        item = typing.get_args(t)[0] if typing.get_origin(t) is list and typing.get_args(t) else None
        if dataclasses.is_dataclass(item):  # a list of sections (pipeline stages): each item's keys
            rows.extend(describe(item, f"{prefix}{f.name}[].", None))
    return rows


def show_default(value: Any) -> str:
    """A default as ``--help`` prints it: YAML (``null``, ``true``, ``[a, b]``, ``{k: v}``; a list of
    sections as a block), numbers as Python writes them (``1e-05``)."""
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    elif isinstance(value, list):
        value = [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(value)
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6).strip()
    text = text.removesuffix("\n...").removesuffix("...").strip()
    if len(text) > 88 and isinstance(value, (list, dict)):
        text = yaml.safe_dump(value, default_flow_style=False, sort_keys=False).rstrip()
    return text


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _parse_override(cls: type, key: str, text: str) -> Any:
    """The value of ``key=text``: verbatim for a text field (a prompt template may hold ``:``,
    ``{}`` or ``#``) unless YAML-quoted (``'"a\\nb"'`` has a newline), else YAML (numbers,
    booleans, null, ``[lists]``, ``{maps}``)."""
    tp: Any = cls
    for part in renamed_key(cls, key).split("."):
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
    else:
        raise UserError(f"{source}: config must be a {cls.__name__}, a YAML path or a dict, got {type(config).__name__}")
    given: dict[str, str] = {}  # current key -> the name it was given under
    items = list((config or {}).items()) if isinstance(config, dict) else []
    items += [(key.replace("__", "."), value) for key, value in overrides.items()]
    for key, value in items:
        for k, v in section_items(cls, key, value):
            new = renamed_key(cls, k)
            if new != k:
                deprecated(k, new)
            for k2, v2 in section_items(cls, new, v):
                name = k if new != k else k2  # the name the caller used
                if given.get(k2, name) != name:
                    raise ConfigError(f"{source}: both '{given[k2]}' and '{name}' are set (one is the deprecated name "
                                      f"of the other): keep only '{k2}'")
                given[k2] = name
                set_dotted(base, k2, v2)
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
        if isinstance(value, bool) and "true" in args:  # YAML reads `true` as a bool
            value = "true" if value else "false"
        if value in args:
            return value
        guess = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f"; did you mean '{guess[0]}'?" if guess else ""
        raise ConfigError(f"{source}: '{key}' must be one of {list(args)}, got {value!r}{hint}")
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
