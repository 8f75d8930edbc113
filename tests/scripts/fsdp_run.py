"""Run by test_distributed under torchrun (2 processes, strategy=fsdp): CASE uninterrupted to
DIR/full (a sampling case first under DDP to DIR/ddp, its reference); then in DIR/resumed, a run
that process 1 alone sends SIGTERM after step 2 (both processes must stop there and write the
sharded checkpoint, exit 143), continued with ``--resume``."""
import os
import signal
import sys
from pathlib import Path

from fsdp_cases import SAMPLED, config, run

from rlhfkit.engine import Engine, Interrupted

case, model, data_dir, out = sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
if case in SAMPLED:  # the reference of a sampling case: DDP on these 2 processes
    run(case, config(case, model, data_dir, out / "ddp", "ddp", 4))
run(case, config(case, model, data_dir, out / "full", "fsdp", 4))

end_step = Engine.end_step


def end_step_with_sigterm(self, metrics, *args, **kwargs):
    if self.step_count == 1 and self.rank == 1 and self.out.name == "resumed":
        os.kill(os.getpid(), signal.SIGTERM)  # arrives during step 2 (handled by the Engine)
    return end_step(self, metrics, *args, **kwargs)


Engine.end_step = end_step_with_sigterm
try:
    run(case, config(case, model, data_dir, out / "resumed", "fsdp", 4))
    raise SystemExit("the run was not interrupted")
except Interrupted as e:
    assert e.code == 143, e.code
Engine.end_step = end_step
run(case, config(case, model, data_dir, out / "resumed", "fsdp", 4), resume=True)

from rlhfkit.distributed import close_process_group

close_process_group(clean=True)  # as the CLI does: no process group left to interpreter exit
