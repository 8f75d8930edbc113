"""Sharded training (``train.strategy=fsdp``) with torch's own FSDP2, and the launcher's plan.

FSDP2 (``torch.distributed.fsdp.fully_shard``) shards every parameter of a module across the
processes: each process keeps 1/world of every tensor, all-gathers a block's weights just before
its forward (and backward) and frees them after; gradients are reduce-scattered so each process
keeps the gradient of its own shard, and the optimizer steps its own shard only. We shard every
decoder/encoder block (the model's ``_no_split_modules`` classes: ``LlamaDecoderLayer``,
``GPT2Block``, ``T5Block``, ...) and then the root (embeddings, final norm, LM head, value head),
as torchtune does. accelerate is not used for the sharding: accelerate 1.16 on a CPU reports
``MULTI_CPU`` for an FSDP plugin and wraps the model in DDP instead (NOTES.md), so a path it
shards could never be tested here; torch's FSDP2 shards on a CPU over gloo and on GPUs over NCCL
with the same code.

- Mixed precision on GPU: ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` (the
  shards and the optimizer stay in the loaded dtype; forward/backward compute in bf16; gradients
  are reduced in fp32).
- ``train.fsdp_cpu_offload``: the shards, their gradients and the optimizer step live in CPU
  memory (``CPUOffloadPolicy``); the GPU holds only the blocks being computed.
- Frozen modules (the DPO/KTO reference copy) are sharded the same way: no full copy per process.
- Checkpoints: each process writes its own shards of the trainable weights and the optimizer state
  with ``torch.distributed.checkpoint`` (``sharded/`` in the checkpoint folder); ``--resume`` reads
  them back into the shards. The final save gathers one full state dict on process 0
  (``get_model_state_dict(full_state_dict=True, cpu_offload=True)``) and writes a normal Hugging
  Face folder that ``from_pretrained`` loads.

Every training recipe (sft, reward, dpo, kto, ppo, grpo, rloo, ilql) runs under
``strategy=fsdp``. The online recipes (and ilql's decoding) generate and run their no-grad passes
(sampling policy, values, reference) through the language model inside the sharded root, not
through the root's forward: :func:`unsharded` gathers the
root's own weights (embeddings, final norm, LM head, value head) for that stretch, while every
block still gathers and frees its own weights in its forward; ``generate`` runs with
``synced_gpus`` so every process runs the same number of forwards (each is a collective) until
the rows of all processes are done. ilql shards its Q, target Q and V heads with the root; the
target heads take no gradient but move (Polyak averaging on each process's shards), so its
checkpoints hold their shards too (``Engine.CHECKPOINT_FROZEN``). See docs/scale.md.

``launcher_strategy()`` reads what ``accelerate launch --config_file`` asked for (its environment
variables), so ``examples/accelerate/*.yaml`` choose DDP, FSDP2 or DeepSpeed ZeRO-2/3.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import nn

from rlhfkit.config import ConfigError

ZERO3_RECIPES = ("sft", "reward", "dpo", "kto")
"""Recipes that run under DeepSpeed ZeRO-3 (the online ones generate outside the engine's forward,
which is untested under ZeRO-3); the others refuse it."""


def block_modules(module: nn.Module) -> list[nn.Module]:
    """The transformer blocks of every Hugging Face model inside ``module`` (their classes are the
    model's ``_no_split_modules``), outermost first; a block nested in another block is skipped."""
    names: set[str] = set()
    for m in module.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    blocks: list[nn.Module] = []
    inside: set[int] = set()
    for m in module.modules():
        if id(m) in inside:
            continue
        if type(m).__name__ in names:
            blocks.append(m)
            inside.update(id(c) for c in m.modules())
    return blocks


def shard(module: nn.Module, device: torch.device, mixed_precision: bool = False, cpu_offload: bool = False,
          frozen: bool = False) -> nn.Module:
    """``fully_shard`` every block of ``module``, then ``module`` itself (in place; returns it).

    ``mixed_precision``: bf16 parameters in forward/backward, fp32 gradient reduction.
    ``cpu_offload``: keep the shards (and the optimizer step) in CPU memory.
    ``frozen``: a module that only runs forward (a reference): FSDP2 keeps a root's weights
    gathered after its forward (for the backward that follows), so they are resharded after
    every forward here, or each process would keep the full embeddings and LM head.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    if cpu_offload and device.type == "cpu":
        raise ConfigError("train.fsdp_cpu_offload needs a GPU (on the CPU the shards already live in CPU memory)")
    world = dist.get_world_size() if dist.is_initialized() else 1
    if not dist.is_initialized():  # one process: FSDP2 still needs a process group
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        dist.init_process_group("gloo" if device.type == "cpu" else "nccl", rank=0, world_size=1)
    mesh = init_device_mesh(device.type, (world,))
    kwargs: dict = {"mesh": mesh}
    if mixed_precision:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    blocks = block_modules(module)
    if not blocks:
        raise ConfigError(f"train.strategy=fsdp: no transformer blocks found in {type(module).__name__} "
                          "(the model declares no _no_split_modules)")
    if not cpu_offload:
        module.to(device)
    for b in blocks:
        fully_shard(b, **kwargs)
    fully_shard(module, **kwargs)
    if frozen:
        module.register_forward_hook(lambda m, _args, _out: m.reshard())
    return module


def _fsdp_module_class():
    """FSDP2's module class, or None when no process group exists (nothing can be sharded then;
    a one-process run does not import FSDP at all)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    from torch.distributed.fsdp import FSDPModule

    return FSDPModule


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` or a module inside it is sharded by FSDP2."""
    fsdp = _fsdp_module_class()
    return fsdp is not None and any(isinstance(m, fsdp) for m in module.modules())


@contextmanager
def unsharded(root: nn.Module):
    """Inside the block the FSDP2 ``root``'s own weights (those of no block: embeddings, final
    norm, LM head, value head) are gathered in full, so a module inside it can run outside the
    root's forward (generation, no-grad passes); each block still gathers its weights in its own
    forward and frees them after. The root is initialised first (FSDP2 makes the first module to
    run forward its root: a block must not be). A collective: every process must enter it. Other
    modules pass through."""
    fsdp = _fsdp_module_class()
    if fsdp is None or not isinstance(root, fsdp):
        yield
        return
    root._get_fsdp_state()._lazy_init()  # noqa: SLF001 (FSDP2 has no public call for it)
    root.unshard()
    try:
        yield
    finally:
        root.reshard()


def local_numel(module: nn.Module) -> int:
    """Elements of ``module``'s parameters held by this process (its shards)."""
    from torch.distributed.tensor import DTensor

    return sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in module.parameters())


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of ``module`` gathered in full on process 0 (CPU); ``{}`` on the others.
    A collective: every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_shards(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path, keep: set[str]) -> None:
    """Every process writes its shards of the weights named in ``keep`` (the trainable ones, see
    ``Engine.checkpointed``) and of the optimizer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": {k: v for k, v in msd.items() if k in keep}, "optimizer": osd}, checkpoint_id=str(folder))


def load_shards(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path, keep: set[str]) -> None:
    """Read the shards written by :func:`save_shards` into this process's shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer)
    state = {"model": {k: v for k, v in msd.items() if k in keep}, "optimizer": osd}
    # partial: a trainable weight that never got a gradient (e.g. the unused LM head of a reward
    # model) has no optimizer state in the checkpoint; it keeps the empty state made here
    dcp.load(state, checkpoint_id=str(folder), planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(strict=False))


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """``clip_grad_norm_`` over sharded gradients; the norm is that of the full gradient."""
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_norm)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)


def close_process_group(clean: bool) -> None:
    """Destroy the default process group (if one was made) before the interpreter exits, so gloo's
    and NCCL's threads are joined while Python still runs: left to interpreter exit they can abort
    a finished process (``terminate called without an active exception``, SIGABRT), which the
    launcher reports as a failed run. After a ``clean`` run every process first waits for the
    others, so none tears down while another still talks to it; after an error nobody waits."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if clean:
        dist.barrier()
    dist.destroy_process_group()


def configure_deepspeed(accelerator, cfg) -> None:
    """Fill the DeepSpeed config values that accelerate would take from a dataloader: the Engine
    feeds its own micro-batches (``train.batch_size`` rows each) and marks the accumulation
    boundary itself (DeepSpeed's ``gradient_accumulation_steps`` stays 1, so it does not scale the
    already-weighted losses again), and clips at ``train.max_grad_norm``."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds["gradient_accumulation_steps"] = 1
    ds["train_batch_size"] = cfg.batch_size * accelerator.num_processes
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = cfg.max_grad_norm or 0.0
    zero = ds.get("zero_optimization", {})
    if zero.get("stage") == 3:  # the final save gathers the full weights (accelerator.get_state_dict)
        zero["stage3_gather_16bit_weights_on_model_save"] = True


# ---------------------------------------------------------------------------------------------
# What the launcher asked for (accelerate launch --config_file examples/accelerate/*.yaml)
# ---------------------------------------------------------------------------------------------


def launcher_strategy(env: Optional[Mapping[str, str]] = None) -> dict:
    """The strategy that ``accelerate launch`` asked for through its environment variables:
    ``{"strategy": "fsdp" | "deepspeed" | "ddp" | None, ...}`` (None: not launched by accelerate
    with one of these). FSDP must be version 2 (rlhfkit shards with torch's FSDP2 itself);
    DeepSpeed needs the ``deepspeed`` package."""
    env = os.environ if env is None else env
    truthy = ("true", "1", "yes")
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() in truthy:
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError("the accelerate config asks for DeepSpeed, which is not installed: pip install deepspeed")
        return {"strategy": "deepspeed", "zero_stage": int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))}
    if env.get("ACCELERATE_USE_FSDP", "").lower() in truthy:
        version = env.get("FSDP_VERSION", "1")
        if version != "2":
            raise ConfigError(f"the accelerate config asks for FSDP version {version}; rlhfkit shards with FSDP2: "
                              "set fsdp_config.fsdp_version: 2")
        return {"strategy": "fsdp", "cpu_offload": env.get("FSDP_OFFLOAD_PARAMS", "false").lower() in truthy}
    return {"strategy": "ddp" if int(env.get("WORLD_SIZE", "1")) > 1 else None}


def accelerate_config_env(config_file: str | os.PathLike, num_processes: Optional[int] = None) -> dict[str, str]:
    """The environment variables that ``accelerate launch --config_file FILE`` sets for the training
    processes (accelerate's own launch code, without starting anything)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    argv = ["--config_file", str(config_file)]
    if num_processes is not None:
        argv += ["--num_processes", str(num_processes)]
    args, defaults, mp_from_config = _validate_launch_command(launch_command_parser().parse_args(argv + ["x.py"]))
    if args.use_deepspeed:  # as accelerate's launch_command does before its deepspeed launcher
        fields = list(defaults.deepspeed_config.keys()) if defaults else []
        fields += ["mixed_precision"] if mp_from_config else []
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    env = {k: str(v) for k, v in env.items()}
    env.setdefault("WORLD_SIZE", str(args.num_processes))  # torchrun, which accelerate starts, sets it
    return env


def resolve_strategy(strategy: str, command: str, env: Optional[Mapping[str, str]] = None) -> dict:
    """``train.strategy`` merged with the launcher's: ``auto`` follows the launcher (one process,
    DDP, FSDP2 or DeepSpeed); ``ddp``/``fsdp`` must not contradict it."""
    launched = launcher_strategy(env)
    plan = dict(launched)
    if strategy == "auto":
        plan["strategy"] = launched["strategy"] or "single"
    elif launched["strategy"] not in (None, strategy, "ddp"):
        raise ConfigError(f"train.strategy={strategy} contradicts the accelerate config ({launched['strategy']})")
    else:
        plan["strategy"] = strategy
    if plan["strategy"] == "deepspeed" and plan["zero_stage"] == 3 and command not in ZERO3_RECIPES:
        raise ConfigError(f"DeepSpeed ZeRO-3 is not supported by '{command}' (only {', '.join(ZERO3_RECIPES)}); "
                          "use ZeRO-2 (examples/accelerate/zero2.yaml)")
    return plan


__all__ = ["ZERO3_RECIPES", "accelerate_config_env", "block_modules", "clip_grad_norm",
           "configure_deepspeed", "full_state_dict", "is_sharded", "launcher_strategy", "load_shards", "local_numel",
           "resolve_strategy", "save_shards", "shard", "unsharded"]
