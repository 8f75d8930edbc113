"""Run by test_engine under torchrun: per-process batch 4 on 2 processes (global batch 8)."""
import sys
from pathlib import Path

from helpers import sft_config
from rlhfkit.recipes import sft

model, data, out = sys.argv[1:4]
cfg = sft_config(model, data, Path(out), batch_size=4, max_steps=2, adam_eps=1.0, lr=0.05)
sft.run(cfg)

from rlhfkit.distributed import close_process_group

close_process_group(clean=True)  # as the CLI does: no process group left to interpreter exit
