"""Processes, devices and seeds: torchrun's ranks (NCCL on GPUs, gloo on CPUs), per-epoch seeding, deterministic
kernels, and gathering a small object from every rank."""

from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from fastreg.placement import pick_device
from fastreg.seeding import mix_seed


def launch() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) as torchrun sets them (RANK, LOCAL_RANK, WORLD_SIZE); (0, 0, 1) without it."""
    env = os.environ
    return int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0")), int(env.get("WORLD_SIZE", "1"))


def setup_distributed(device_choice: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). NCCL on GPU, gloo on CPU."""
    rank, local_rank, world = launch()
    device = pick_device(device_choice, "trainer.device", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        cuda = device.type == "cuda"
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=device if cuda else None)
    return rank, world, device


def seed_everything(seed: int, epoch: int, rank: int) -> None:
    """Seed per (seed, epoch, rank): each epoch's randomness is fixed, so a resumed run repeats it exactly."""
    s = mix_seed("epoch", seed, epoch, rank)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def set_deterministic(on: bool) -> None:
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.benchmark = not on


def ddp(model: torch.nn.Module, world: int, device: torch.device) -> torch.nn.Module:
    """The trained part under DistributedDataParallel with several processes; as it is with one."""
    if world == 1:
        return model
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def gather(obj: dict, world: int) -> list[dict]:
    """Every rank's `obj`, in rank order (a collective: all ranks call it)."""
    if world == 1:
        return [obj]
    objs: list = [None] * world
    dist.all_gather_object(objs, obj)
    return objs


def agree_on_failure(failure: BaseException | None, world: int, what: str) -> None:
    """Raise on every rank when any rank failed at `what` (a collective: all ranks call it): the failed rank
    re-raises its error, the others a RuntimeError naming it, so that none waits for it at a later barrier."""
    messages = gather({"error": f"{type(failure).__name__}: {failure}" if failure else None}, world)
    if failure is not None:
        raise failure
    for rank, message in enumerate(messages):
        if message["error"] is not None:
            raise RuntimeError(f"rank {rank} could not {what}: {message['error']}")
