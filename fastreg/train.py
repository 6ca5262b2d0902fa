"""python -m fastreg.train [experiment=NAME] [group=option ...] [key=value ...]

With no experiment= it runs the embedded demo (experiment=demo; python -m fastreg.demo is the same), which
stops at once when data.root=, teacher.checkpoint= or another path is given: those need experiment=none or a
recipe. One GPU or CPU:
    python -m fastreg.train experiment=simreg_r50_r18 teacher.checkpoint=moco_v2_800ep.pth.tar data.root=/imagenet/train
Several GPUs (every rank gets the same output directory, runs/<name>):
    torchrun --nproc_per_node=8 -m fastreg.train experiment=simreg_r50_r18 ...
On SIGTERM or SIGUSR1 (Slurm's notice before a preemption or the time limit) every rank stops at a step
boundary (the next one, or within trainer.stop_check_every steps with several processes), saves a checkpoint
and exits with code 75 (EX_TEMPFAIL); the same command resumes from it (README, "Preemption on Slurm").
"""

from __future__ import annotations

import os
import sys

import hydra
import torch.distributed as dist
from omegaconf import DictConfig

from fastreg.config import to_config
from fastreg.preemption import EXIT_PREEMPTED, Preempted
from fastreg.trainer import Trainer

# Errors the user fixes in the command, the data, a file or the disk: their messages name the key or file and
# say what to do, so stderr shows the message alone (as `python -m fastreg.index` does), and the exit code is 1.
# Any other exception is a bug and keeps hydra's traceback; HYDRA_FULL_ERROR=1 shows the full traceback of
# these too, as it does for hydra's own errors.
USER_ERRORS = (ValueError, OSError, ImportError, FloatingPointError)


def train(cfg: DictConfig) -> dict[str, float]:
    config = to_config(cfg)
    if config.demo:
        from fastreg.demo import run_demo

        return run_demo(config)
    return Trainer(config).fit()


@hydra.main(version_base="1.3", config_path="pkg://fastreg.configs", config_name="config")
def main(cfg: DictConfig) -> None:
    preempted = False
    try:
        train(cfg)
    except Preempted:  # logged by the trainer, with its checkpoint and how to resume
        preempted = True
    except USER_ERRORS as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        sys.exit(f"error: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if preempted:
        sys.exit(EXIT_PREEMPTED)


if __name__ == "__main__":
    main()
