"""Processes, devices and seeds: torchrun's ranks (NCCL on GPUs, gloo on CPUs), per-epoch seeding, deterministic
kernels, and gathering a small object from every rank."""

from __future__ import annotations

import builtins
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager

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


FAILED = "fastreg/failed/"  # + a rank: the error that stopped it, in the process group's store (failures_shared)


@contextmanager
def failures_shared(rank: int, world: int) -> Iterator[None]:
    """Every rank stops with the error of the rank that failed, at no cost while none fails.

    A rank that fails alone (its loader met a file changed since the index checked it, say) leaves the others in
    their next collective: DDP's all-reduce, the loss check. It posts its error in the process group's store, and
    raises. With gloo, the others' collective fails as its process ends ("Connection closed by peer"), and they
    raise the posted error instead, naming its rank, as the same built-in type: a user's error stays one line.
    Where the store lived in that process (rank 0's, unless torchrun's agent keeps it), they raise a ConnectionError
    naming rank 0. NCCL does not notice a rank that left: the others wait in their collective until the launcher
    stops them (torchrun does at once; srun does with --kill-on-bad-exit) or NCCL's timeout ends them."""
    try:
        yield
    except Exception as e:
        if world == 1:
            raise
        told = posted_failure(rank, world) if isinstance(e, RuntimeError) else None
        if told is not None:
            raise told from e
        post_failure(rank, e)
        raise


def post_failure(rank: int, error: Exception) -> None:
    """`error` in the store, with the name of its first built-in type, for the ranks it leaves waiting."""
    kind = next(c.__name__ for c in type(error).__mro__ if c.__module__ == "builtins")
    try:
        dist.distributed_c10d._get_default_store().set(f"{FAILED}{rank}", f"{kind}\t{error}")
    except Exception:  # noqa: BLE001 - no store to post in: the others get their backend's error
        pass


def posted_failure(rank: int, world: int) -> Exception | None:
    """The error another rank posted, naming it; None if none did (this rank's RuntimeError is its own)."""
    try:
        store = dist.distributed_c10d._get_default_store()
        failed = [other for other in range(world) if other != rank and store.check([f"{FAILED}{other}"])]
        if not failed:
            return None
        kind, message = store.get(f"{FAILED}{failed[0]}").decode().split("\t", 1)
    except Exception:  # noqa: BLE001 - the store is gone: it lived in rank 0's process, which ended
        if rank == 0:
            return None
        return ConnectionError(
            "rank 0 ended, and with it every rank: its own output says why (the process group's store, where it "
            "would have posted its error, lived in its process)"
        )
    text = f"rank {failed[0]} stopped, and with it every rank: {message}"
    try:
        return getattr(builtins, kind)(text)
    except Exception:  # noqa: BLE001 - a built-in type that takes more than a message
        return RuntimeError(text)
