"""The optimizer (torch's fused SGD on CUDA, timm's LARS/LAMB, apex's) and the lr schedule, per iteration or per
epoch; a checkpoint stores each lr as a float."""

from __future__ import annotations

import math

import torch

from fastreg.config import OptimConfig


def build_optimizer(
    cfg: OptimConfig, params: list, lr: float, device: torch.device
) -> tuple[torch.optim.Optimizer, str]:
    """The optimizer and the name of the implementation that runs (logged)."""
    kw = dict(lr=lr, weight_decay=cfg.weight_decay)
    if cfg.name == "sgd":
        fused = device.type == "cuda"
        return torch.optim.SGD(params, momentum=cfg.momentum, fused=fused, **kw), f"torch.optim.SGD(fused={fused})"
    if cfg.name in ("lars", "lamb"):
        from timm.optim import Lamb, Lars

        if cfg.name == "lars":
            return Lars(params, momentum=cfg.momentum, **kw), "timm.optim.Lars"
        return Lamb(params, **kw), "timm.optim.Lamb"
    return build_apex_optimizer(cfg, params, kw)


def build_apex_optimizer(cfg: OptimConfig, params: list, kw: dict) -> tuple[torch.optim.Optimizer, str]:
    try:  # NVIDIA apex, built from source; the PyPI package named "apex" is unrelated and has no optimizers
        from apex.optimizers import FusedLAMB, FusedSGD
    except ImportError as e:
        raise RuntimeError(
            f"optim={cfg.name} needs NVIDIA apex (github.com/NVIDIA/apex, built with --cuda_ext), which is not "
            f"importable here ({e}); use optim=sgd, optim=lars or optim=lamb instead"
        ) from e
    if cfg.name == "apex_sgd":
        return FusedSGD(params, momentum=cfg.momentum, **kw), "apex.optimizers.FusedSGD"
    return FusedLAMB(params, **kw), "apex.optimizers.FusedLAMB"


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with each lr a float, also where trainer.cuda_graph keeps it in a device tensor: a
    checkpoint resumes with or without the graph, on any device."""
    state = optimizer.state_dict()  # param_groups are fresh dicts: changing them leaves the optimizer as it is
    for group in state["param_groups"]:
        group["lr"] = float(group["lr"])
    return state


def lr_at(step: int, peak: float, warmup_steps: int, total_steps: int, min_lr: float) -> float:
    """optim.schedule=iteration: linear warmup from 0 to peak, then cosine from peak to min_lr, per iteration."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (peak - min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def epoch_lr(epoch: int, base: float, peak: float, warmup_epochs: float, epochs: int) -> float:
    """optim.schedule=epoch, the official codes' rule for 0-based `epoch`: SEED's adjust_learning_rate
    (tools/utils.py) warms up linearly from base (the lr at batch 256) to peak (base x global batch / 256), then
    both it and SimReg's (tools.py, no warmup) decay as peak * 0.5 * (1 + cos(pi * epoch / epochs))."""
    if epoch < warmup_epochs:
        return base + (peak - base) * epoch / warmup_epochs
    return peak * 0.5 * (1 + math.cos(math.pi * epoch / epochs))


def lr_scaling_warning(recipe_batch: int | None, global_batch: int, world: int, base: float, peak: float) -> str | None:
    """What to tell the user when the run's global batch is not the one its recipe reproduces."""
    if recipe_batch is None or recipe_batch == global_batch:
        return None
    return (
        f"global batch {global_batch} (data.batch_size x {world} process(es)) differs from the {recipe_batch} that "
        f"this recipe reproduces (optim.recipe_batch): the lr is scaled linearly to {peak:.4g} = optim.base_lr "
        f"{base:g} x {global_batch}/256, and results may differ from the paper's"
    )


class LrSchedule:
    """The lr of every step: optim.schedule=iteration (lr_at) or epoch (epoch_lr), peaking at optim.base_lr x global
    batch / 256."""

    def __init__(self, cfg: OptimConfig, epochs: int, batches_per_epoch: int, global_batch: int):
        self.cfg, self.epochs, self.batches = cfg, epochs, batches_per_epoch
        self.peak = cfg.base_lr * global_batch / 256
        self.total_steps = epochs * batches_per_epoch
        self.warmup_steps = round(cfg.warmup_epochs * batches_per_epoch)

    def lr(self, step: int) -> float:
        """The lr of the step after `step` steps done."""
        if self.cfg.schedule == "epoch":
            return epoch_lr(step // self.batches, self.cfg.base_lr, self.peak, self.cfg.warmup_epochs, self.epochs)
        return lr_at(step, self.peak, self.warmup_steps, self.total_steps, self.cfg.min_lr)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = self.lr(step)
        for group in optimizer.param_groups:
            if torch.is_tensor(group["lr"]):  # trainer.cuda_graph: the graph reads this tensor
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        return lr
