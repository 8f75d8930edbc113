"""What the offline preference recipes (``dpo``, ``kto``) share: sequence log-probs of
completions, batched scoring, and reference log-probs precomputed once and cached on disk.

Precomputed reference log-probs (``precompute_reference: true``): before training, one no-grad
pass of the reference over every training (and held-out) example gives the summed completion
log-prob of each; they are stored with safetensors in
``<cache dir>/<what>-<key>.safetensors`` and read back on the next run with the same key. The key
is a SHA-256 over

- the reference: its kind, the base model (hub name + revision, or a local folder's files) and,
  for ``reference.kind=adapter``, the adapter folder's files; files up to 16 MiB are hashed by
  content, larger ones (weights) by size and modification time;
- dtype, autocast precision and device type (they change the numbers);
- the tokenized examples (every prompt and completion id, in order) and the length limits.

So editing the data, the template, the tokenizer, the adapter or the model invalidates the
cache; a hub name is keyed by name and revision only (pin ``model.revision`` to be safe).
"""
from __future__ import annotations

import hashlib
import json
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Optional

import torch

from rlhfkit import assets
from rlhfkit.data import Example, collate
from rlhfkit.policy import PolicyModel, Reference
from rlhfkit.utils import atomic_write_bytes, logger

MODEL_KEYS = ("input_ids", "attention_mask", "labels", "decoder_attention_mask")
HASH_CONTENT_BELOW = 16 * 2**20  # bytes; larger files are identified by size and mtime
CACHE_VERSION = 1


def model_inputs(batch: dict) -> dict:
    """The keys of a batch that the model's forward takes (drops cached log-probs, labels of rows, ...)."""
    return {k: batch[k] for k in MODEL_KEYS if k in batch}


def sequence_logps(logps: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs (B,) and completion token counts (B,) from per-token (B, T)."""
    sums = (logps * mask).sum(-1)  # (B,)
    counts = mask.sum(-1).to(sums.dtype)  # (B,)
    return sums, counts


def concat_batches(a: dict, b: dict) -> dict:
    """The model inputs of two batches as one (rows of ``a``, then of ``b``), right-padded to the
    wider one: labels with -100, masks with 0, ids with 0 (masked out)."""
    out = {}
    for k in MODEL_KEYS:
        if k in a:
            x, y = a[k], b[k]
            width = max(x.shape[1], y.shape[1])
            fill = -100 if k == "labels" else 0
            x = torch.nn.functional.pad(x, (0, width - x.shape[1]), value=fill)
            y = torch.nn.functional.pad(y, (0, width - y.shape[1]), value=fill)
            out[k] = torch.cat([x, y])
    return out


def reference_sums(reference: Reference, inputs: dict) -> torch.Tensor:
    """Summed completion log-probs (B,) under the reference (its per-token log-probs are 0 off the mask)."""
    return reference.logps(inputs).sum(-1)  # (B,)


@torch.no_grad()
def score_examples(fn: Callable[[dict], tuple[torch.Tensor, torch.Tensor]], examples: list[Example], pad_id: int,
                   seq2seq: bool, batch_size: int, device: torch.device,
                   autocast=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed completion log-probs (N,), completion token counts (N,)) of ``examples``, in order.

    ``fn(batch) -> (logps (B, T), mask (B, T))``. Examples are batched by length (less padding)
    and the results put back in the given order.
    """
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    sums = torch.zeros(len(examples), dtype=torch.float32)
    counts = torch.zeros(len(examples), dtype=torch.float32)
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id, seq2seq).items()}
        with (autocast() if autocast is not None else nullcontext()):
            logps, mask = fn(batch)
        s_, c_ = sequence_logps(logps.float(), mask)
        sums[idx] = s_.cpu()
        counts[idx] = c_.cpu()
    return sums, counts


