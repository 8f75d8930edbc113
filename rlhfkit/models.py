"""Models: load models and tokenizers; LoRA and quantisation; save (the training wrapper and the
reference are in ``rlhfkit.policy``).

Causal and encoder-decoder models load through the same functions; the kind is read from the
model's config (``is_encoder_decoder``). ``asset:smollm2`` / ``asset:minilm`` name the offline
assets (see ``rlhfkit.assets``). Weights are read and written as safetensors; remote code runs
only when ``model.trust_remote_code`` is set.
"""
from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from rlhfkit import assets
from rlhfkit.config import LoraConfig, ModelConfig, UserError


def pick_device(cpu: bool = False) -> torch.device:
    """This process's device: its own GPU (``cuda:LOCAL_RANK`` under torchrun/accelerate launch,
    the one the Engine will use), else the CPU. Loading on a bare ``cuda`` put every process's
    models on GPU 0 before the Engine moved the policy."""
    if torch.cuda.is_available() and not cpu:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def resolve_dtype(name: str, device: Optional[torch.device] = None) -> torch.dtype:
    """``auto``: fp32 on CPU; bf16 on a GPU that supports it, else fp32."""
    if name == "auto":
        device = device or pick_device()
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def check_local_path(name_or_path: str, path: str) -> None:
    """A name that can only be a local folder (it starts with ``/``, ``.`` or ``~``, has more than
    one ``/``, or its first part is an existing folder) must exist: "not found", rather than
    transformers' complaint that it is not a valid hub repository id."""
    p = Path(os.path.expanduser(path))
    looks_local = (path.startswith(("/", ".", "~")) or path.count("/") > 1
                   or ("/" in path and Path(path.split("/", 1)[0]).is_dir()))
    if looks_local and not p.exists():
        raise UserError(f"{name_or_path}: model folder not found")


def load_hf_config(name_or_path: str, cfg: Optional[ModelConfig] = None):
    from transformers import AutoConfig

    path = assets.resolve(name_or_path)
    check_local_path(name_or_path, path)
    try:
        return AutoConfig.from_pretrained(
            path, trust_remote_code=bool(cfg and cfg.trust_remote_code), revision=cfg.revision if cfg else None)
    except OSError as e:
        raise UserError(f"{name_or_path}: cannot load model config ({str(e).splitlines()[0][:200]})") from None
    except ValueError as e:
        raise UserError(f"{name_or_path}: {str(e).splitlines()[0][:200]}") from None


def is_seq2seq_config(hf_config) -> bool:
    return bool(getattr(hf_config, "is_encoder_decoder", False))


def load_tokenizer(cfg: ModelConfig):
    """Tokenizer with a pad token (eos when it has none) and ``model_max_length`` set."""
    from transformers import AutoTokenizer

    path = assets.resolve(cfg.tokenizer or cfg.name_or_path)
    check_local_path(cfg.tokenizer or cfg.name_or_path, path)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    except OSError as e:
        raise UserError(f"{cfg.tokenizer or cfg.name_or_path}: cannot load tokenizer ({str(e).splitlines()[0][:200]})") from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise UserError(f"{cfg.name_or_path}: tokenizer has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    if tok.eos_token is None:
        # BERT-style tokenizers have no EOS: use [SEP]
        tok.eos_token = tok.sep_token or tok.pad_token
    if not tok.model_max_length or tok.model_max_length > 1_000_000:
        tok.model_max_length = cfg.max_length
    return tok


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def quantization_config(cfg: ModelConfig, dtype: torch.dtype):
    """transformers' ``BitsAndBytesConfig`` for ``model.load_in_4bit`` / ``load_in_8bit`` (None when neither)."""
    if not cfg.quantized:
        return None
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        key = "model.load_in_4bit" if cfg.load_in_4bit else "model.load_in_8bit"
        raise UserError(f"{key} needs bitsandbytes, which is not installed: pip install 'rlhfkit[quant]'")
    from transformers import BitsAndBytesConfig

    if cfg.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = dtype if cfg.bnb_4bit_compute_dtype == "auto" else resolve_dtype(cfg.bnb_4bit_compute_dtype)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
                              bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant, bnb_4bit_compute_dtype=compute)


