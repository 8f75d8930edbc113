"""The one training-loop helper every recipe uses.

``Engine`` owns what is the same in every algorithm: accelerate set-up (CPU, one or many GPUs;
``train.strategy``: DDP, FSDP2 through ``rlhfkit.distributed``, or DeepSpeed from an accelerate
config), the AdamW optimizer and the warm-up schedule,
gradient accumulation, clipping, mixed precision on GPU, checkpoints and ``--resume``, SIGINT/
SIGTERM, ``metrics.jsonl``, ``summary.json`` and the progress bar. A recipe keeps the maths:
it calls ``engine.step(loss_fn, micro_batches, weights)`` once per optimizer step.

Gradient accumulation is exact: each micro-batch loss (a mean over its own units, e.g. tokens or
pairs) is scaled by ``weight_i / sum(weights)`` over all micro-batches *and processes*, so k
micro-batches of b rows give the gradient of one batch of k*b rows, and two processes give the
gradient of one process on the concatenated batch.
"""
from __future__ import annotations

import os
import shutil
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from rlhfkit.config import TrainConfig, UserError, check_best_metric, save_config
from rlhfkit.trackers import flat_config, tracker_init_kwargs, tracker_kwargs
from rlhfkit.utils import append_jsonl, atomic_write_json, logger, peak_rss_mb, seed_everything


class Interrupted(Exception):
    """Raised after a checkpoint was written on SIGINT (exit 130) or SIGTERM (exit 143)."""

    def __init__(self, code: int):
        super().__init__(f"interrupted; checkpoint written (exit {code})")
        self.code = code


def batch_tokens(batch: dict) -> int:
    """Real (non-pad) tokens in a batch: every ``*attention_mask``, or the packed count."""
    if "n_real_tokens" in batch:
        return int(batch["n_real_tokens"])
    return int(sum(int(v.sum()) for k, v in batch.items() if k.endswith("attention_mask") and torch.is_tensor(v)))


def batch_samples(batch: dict) -> int:
    """Training examples in a batch: ``n_samples`` when the recipe sets it (a preference pair is one
    sample over two sequences), else the rows of its first tensor."""
    if "n_samples" in batch:
        return int(batch["n_samples"])
    return len(next(iter(batch.values())))


def resolve_precision(cfg: TrainConfig, device_type: str) -> str:
    """accelerate's mixed_precision: ``no`` on CPU (fp32), ``bf16`` on a GPU that supports it."""
    if cfg.precision == "auto":
        if device_type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "no"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.precision]