def policy_scores(policy: PolicyModel, examples: list[Example], pad_id: int, seq2seq: bool, batch_size: int,
                  autocast=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Policy sums and counts of ``examples`` in eval mode (no dropout), no grad."""
    was = policy.training
    policy.eval()
    try:
        def fn(batch):
            out = policy(**batch)
            return out["logps"], out["mask"]

        return score_examples(fn, examples, pad_id, seq2seq, batch_size, next(policy.parameters()).device, autocast)
    finally:
        policy.train(was)


# ---------------------------------------------------------------------------------------------
# Precomputed reference log-probs, cached on disk
# ---------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    return assets.cache_dir() / "reference_logps"


def folder_identity(path: str | os.PathLike) -> dict:
    """Files of a local model/adapter folder: content hash (small files) or size + mtime (large)."""
    p = Path(path)
    files = {}
    for f in sorted(p.iterdir()):
        if not f.is_file():
            continue
        st = f.stat()
        if st.st_size <= HASH_CONTENT_BELOW:
            files[f.name] = hashlib.sha256(f.read_bytes()).hexdigest()
        else:
            files[f.name] = f"size={st.st_size},mtime_ns={st.st_mtime_ns}"
    return {"folder": str(p.resolve()), "files": files}


def model_identity(name_or_path: str, revision: Optional[str] = None) -> dict:
    path = assets.resolve(name_or_path)
    if Path(path).is_dir():
        return folder_identity(path)
    return {"hub": name_or_path, "revision": revision}


def reference_identity(reference: Reference, model_cfg, lora_cfg, ref_cfg, dtype: torch.dtype, precision: str,
                       device_type: str) -> dict:
    """What determines the reference log-probs, as a JSON-able dict (the first part of the cache key)."""
    ident: dict = {"kind": reference.kind, "dtype": str(dtype), "precision": precision, "device": device_type}
    if reference.kind == "copy":
        ident["model"] = model_identity(ref_cfg.model or model_cfg.name_or_path,
                                        None if ref_cfg.model else model_cfg.revision)
    else:  # the policy's own base, with its adapter off or with the reference adapter
        ident["model"] = model_identity(model_cfg.name_or_path, model_cfg.revision)
    if reference.kind == "adapter":
        ident["adapter"] = folder_identity(ref_cfg.adapter_path or lora_cfg.adapter_path)
    return ident


def examples_digest(examples: list[Example]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(len(e.prompt_ids).to_bytes(4, "little"))
        h.update(torch.tensor(e.prompt_ids, dtype=torch.int64).numpy().tobytes())
        h.update(len(e.completion_ids).to_bytes(4, "little"))
        h.update(torch.tensor(e.completion_ids, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


def cache_key(identity: dict, examples: list[Example], lengths: dict) -> str:
    blob = json.dumps({"version": CACHE_VERSION, "reference": identity, "lengths": lengths,
                       "examples": examples_digest(examples), "n": len(examples)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def precompute_reference(reference: Reference, examples: list[Example], *, what: str, pad_id: int, seq2seq: bool,
                         batch_size: int, device: torch.device, cache_dir: Optional[str | os.PathLike] = None,
                         identity: Optional[dict] = None, lengths: Optional[dict] = None,
                         autocast=None) -> tuple[torch.Tensor, dict]:
    """Summed reference log-probs (N,) of ``examples`` (one no-grad pass), and where they came from.

    With ``cache_dir`` they are read from, or written to, ``<cache_dir>/<what>-<key>.safetensors``
    (see the module docstring for the key). Returns ``(sums, {"path", "reused"})``.
    """
    from safetensors.torch import load_file, save

    path = None
    if cache_dir is not None:
        key = cache_key(identity or {}, examples, lengths or {})
        path = Path(cache_dir) / f"{what}-{key}.safetensors"
        if path.is_file():
            sums = load_file(str(path))["logps"]
            if sums.shape == (len(examples),):
                logger.info(f"reference log-probs: reusing {path} ({len(examples)} sequences)")
                return sums, {"path": str(path), "reused": True}
            logger.warning(f"reference log-probs: {path} holds {tuple(sums.shape)} values, expected "
                           f"{len(examples)}; recomputing")

    def fn(batch):
        return reference.logps(batch), batch["labels"] != -100

    sums, _ = score_examples(fn, examples, pad_id, seq2seq, batch_size, device, autocast)
    if path is not None:
        atomic_write_bytes(path, save({"logps": sums.contiguous()},
                                      metadata={"what": what, "n": str(len(examples)),
                                                "identity": json.dumps(identity, sort_keys=True)[:60000]}))
        logger.info(f"reference log-probs: {len(examples)} sequences computed and cached in {path}")
    return sums, {"path": str(path) if path else None, "reused": False}


def release_reference(reference: Reference) -> None:
    """Free what only the live reference needed: the frozen copy, or the reference adapter."""
    if reference.kind == "copy":
        reference.model = None
    elif reference.kind == "adapter":
        reference.policy.lm.delete_adapter("reference")
    if reference.kind in ("copy", "adapter"):
        logger.info(f"reference ({reference.kind}) released: its log-probs are precomputed")
    reference.kind = "none"


__all__ = [
    "model_inputs", "concat_batches", "sequence_logps", "reference_sums", "score_examples", "policy_scores", "default_cache_dir",
    "folder_identity", "model_identity", "reference_identity", "cache_key", "precompute_reference",
    "release_reference",
]