def is_quantized(model: nn.Module) -> bool:
    """Whether the Hugging Face model under ``model`` was loaded in 4 or 8 bits."""
    hf = unwrap(model)
    return bool(getattr(hf, "is_loaded_in_4bit", False) or getattr(hf, "is_loaded_in_8bit", False))


def load_model(cfg: ModelConfig, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None,
               task: str = "lm", num_labels: int = 1) -> nn.Module:
    """A Hugging Face model by name or path. ``task``: ``lm`` (causal or seq2seq by config) or ``classifier``.

    With ``model.load_in_4bit`` / ``load_in_8bit`` the linear layers are bitsandbytes layers on
    ``device``, every weight is frozen and the rest is prepared for adapter training by peft's
    ``prepare_model_for_kbit_training`` (norms and embeddings in fp32, input gradients on)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    _quiet_transformers()
    path = assets.resolve(cfg.name_or_path)
    hf_config = load_hf_config(cfg.name_or_path, cfg)
    device = device or pick_device()
    kwargs = dict(trust_remote_code=cfg.trust_remote_code, revision=cfg.revision,
                  dtype=dtype or resolve_dtype(cfg.dtype, device))
    quant = quantization_config(cfg, kwargs["dtype"])
    if quant is not None:  # a quantised model cannot be moved later: load it on this process's device
        from accelerate import PartialState

        place = PartialState().local_process_index if device.type == "cuda" else str(device)
        kwargs.update(quantization_config=quant, device_map={"": place})
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if task == "classifier":
        cls = AutoModelForSequenceClassification
        kwargs["num_labels"] = num_labels
    else:
        cls = AutoModelForSeq2SeqLM if is_seq2seq_config(hf_config) else AutoModelForCausalLM
    fit_max_length(cfg, hf_config)
    from safetensors import SafetensorError

    try:
        model = cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"{cfg.name_or_path}: cannot load model ({str(e).splitlines()[0][:200]})") from None
    except SafetensorError as e:  # a truncated or corrupt weights file
        raise UserError(f"{cfg.name_or_path}: weights file is damaged or not safetensors "
                        f"({str(e).splitlines()[0][:200]}); copy or download the model again") from None
    if quant is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        for m in model.modules():
            # On CPUs with AVX512-BF16, bitsandbytes sends no-grad eval forwards through a packed bf16
            # kernel: reference and rollout log-probs would then differ from the training pass's
            # (0.03 nats on the tiny test model; DPO's and PPO's step-0 identities break). Keep the
            # one fp32-dequantising path.
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model if quant is not None else model.to(device)


def position_limit(hf_config) -> Optional[int]:
    """The longest sequence the model's position embedding covers (None: relative positions, e.g. T5)."""
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(hf_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def fit_max_length(cfg: ModelConfig, hf_config) -> None:
    """Lower ``cfg.max_length`` to the model's position limit, with a logged line (a longer row would
    crash in the position embedding with an IndexError)."""
    from rlhfkit.utils import logger

    limit = position_limit(hf_config)
    if limit is not None and cfg.max_length > limit:
        logger.info(f"model.max_length={cfg.max_length} is above {cfg.name_or_path}'s {limit} positions: "
                    f"rows are cut to {limit} tokens")
        cfg.max_length = limit


def load_policy(cfg: ModelConfig, lora: Optional[LoraConfig] = None, device: Optional[torch.device] = None):
    """(model, tokenizer); with ``lora.enabled`` the model is a peft model with trainable adapters."""
    tok = load_tokenizer(cfg)
    model = load_model(cfg, device)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    if lora is not None and lora.enabled:
        model = apply_lora(model, lora)
    return model, tok


def lora_targets(model: nn.Module, lora: LoraConfig):
    """``auto``: peft's per-architecture defaults (attention projections); else the list given."""
    if lora.target_modules == ["auto"]:
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as MAP

        mt = getattr(model.config, "model_type", None)
        if mt not in MAP:
            raise UserError(f"no default LoRA target modules for model type '{mt}'; set lora.target_modules")
        return list(MAP[mt])
    if lora.target_modules == ["all-linear"]:
        return "all-linear"
    return list(lora.target_modules)


def apply_lora(model: nn.Module, lora: LoraConfig, adapter_name: str = "default") -> nn.Module:
    """Wrap ``model`` with LoRA adapters (fresh, or loaded trainable from ``lora.adapter_path``)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, TaskType, get_peft_model

    if lora.adapter_path:
        if not (Path(lora.adapter_path) / "adapter_config.json").is_file():
            raise UserError(f"{lora.adapter_path}: no adapter_config.json (lora.adapter_path must be an adapter folder)")
        with peft_quiet():
            return PeftModel.from_pretrained(model, lora.adapter_path, adapter_name=adapter_name, is_trainable=True)
    task = TaskType.SEQ_2_SEQ_LM if is_seq2seq_config(model.config) else TaskType.CAUSAL_LM
    pcfg = PeftLoraConfig(task_type=task, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=lora_targets(model, lora))
    with peft_quiet():
        return get_peft_model(model, pcfg, adapter_name=adapter_name)


@contextmanager
def peft_quiet():
    """Around peft's model wrapping: peft 0.21 reads transformers' deprecated
    ``is_gradient_checkpointing`` (its call, not ours; transformers 5.25 warns)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout probability to 0. Online RL needs it: the log-probs of the sampling pass
    and of the update pass must come from the same function, or the PPO ratio is noise at step 0."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def fuse_gelu(model: nn.Module) -> int:
    """Replace every ``NewGELUActivation`` (``gelu_new``: GPT-2, GPT-J, GPT-Neo, CodeGen) by
    transformers' ``GELUTanh``, the same function 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    in torch's fused kernel (``F.gelu(approximate="tanh")``); returns the number replaced.

    ``gelu_new`` is written as eight tensor operations, each a pass over the (tokens, 4 hidden)
    activations, and autograd saves and replays them all: on benchmarks/ilql.py (GPT-2) one GELU forward
    and backward took 8.3 ms against 2.8 ms fused (one thread), about 7% of the step. Outputs
    agree to float rounding (1e-6); the model's config and saved weights are unchanged.
    """
    from transformers.activations import GELUTanh, NewGELUActivation

    swaps = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is NewGELUActivation]
    for parent, name in swaps:
        setattr(parent, name, GELUTanh())
    return len(swaps)


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model under accelerate/DDP, our wrappers and peft."""
    from rlhfkit.policy import PolicyModel

    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP
            model = model.module
        elif isinstance(model, PolicyModel):
            model = model.lm
        elif hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
            model = model.get_base_model()
        else:
            return model


def left_pad_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count from each row's first real token, as ``generate`` does for
    left-padded rows (padding gets 0): (B, T) -> (B, T). Models with absolute position
    embeddings (GPT-2) otherwise depend on the padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def cache_kwarg(model: nn.Module) -> str:
    """The keyword that passes a KV cache to ``model``'s forward and ``generate``: ``cache`` from
    transformers 5.24 (``past_key_values`` is deprecated there, removed from forward in 5.40 and
    from generate in 6.0), ``past_key_values`` before it and for models whose forward predates it."""
    import inspect

    from transformers import PreTrainedModel

    hf = unwrap(model)
    if not isinstance(hf, PreTrainedModel):  # a wrapper with its own generate (ILQL's): the model under it
        hf = next((m for m in hf.modules() if isinstance(m, PreTrainedModel)), hf)
    return "cache" if "cache" in inspect.signature(type(hf).forward).parameters else "past_key_values"


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def save_pretrained(model: nn.Module, tokenizer, out_dir: str | os.PathLike, merge: bool = False,
                    state_dict: Optional[dict[str, torch.Tensor]] = None) -> None:
    """Save as safetensors: adapter-only for peft models (plus ``merged/`` when asked), else full.

    ``state_dict``: ``model``'s weights gathered from shards (FSDP2, DeepSpeed ZeRO-3; see
    ``Engine.saved_state``), saved instead of the module's own (sharded) tensors.
    """
    from rlhfkit.policy import PolicyModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(model, PolicyModel):
        if model.value_head is not None:
            from safetensors.torch import save_file

            head = ({k[len("value_head."):]: v for k, v in state_dict.items() if k.startswith("value_head.")}
                    if state_dict is not None else model.value_head.state_dict())
            save_file({k: v.detach().cpu().contiguous() for k, v in head.items()}, str(out / "value_head.safetensors"))
        if state_dict is not None:
            state_dict = {k[len("lm."):]: v for k, v in state_dict.items() if k.startswith("lm.")}
        model = model.lm
    if state_dict is not None:  # tied weights (GPT-2's LM head, T5's embeddings) once, as from the module
        tied = _tied_duplicates(model)
        state_dict = {k: v for k, v in state_dict.items() if k not in tied}
    kwargs = {"state_dict": state_dict} if state_dict is not None else {}
    if is_peft(model):  # only the trained adapter, not a frozen reference adapter loaded beside it
        model.save_pretrained(out, safe_serialization=True, selected_adapters=[model.active_adapter], **kwargs)
    else:
        model.save_pretrained(out, safe_serialization=True, **kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if merge and is_peft(model):
        merged = merge_dequantized(model, out) if is_quantized(model) else merged_copy(model, state_dict)
        merged.save_pretrained(out / "merged", safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(out / "merged")


def merge_dequantized(model: nn.Module, adapter_dir: str | os.PathLike) -> nn.Module:
    """The adapter saved in ``adapter_dir`` merged into the dequantised base of a 4-/8-bit peft
    ``model``: the trained function (quantised weights as the forward saw them, plus B A) as plain
    floating-point weights. peft's own ``merge_and_unload`` on a bitsandbytes base would quantise the
    sum again and lose most of the adapter's change."""
    import copy

    from peft import PeftModel

    base = copy.deepcopy(model).unload()  # the base with its bitsandbytes layers, no adapters
    dtype = next((p.dtype for p in base.parameters() if p.is_floating_point()), torch.float32)
    base = base.dequantize(dtype=dtype)  # transformers: every bitsandbytes layer -> nn.Linear
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def _tied_duplicates(model: nn.Module) -> set[str]:
    """Names under which a parameter already named earlier appears again (tied weights)."""
    seen: set[int] = set()
    dupes: set[str] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            dupes.add(name)
        seen.add(id(p))
    return dupes


def merged_copy(model: nn.Module, state_dict: Optional[dict[str, torch.Tensor]] = None) -> nn.Module:
    """A copy of the peft ``model`` with its active adapter merged into the base weights. From
    gathered weights (``state_dict``), the copy is rebuilt from the model's config on the CPU."""
    import copy

    if state_dict is None:
        return copy.deepcopy(model).merge_and_unload()
    from peft import get_peft_model

    base = model.get_base_model()
    active = model.active_adapter
    fresh = type(base)(copy.deepcopy(base.config))
    peft_model = get_peft_model(fresh, copy.deepcopy(model.peft_config[active]), adapter_name=active)
    missing, _ = peft_model.load_state_dict(state_dict, strict=False)
    if missing:
        raise RuntimeError(f"merging gathered weights: {len(missing)} missing, e.g. {missing[0]}")
    return peft_model.merge_and_unload()


__all__ = [
    "apply_lora", "load_model", "load_policy", "load_tokenizer", "save_pretrained", "unwrap",
    "pick_device", "resolve_dtype", "is_seq2seq_config", "left_pad_positions", "is_quantized", "merge_dequantized",
    "quantization_config",
]
