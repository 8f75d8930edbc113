"""Run by test_distributed under torchrun (2 processes, strategy=fsdp): CASE once to DIR/full
(checkpoint at step 2), then again from a copy of that step-2 checkpoint in DIR/resumed
(``--resume``): an interrupted run continued."""
import shutil
import sys
from pathlib import Path

import torch.distributed as dist

from fsdp_cases import config, run

case, model, data_dir, out = sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
run(case, config(case, model, data_dir, out / "full", "fsdp", 4))
if dist.get_rank() == 0:
    shutil.copytree(out / "full" / "checkpoints" / "step-0000002", out / "resumed" / "checkpoints" / "step-0000002")
dist.barrier()
run(case, config(case, model, data_dir, out / "resumed", "fsdp", 4), resume=True)