def make_adamw(params: list, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, with torch's fused kernel (one pass over each parameter) where every parameter is a
    floating-point tensor on the CPU or a CUDA device; the same update up to float rounding.
    ``params``: parameters, or parameter groups (dicts with ``params`` and their own ``lr``)."""
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    if all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in tensors):
        try:
            return torch.optim.AdamW(params, fused=True, **kwargs)
        except (RuntimeError, TypeError):  # an old torch, or a dtype/device the fused kernel lacks
            pass
    return torch.optim.AdamW(params, **kwargs)


class Engine:
    CHECKPOINT_FROZEN: tuple[str, ...] = ()
    """Name prefixes of parameters that take no gradient but change in training (ILQL's target Q
    heads, moved by Polyak averaging): checkpoints hold them beside the trainable weights."""

    def __init__(self, cfg: TrainConfig, command: str, full_config: Any, model: nn.Module, total_steps: int,
                 resume: bool = False, state: Optional[dict] = None, updates_per_step: int = 1,
                 lr_groups: Optional[dict[str, float]] = None, eval_metrics: Optional[list[str]] = None):
        """Set up accelerate, the optimizer and scheduler over ``model``'s trainable parameters.

        ``state`` is a recipe's own JSON-able state (e.g. the adaptive KL coefficient); it is
        saved in checkpoints and, after ``resume``, restored into the same dict.
        ``updates_per_step``: optimizer updates (``step`` calls) per logged step (``end_step``),
        e.g. PPO epochs x minibatches per rollout; the learning-rate schedule spans them all.
        ``lr_groups``: ``{name prefix: lr}``; trainable parameters whose name starts with a prefix
        train at that learning rate (e.g. PPO's value head), the rest at ``cfg.lr``; the schedule
        scales every group alike.
        ``eval_metrics``: the metrics the recipe's evaluation logs; ``train.best_metric`` must be one.
        """
        check_best_metric(cfg, command, eval_metrics or [])
        from accelerate import Accelerator
        from transformers import get_scheduler

        self.cfg = cfg
        self.command = command
        self.out = Path(cfg.output_dir)
        seed_everything(cfg.seed)
        from rlhfkit import distributed

        cpu = cfg.cpu or not torch.cuda.is_available()
        device_type = "cpu" if cpu else "cuda"
        self.plan = distributed.resolve_strategy(cfg.strategy, command)
        self.sharded = self.plan["strategy"] == "fsdp"  # FSDP2 (rlhfkit.distributed), not accelerate's
        precision = resolve_precision(cfg, device_type)
        # under FSDP2 mixed precision is its MixedPrecisionPolicy, not accelerate's autocast
        self.accelerator = Accelerator(cpu=cpu, mixed_precision="no" if self.sharded else precision,
                                       **tracker_kwargs(cfg, self.out))
        self.is_main = self.accelerator.is_main_process
        self.world_size = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.device = self.accelerator.device
        self.mixed_precision = precision
        self._frozen: list[nn.Module] = []  # prepare_frozen: sharded frozen modules (reported in summary.json)
        self.n_frozen = 0
        if self.sharded:
            self.n_parameters = sum(p.numel() for p in model.parameters())
            distributed.shard(model, self.device, mixed_precision=precision == "bf16",
                              cpu_offload=cfg.fsdp_cpu_offload or self.plan.get("cpu_offload", False))
        elif self.plan["strategy"] == "deepspeed":
            distributed.configure_deepspeed(self.accelerator, cfg)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise RuntimeError("model has no trainable parameters")
        self.n_trainable = sum(p.numel() for _, p in named)
        groups: dict[float, list[nn.Parameter]] = {}
        for n, p in named:
            lr = next((lr for prefix, lr in (lr_groups or {}).items() if n.startswith(prefix)), cfg.lr)
            groups.setdefault(lr, []).append(p)
        # fused AdamW (one pass over each parameter instead of ~10 tensor ops): 15 -> 5 ms per step
        # on benchmarks/ilql.py (4.2M-parameter GPT-2, one thread)
        optimizer = make_adamw([{"params": ps, "lr": lr} for lr, ps in groups.items()], cfg)
        scheduler = get_scheduler(cfg.scheduler if cfg.scheduler != "constant" else "constant_with_warmup",
                                  optimizer, num_warmup_steps=cfg.warmup_steps * updates_per_step,
                                  num_training_steps=total_steps * updates_per_step)
        if self.sharded:
            self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        else:
            self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        self.gathered: Optional[dict[str, torch.Tensor]] = None
        self.placed: list[nn.Module] = [self.unwrapped()]  # every module the Engine put on its device
        self.total_steps = total_steps
        self.step_count = 0
        self.samples = 0
        self.tokens = 0
        self.train_seconds = 0.0
        self.state = state if state is not None else {}
        self.last_metrics: dict = {}
        self.extra_summary: dict = {}
        self._signal: Optional[int] = None
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(full_config, self.out / "config.yaml")
        if cfg.report_to:  # the resolved config, once; accelerate's trackers log on the main process only
            self.accelerator.init_trackers(cfg.project, config=flat_config(full_config),
                                           init_kwargs=tracker_init_kwargs(cfg, self.out))
        if resume:
            self.load_checkpoint()
        elif self.is_main and (self.out / "metrics.jsonl").exists():
            (self.out / "metrics.jsonl").unlink()
        self._install_signals()
        self.bar = None
        if cfg.progress and self.is_main:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=self.step_count, desc=command, unit="step", dynamic_ncols=True)
        logger.info(f"{command}: {self.n_trainable:,} trainable parameters, {self.world_size} process(es) on "
                    f"{self.device.type}, precision {self.accelerator.mixed_precision}")

    # ----------------------------------------------------------------------------------------
    # one optimizer step
    # ----------------------------------------------------------------------------------------

    def step(self, loss_fn: Callable[[nn.Module, dict], tuple[torch.Tensor, dict]], micro_batches: list[dict],
             weights: Optional[list[float]] = None, clip: bool = True) -> dict[str, float]:
        """Forward/backward every micro-batch, then clip, step the optimizer and the schedule.

        ``loss_fn(model, batch) -> (loss, metrics)``: ``loss`` is the mean over the batch's own
        units; ``weights`` (default: rows) are those unit counts. Metrics are averaged with the
        same weights.
        """
        t0 = time.perf_counter()
        weights = weights or [float(len(next(iter(mb.values())))) for mb in micro_batches]
        total = torch.tensor(float(sum(weights)), device=self.device)
        if self.world_size > 1:
            total = self.accelerator.reduce(total, reduction="sum")
        total_w = float(total)
        sums: dict[str, float] = {}
        self.model.train()
        for i, (mb, w) in enumerate(zip(micro_batches, weights)):
            mb = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in mb.items()}
            last = i == len(micro_batches) - 1
            sync = last or self.world_size == 1 or self.sharded  # FSDP2 reduce-scatters every micro-batch
            if self.plan["strategy"] == "deepspeed":  # DeepSpeed steps at the boundary accelerate marks
                self.accelerator.gradient_state._set_sync_gradients(last)
            ctx = nullcontext() if sync else self.accelerator.no_sync(self.model)
            with ctx:
                with self.accelerator.autocast():
                    loss, metrics = loss_fn(self.model, mb)
                self.accelerator.backward(loss * (w * self.world_size / total_w))
            for k, v in {"loss": loss, **metrics}.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v) * w
            self.samples += batch_samples(mb)
            self.tokens += batch_tokens(mb)
        out = {k: v / total_w for k, v in sums.items()}
        if self.world_size > 1:  # metrics of the global batch, not of this process's share
            import torch.distributed as dist

            shares: list = [None] * self.world_size
            dist.all_gather_object(shares, (sums, float(sum(weights))))
            keys = {k for part, _ in shares for k in part}
            out = {k: sum(part[k] for part, _ in shares if k in part) / sum(w for part, w in shares if k in part)
                   for k in keys}
        if clip and self.cfg.max_grad_norm is not None:
            if self.sharded:
                from rlhfkit.distributed import clip_grad_norm

                out["grad_norm"] = clip_grad_norm(list(self.model.parameters()), self.cfg.max_grad_norm)
            else:
                norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
                if norm is not None:
                    out["grad_norm"] = float(norm)
        out["lr"] = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.train_seconds += time.perf_counter() - t0
        return out

    # ----------------------------------------------------------------------------------------
    # bookkeeping
    # ----------------------------------------------------------------------------------------

    def end_step(self, metrics: dict[str, float], extra_seconds: float = 0.0,
                 evaluate: Optional[Callable[[], Any]] = None) -> None:
        """Count the step, log metrics, run ``evaluate()`` (a periodic evaluation, tagged with this
        step and included in its checkpoint), checkpoint when due, and stop on a signal.

        ``extra_seconds`` adds time spent outside ``step`` (generation, scoring) to the clock.
        """
        self.step_count += 1
        self.train_seconds += extra_seconds
        metrics = {"step": self.step_count, **metrics, "samples": self.samples, "tokens": self.tokens,
                   "tokens_per_second": self.tokens / max(self.train_seconds, 1e-9)}
        self.last_metrics = metrics
        if self.is_main and (self.step_count % self.cfg.log_every == 0 or self.step_count == self.total_steps):
            append_jsonl(self.out / "metrics.jsonl", metrics)
            self._track(metrics)
        if self.bar is not None:
            self.bar.update(1)
            show = {k: v for k, v in metrics.items() if k in ("loss", "reward/mean", "kl", "rewards/accuracies")}
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in show.items()}, refresh=False)
        if evaluate is not None:
            evaluate()
        if self.cfg.checkpoint_every and self.step_count % self.cfg.checkpoint_every == 0:
            self.save_checkpoint()
        if self.world_size > 1:  # a signal that reached one process stops them all at this step
            import torch.distributed as dist

            got = torch.tensor([self._signal or 0], device=self.device)
            dist.all_reduce(got, op=dist.ReduceOp.MAX)
            self._signal = int(got) or None
        if self._signal is not None:
            self.save_checkpoint()
            code = 130 if self._signal == signal.SIGINT else 143
            self.close_bar()
            self.end_trackers()
            raise Interrupted(code)

    def log(self, metrics: dict) -> None:
        """Log extra metrics (e.g. evaluation) tagged with the current step."""
        if self.is_main:
            append_jsonl(self.out / "metrics.jsonl", {"step": self.step_count, **metrics})
            self._track({"step": self.step_count, **metrics})
        self.last_metrics = {**self.last_metrics, **metrics}

    def _track(self, line: dict) -> None:
        """Send a metrics.jsonl line to the trackers (``train.report_to``) at its step; numbers only."""
        if self.cfg.report_to:
            values = {k: v for k, v in line.items()
                      if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
            self.accelerator.log(values, step=line["step"])

    def end_trackers(self) -> None:
        """Close the trackers (``train.report_to``). Not ``accelerator.end_training()``, which also
        destroys the process group that a later stage in this process (``rlhfkit run``) still needs;
        the CLI destroys it on the way out (``distributed.close_process_group``)."""
        for tracker in self.accelerator.trackers:
            tracker.finish()

    def log_table(self, name: str, rows: list[dict]) -> None:
        """Log ``rows`` (e.g. evaluation samples) as one table to the trackers that have tables (wandb)."""
        if not (self.cfg.report_to and self.is_main and rows):
            return
        columns = list(rows[0])
        data = [[r.get(c) if isinstance(r.get(c), (int, float, str)) else str(r.get(c)) for c in columns] for r in rows]
        for tracker in self.accelerator.trackers:
            if hasattr(tracker, "log_table"):
                tracker.log_table(name, columns=columns, data=data, step=self.step_count)

    @property
    def done(self) -> bool:
        return self.step_count >= self.total_steps

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def finish(self, save: Optional[Callable[[Path], None]] = None, extra: Optional[dict] = None) -> dict:
        """Save the model (``save(output_dir)`` on the main process) and write summary.json."""
        self.close_bar()
        self.accelerator.wait_for_everyone()
        if save is not None and self.plan["strategy"] in ("fsdp", "deepspeed"):
            self.gathered = self.full_state_dict()  # a collective: every process takes part
        if save is not None and self.is_main:
            save(self.out)
        summary = {
            "command": self.command,
            "steps": self.step_count,
            "samples": self.samples * self.world_size,
            "tokens": self.tokens * self.world_size,
            "train_seconds": round(self.train_seconds, 3),
            "tokens_per_second": self.tokens * self.world_size / max(self.train_seconds, 1e-9),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "trainable_parameters": self.n_trainable,
            "processes": self.world_size,
            "final": self.last_metrics,
            **({"best_metric": self.cfg.best_metric, "best_step": self.state["best"]["step"],
                "best_value": self.state["best"]["value"]} if "best" in self.state else {}),
            **self.extra_summary,
            **(extra or {}),
        }
        if self.sharded:  # what each process held: its shards of the policy and of the frozen modules
            import torch.distributed as dist

            from rlhfkit.distributed import local_numel

            mine = (local_numel(self.model), sum(local_numel(m) for m in self._frozen))
            held: list = [None] * self.world_size
            dist.all_gather_object(held, mine)
            summary["sharding"] = {"parameters": self.n_parameters, "frozen_parameters": self.n_frozen,
                                   "parameters_per_process": [h[0] for h in held],
                                   "frozen_parameters_per_process": [h[1] for h in held]}
        if self.is_main:
            atomic_write_json(self.out / "summary.json", summary)
        self.end_trackers()
        self._restore_signals()
        return summary

    # ----------------------------------------------------------------------------------------
    # evaluate - train - evaluate, and the best model
    # ----------------------------------------------------------------------------------------

    def keep_best(self, metrics: Optional[dict], save: Callable[..., None],
                  prepare: Optional[Callable[[], Any]] = None) -> bool:
        """After an evaluation: when ``metrics[train.best_metric]`` beats the best so far
        (``train.best_mode``), save the model with ``save(folder)`` into ``output_dir/best``
        (written beside it, then renamed: never half-written) and remember the step and value
        (kept in checkpoints; ``best_step`` / ``best_value`` in summary.json). True if it did.
        ``save`` runs on the main process only; ``prepare()``, when given, runs first on every
        process (what needs the sharded model, e.g. the reward model's statistics) and its result
        is passed on: ``save(folder, prepare())``."""
        name = self.cfg.best_metric
        if name is None or metrics is None:
            return False
        if name not in metrics:
            raise UserError(f"train.best_metric='{name}' was not logged by this evaluation "
                            f"(it logged {', '.join(sorted(metrics)) or 'nothing'})")
        value = float(metrics[name])
        best = self.state.get("best")
        if best is not None and not (value > best["value"] if self.cfg.best_mode == "max" else value < best["value"]):
            return False
        self.state["best"] = {"step": self.step_count, "value": value}
        self.accelerator.wait_for_everyone()
        prepared = (prepare(),) if prepare is not None else ()  # a collective under fsdp
        if self.plan["strategy"] in ("fsdp", "deepspeed"):  # save() reads the gathered weights (saved_state)
            self.gathered = self.full_state_dict()  # a collective: every process takes part
        if self.is_main:
            final = self.out / "best"
            tmp, old = final.with_name("best.tmp"), final.with_name("best.old")
            for folder in (tmp, old):
                if folder.exists():
                    shutil.rmtree(folder)
            tmp.mkdir(parents=True)
            save(tmp, *prepared)
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
            if old.exists():
                shutil.rmtree(old)
            logger.info(f"best {name} {value:.6g} at step {self.step_count}: model saved in {final}")
        self.gathered = None
        self.accelerator.wait_for_everyone()
        return True

    def run_loop(self, step: Callable[[], dict], evaluate: Callable[[], Optional[dict]], every: int,
                 save: Callable[..., None], prepare: Optional[Callable[[], Any]] = None
                 ) -> tuple[Optional[dict], Optional[dict]]:
        """The evaluate - train - evaluate loop of the offline recipes.

        ``evaluate()`` returns the held-out metrics (None without held-out data), which are logged;
        it runs before the first step (once: the result, ``eval_start``, is kept in checkpoints),
        every ``every`` steps (0: never in between) and after the last step, and ``keep_best`` follows
        each (with ``save`` and ``prepare``). ``step()`` does one optimizer step and returns its
        metrics for ``end_step``.
        Returns ``(eval_start, eval_end)``, also written to summary.json."""
        def run_eval() -> Optional[dict]:
            metrics = evaluate()
            if metrics is None and self.cfg.best_metric is not None:
                raise UserError(f"train.best_metric='{self.cfg.best_metric}' needs held-out data: set data.eval_path, "
                                "data.eval_split or data.eval_fraction > 0")
            if metrics is not None:
                self.log(metrics)
                self.keep_best(metrics, save, prepare)
            return metrics

        if "eval_start" not in self.state:
            self.state["eval_start"] = run_eval()
            if self.state["eval_start"] is None and every:
                raise UserError(f"eval.every={every} needs held-out data: set data.eval_path, data.eval_split or "
                                "data.eval_fraction > 0")
        def periodic() -> None:
            if every and self.step_count % every == 0 and not self.done:
                run_eval()

        while not self.done:
            self.end_step(step(), evaluate=periodic)
        end = run_eval()
        self.extra_summary.update(eval_start=self.state["eval_start"], eval_end=end)
        return self.state["eval_start"], end

    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained model's full weights on the main process (CPU), gathered from FSDP2 shards or
        DeepSpeed ZeRO partitions; a collective that every process must call."""
        if self.sharded:
            from rlhfkit.distributed import full_state_dict

            return full_state_dict(self.model)
        return {k: v.cpu() for k, v in self.accelerator.get_state_dict(self.model).items()}

    def saved_state(self, prefix: str = "") -> Optional[dict[str, torch.Tensor]]:
        """For a recipe's ``save``: the gathered weights under ``prefix`` (prefix removed) when the
        model is sharded (FSDP2, DeepSpeed), else None (read the module itself)."""
        if self.gathered is None:
            return None
        return {k[len(prefix):]: v for k, v in self.gathered.items() if k.startswith(prefix)}

    def prepare_frozen(self, module: Optional[nn.Module]) -> Optional[nn.Module]:
        """Place a frozen module the policy works with (a reference copy, a reward model) as the
        policy is placed: on the Engine's device, sharded under ``strategy=fsdp`` (no full copy per
        process). Frozen modules need no DDP wrapper: they get no gradients."""
        if module is None:
            return None
        self.placed.append(module)
        if self.sharded:
            from rlhfkit.distributed import shard

            self._frozen.append(module)
            self.n_frozen += sum(p.numel() for p in module.parameters())
            return shard(module, self.device, mixed_precision=self.mixed_precision == "bf16",
                         cpu_offload=self.cfg.fsdp_cpu_offload or self.plan.get("cpu_offload", False), frozen=True)
        return module.to(self.device)

    # ----------------------------------------------------------------------------------------
    # checkpoints: trainable weights (safetensors), optimizer/scheduler/RNG (weights_only load)
    # ----------------------------------------------------------------------------------------

    def checkpointed(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The parameters a checkpoint holds: the trainable ones and those named by ``CHECKPOINT_FROZEN``."""
        return {n: p for n, p in model.named_parameters()
                if p.requires_grad or (self.CHECKPOINT_FROZEN and n.startswith(self.CHECKPOINT_FROZEN))}

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().contiguous() for n, p in self.checkpointed(self.unwrapped()).items()}

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-N`` atomically: every file goes into ``step-N.tmp``, is fsynced,
        and the folder is renamed into place; an existing ``step-N`` is moved aside first and deleted
        only after the new one is in place, so a kill at any moment leaves an intact newest
        checkpoint. A second call at the same step (a signal arriving on a checkpoint step) writes
        nothing. The run's ``config.yaml`` is copied in, to name the key when a resume's config no
        longer fits the checkpoint."""
        from safetensors.torch import save_file

        final = self.out / "checkpoints" / f"step-{self.step_count:07d}"
        if getattr(self, "_checkpointed_step", None) == self.step_count:
            return final
        self.accelerator.wait_for_everyone()
        tmp = final.with_name(final.name + ".tmp")
        if self.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        if self.sharded:  # every process writes its own shards
            from rlhfkit.distributed import save_shards

            self.accelerator.wait_for_everyone()
            save_shards(self.model, self.optimizer, tmp / "sharded", set(self.checkpointed(self.model)))
            self.accelerator.wait_for_everyone()
        elif self.plan["strategy"] == "deepspeed":  # ZeRO partitions: accelerate writes DeepSpeed's own checkpoint
            self.accelerator.wait_for_everyone()
            self.accelerator.save_state(str(tmp / "deepspeed"))
        if self.is_main:
            if self.plan["strategy"] not in ("fsdp", "deepspeed"):
                save_file(self._trainable_state(), str(tmp / "trainable.safetensors"))
                torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save({"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}, tmp / "rng.pt")
            if (self.out / "config.yaml").is_file():
                shutil.copyfile(self.out / "config.yaml", tmp / "config.yaml")
            atomic_write_json(tmp / "state.json", {
                "step": self.step_count, "samples": self.samples, "tokens": self.tokens,
                "train_seconds": self.train_seconds, "recipe": self.state, "last_metrics": self.last_metrics})
            for f in tmp.iterdir():
                _fsync(f)
            _fsync(tmp)
            old = final.with_name(final.name + ".old")
            if final.exists():
                if old.exists():
                    shutil.rmtree(old)
                os.replace(final, old)
            os.replace(tmp, final)
            _fsync(final.parent)
            if old.exists():
                shutil.rmtree(old)
            ckpts = sorted((self.out / "checkpoints").glob("step-*[0-9]"))
            for stale in ckpts[: max(0, len(ckpts) - max(self.cfg.keep_checkpoints, 1))]:
                shutil.rmtree(stale)
            logger.info(f"checkpoint written: {final}")
        self._checkpointed_step = self.step_count
        self.accelerator.wait_for_everyone()
        return final

    def _read_checkpoint(self, ck: Path) -> dict:
        """Every file of checkpoint ``ck`` this process reads itself, loaded (raises if one is
        missing or unreadable; a UserError if ``ck`` was written under another ``train.strategy``).
        Sharded (``fsdp``) and DeepSpeed weights are read later by their own loaders."""
        import json

        from safetensors.torch import load_file

        from rlhfkit.config import UserError

        kinds = {"fsdp": "sharded", "deepspeed": "deepspeed"}
        wrote = next((k for k, sub in kinds.items() if (ck / sub).is_dir()), "auto/ddp")
        expect = self.plan["strategy"] if self.plan["strategy"] in kinds else "auto/ddp"
        if wrote != expect:
            raise UserError(f"{ck}: written under train.strategy {wrote}, this run uses {expect}; resume with the "
                            "strategy that wrote it")
        data = {
            "scheduler": torch.load(ck / "scheduler.pt", weights_only=True),
            "rng": torch.load(ck / "rng.pt", weights_only=True),
            "state": json.loads((ck / "state.json").read_text(encoding="utf-8")),
        }
        if expect == "auto/ddp":
            data["weights"] = load_file(str(ck / "trainable.safetensors"))
            data["optimizer"] = torch.load(ck / "optimizer.pt", weights_only=True, map_location="cpu")
        return data

    def load_checkpoint(self) -> None:
        """Resume from the newest intact checkpoint. One whose files do not all load (a truncated
        safetensors file, a missing state file) is skipped with a warning naming it. Weights that do
        not fit this model (a config change such as ``lora.enabled``) are an error naming the key."""
        from rlhfkit.config import UserError

        ckpts = _checkpoint_folders(self.out / "checkpoints")
        if not ckpts:
            raise UserError(f"{self.out}/checkpoints: no checkpoint to resume from")
        ck, data = None, None
        for cand in reversed(ckpts):
            try:
                data = self._read_checkpoint(cand)
                ck = cand
                break
            except UserError:  # intact, but written under another train.strategy
                raise
            except Exception as e:  # safetensors, torch.load, json and OS errors all mean "broken"
                reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                logger.warning(f"warning: checkpoint {cand} is broken ({type(e).__name__}: {reason}); "
                               f"trying an older one")
        if ck is None:
            raise UserError(f"{self.out}/checkpoints: no intact checkpoint to resume from "
                            f"({len(ckpts)} broken: {', '.join(c.name for c in ckpts)})")
        if ck != ckpts[-1]:
            logger.warning(f"warning: resuming from {ck.name}, not the newest {ckpts[-1].name} (broken)")
        if self.sharded:
            from rlhfkit.distributed import load_shards

            load_shards(self.model, self.optimizer, ck / "sharded", set(self.checkpointed(self.model)))
        elif self.plan["strategy"] == "deepspeed":
            self.accelerator.load_state(str(ck / "deepspeed"))
        else:
            model = self.unwrapped()
            weights = data["weights"]
            params = self.checkpointed(model)
            bad_shape = [n for n, t in weights.items() if n in params and tuple(t.shape) != tuple(params[n].shape)]
            if set(weights) != set(params) or bad_shape:
                raise UserError(_mismatch_message(ck, self.out, set(weights), set(params), bad_shape))
            with torch.no_grad():
                for n, t in weights.items():
                    params[n].copy_(t.to(params[n].device, params[n].dtype))
            try:
                self.optimizer.load_state_dict(data["optimizer"])
            except (ValueError, KeyError) as e:
                raise UserError(f"{ck}: optimizer state does not fit this run ({e}); "
                                f"{_config_diff_hint(ck, self.out)}") from None
        self.scheduler.load_state_dict(data["scheduler"])
        rng = data["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        st = data["state"]
        self.step_count, self.samples, self.tokens = st["step"], st["samples"], st["tokens"]
        self.train_seconds = st["train_seconds"]
        self.last_metrics = st.get("last_metrics", {})
        self.state.clear()
        self.state.update(st["recipe"])
        self.resumed_from = ck
        if self.is_main and (self.out / "metrics.jsonl").exists():
            _truncate_metrics(self.out / "metrics.jsonl", self.step_count)
        logger.info(f"resumed from {ck} at step {self.step_count}")

    # ----------------------------------------------------------------------------------------
    # signals
    # ----------------------------------------------------------------------------------------

    def _install_signals(self) -> None:
        self._old_handlers = {}

        def handler(signum, _frame):
            if self._signal is not None:  # second signal: stop now
                raise KeyboardInterrupt
            self._signal = signum
            logger.warning(f"signal {signum}: finishing the current step, then writing a checkpoint")

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old_handlers[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass

    def _restore_signals(self) -> None:
        for sig, h in getattr(self, "_old_handlers", {}).items():
            signal.signal(sig, h)


def _checkpoint_folders(folder: Path) -> list[Path]:
    """``step-N`` folders, oldest first. A ``step-N.old`` (the previous copy of step N, moved aside
    while its replacement is renamed in) counts, just below its ``step-N``: a kill between the two
    renames leaves only it."""
    import re

    found = []
    for p in folder.glob("step-*") if folder.is_dir() else []:
        m = re.fullmatch(r"step-(\d+)(\.old)?", p.name)
        if m and p.is_dir():
            found.append(((int(m.group(1)), m.group(2) is None), p))
    return [p for _, p in sorted(found)]


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _flat(d: Any, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return {k.rstrip("."): v for k, v in out.items()}


def _config_diff_hint(ck: Path, out: Path) -> str:
    """Which config keys differ between the checkpoint's run and this one (model/lora keys first)."""
    import yaml

    try:
        then = _flat(yaml.safe_load((ck / "config.yaml").read_text(encoding="utf-8")) or {})
        now = _flat(yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8")) or {})
    except (OSError, yaml.YAMLError):
        return "was the model or lora config changed since the checkpoint was written?"
    ignore = ("train.max_steps", "train.epochs", "train.output_dir", "train.checkpoint_every",
              "train.keep_checkpoints", "train.progress", "train.log_every")
    diff = [k for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k) and k not in ignore]
    diff.sort(key=lambda k: not k.startswith(("lora.", "model.", "value_model", "reward_model")))
    if not diff:
        return "was the model or lora config changed since the checkpoint was written?"
    shown = ", ".join(f"{k} was {then.get(k)!r}, now {now.get(k)!r}" for k in diff[:3])
    return f"config changed since the checkpoint: {shown}; resume with the run's settings or use a new output_dir"


def _mismatch_message(ck: Path, out: Path, saved: set, wanted: set, bad_shape: list) -> str:
    parts = []
    if wanted - saved:
        parts.append(f"{len(wanted - saved)} trainable weights missing (e.g. {sorted(wanted - saved)[0]})")
    if saved - wanted:
        parts.append(f"{len(saved - wanted)} unexpected (e.g. {sorted(saved - wanted)[0]})")
    if bad_shape:
        parts.append(f"{len(bad_shape)} of another shape (e.g. {bad_shape[0]})")
    return f"{ck}: the checkpoint does not fit this model ({', '.join(parts)}): {_config_diff_hint(ck, out)}"


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines logged after the checkpoint we resume from."""
    import json

    from rlhfkit.utils import atomic_write_text

    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def process_info(cfg: TrainConfig) -> tuple[int, int]:
    """(world size, rank) of this run, known before the Engine is built (for data sharding)."""
    from accelerate import PartialState

    state = PartialState(cpu=cfg.cpu or not torch.cuda.is_available())
    return state.num_processes, state.process_index


def total_steps_for(cfg: TrainConfig, steps_per_epoch: int) -> int:
    return cfg.epochs * steps_per_epoch if cfg.epochs else cfg.max_steps


__all__ = ["Engine", "Interrupted", "batch_samples", "batch_tokens", "make_adamw", "process_info", "total_steps_for"]
