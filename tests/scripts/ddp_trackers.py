"""Run by test_trackers under torchrun: 2 SFT steps on 2 processes with TensorBoard and W&B (offline)."""
import sys
from pathlib import Path

from helpers import sft_config
from rlhfkit.recipes import sft

model, data, out = sys.argv[1:4]
cfg = sft_config(model, data, Path(out), batch_size=4, max_steps=2)
cfg.train.report_to = ["tensorboard", "wandb"]
sft.run(cfg)

from rlhfkit.distributed import close_process_group

close_process_group(clean=True)  # as the CLI does: no process group left to interpreter exit
