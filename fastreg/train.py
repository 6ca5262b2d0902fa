"""python -m fastreg.train [experiment=NAME] [group=option ...] [key=value ...]

With no arguments it runs the embedded demo (experiment=demo). One GPU or CPU:
    python -m fastreg.train experiment=simreg_r50_r18 teacher.checkpoint=moco_v2_800ep.pth.tar data.root=/imagenet/train
Several GPUs (every rank gets the same output directory, runs/<name>):
    torchrun --nproc_per_node=8 -m fastreg.train experiment=simreg_r50_r18 ...
"""

from __future__ import annotations

import hydra
import torch.distributed as dist
from omegaconf import DictConfig

from fastreg.config import to_config
from fastreg.trainer import Trainer


def train(cfg: DictConfig) -> dict[str, float]:
    config = to_config(cfg)
    if config.demo:
        from fastreg.demo import run_demo

        return run_demo(config)
    return Trainer(config).fit()


@hydra.main(version_base="1.3", config_path="pkg://fastreg.configs", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
