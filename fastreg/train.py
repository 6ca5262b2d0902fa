"""python -m fastreg.train [experiment=NAME] [group=option ...] [key=value ...]

With no experiment= it runs the embedded demo (experiment=demo; python -m fastreg.demo is the same), which
stops at once when data.root=, teacher.checkpoint= or another path is given: those need experiment=none or a
recipe. One GPU or CPU:
    python -m fastreg.train experiment=simreg_r50_r18 teacher.checkpoint=moco_v2_800ep.pth.tar data.root=/imagenet/train
Several GPUs (every rank gets the same output directory, runs/<name>):
    torchrun --nproc_per_node=8 -m fastreg.train experiment=simreg_r50_r18 ...
SIGTERM or SIGUSR1 (Slurm's notice before a preemption or the time limit), whenever it comes, ends every process
with code 75 (EX_TEMPFAIL) and one line on stderr saying what was saved and what the same command does next
(README, "Preemption on Slurm"). In training, every rank stops at a step boundary (the next one, or within
trainer.stop_check_every steps with several processes) and saves a checkpoint, which the same command resumes.
Before training (the index, the teacher, the checkpoint being read) and in the final evaluation, which come after
the last save or before the first, the process stops at once: handled from main's first line, before the imports
of torch and hydra, which take seconds.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fastreg.preemption import EXIT_PREEMPTED, AtOnce, Preempted, when_stopped
from fastreg.run_folder import next_run

if TYPE_CHECKING:
    from omegaconf import DictConfig

log = logging.getLogger(__name__)
# Errors the user fixes in the command, the data, a file or the disk: their messages name the key or file and
# say what to do, so stderr shows the message alone (as `python -m fastreg.index` does), and the exit code is 1.
# Any other exception is a bug and keeps hydra's traceback; HYDRA_FULL_ERROR=1 shows the full traceback of
# these too, as it does for hydra's own errors.
USER_ERRORS = (ValueError, OSError, ImportError, FloatingPointError)
# A stop signal before hydra has read the config: the run folder is not known yet.
BEFORE_CONFIG = (
    "nothing was written: the same command starts over, or resumes from the newest checkpoint in its run folder "
    "if there is one"
)


def train(cfg: DictConfig) -> dict[str, float]:
    from fastreg.config import to_config
    from fastreg.trainer import Trainer

    config = to_config(cfg)
    if config.demo:
        from fastreg.demo import run_demo

        return run_demo(config)
    return Trainer(config).fit()


def run(cfg: DictConfig) -> None:
    """hydra's task: train(cfg), ending with the exit code and message of how it ended."""
    t = cfg.trainer  # a stop from now on: what the run folder holds says what the same command does
    when_stopped(lambda: next_run(Path(t.out_dir), t.resume, t.epochs), log)  # in train.log too, once it is open
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
        close_process_group()
    if preempted:
        sys.exit(EXIT_PREEMPTED)


def close_process_group() -> None:
    """torch.distributed's process group destroyed, if there is one; torch is not imported for this."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_initialized():
        dist.destroy_process_group()


def main() -> None:
    """python -m fastreg.train (fastreg.demo, torchrun's workers): stop signals handled from the first line on."""
    with AtOnce("fastreg.train", lambda: BEFORE_CONFIG):
        import hydra

        hydra.main(version_base="1.3", config_path="pkg://fastreg.configs", config_name="config")(run)()


if __name__ == "__main__":
    main()
