"""trainer.cuda_graph: the whole update (student and heads forward, teachers, losses, backward, the NaN guard,
fused SGD) captured once as a CUDA graph and replayed for every batch. A replay launches the step's hundreds
of kernels at once, so the GPU never waits on Python between them (PyTorch's "whole network capture",
docs/notes/cuda.rst).

    steps 1..WARMUP   eager, on a side stream: cuDNN, cuBLAS, inductor and the Triton autotuners pick their
                      kernels, and lazy state appears (SGD's momentum buffers, the guard's backups)
    next step         capture update(inputs) into the graph (nothing runs), then replay it
    every step        inputs <- the batch's tensors (device copies); the trainer fills the lr tensors; replay

What a graph fixes, checked in TrainConfig (precision, optimizer, compile mode) and by check_device:
one CUDA process (DDP's all-reduce would need its own warm-up and NCCL settings), bf16 or fp32 (fp16's
GradScaler updates its scale on the host), optim=sgd (torch's fused SGD reads the lr from a device tensor and
the NaN guard's found_inf), and a compile mode other than reduce-overhead (which captures graphs of its own).
Every batch must have the captured shape; the loaders drop partial batches, and another shape raises.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch

from fastreg.pipelines import Batch

Outputs = TypeVar("Outputs")
WARMUP = 3  # eager steps before the capture, as in PyTorch's whole-network example (DDP would need 11)


def check_device(device: torch.device, world: int) -> None:
    if device.type != "cuda":
        raise ValueError(
            f"trainer.cuda_graph=true needs a CUDA device, and this run is on {device}: set trainer.cuda_graph=false"
        )
    if world > 1:
        raise ValueError(
            f"trainer.cuda_graph=true runs in one process, and this run has {world}: "
            "set trainer.cuda_graph=false under torchrun"
        )


def lr_tensors(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Each param group's lr as a 0-dim device tensor: the graph reads it where the trainer writes it
    (fill_, no host sync). The fused SGD kernel takes it as such."""
    for group in optimizer.param_groups:
        group["lr"] = torch.tensor(float(group["lr"]), device=device)


class StepGraph:
    """update(batch) -> outputs, run eagerly for WARMUP steps, then as a captured CUDA graph. The outputs
    of a replay are the graph's own tensors: read them before the next step overwrites them."""

    def __init__(self, update: Callable[[Batch], Outputs], device: torch.device):
        self.update, self.device = update, device
        self.eager_steps = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: Batch | None = None  # the static batch the graph reads, once captured
        self.outputs: Outputs | None = None

    def __call__(self, batch: Batch) -> Outputs:
        if self.graph is None and self.eager_steps < WARMUP:
            self.eager_steps += 1
            return self.side_stream(batch)
        if self.graph is None:
            self.capture(batch)
        for name, tensor in self.check_batch(batch).items():
            getattr(self.inputs, name).copy_(tensor)
        self.graph.replay()
        return self.outputs

    def side_stream(self, batch: Batch) -> Outputs:
        """One eager update on a side stream: lazy initialization must not happen on the capture's stream."""
        current, side = torch.cuda.current_stream(self.device), torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side), no_autocast_cache():
            outputs = self.update(batch)
        current.wait_stream(side)
        return outputs

    def capture(self, batch: Batch) -> None:
        # the same fields, dtypes and memory formats (channels-last)
        self.inputs = dataclasses.replace(batch, **{k: torch.empty_like(t) for k, t in batch.tensors().items()})
        self.graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: DALI's threads and the GPU monitor keep running while this thread captures
            with no_autocast_cache(), torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.outputs = self.update(self.inputs)
        except RuntimeError as e:
            raise RuntimeError(
                f"trainer.cuda_graph=true: capturing the training step as a CUDA graph failed ({e}). Some operation "
                "in the step waits on the host or cannot be captured; train with trainer.cuda_graph=false"
            ) from e

    def check_batch(self, batch: Batch) -> dict[str, torch.Tensor]:
        """batch's tensors, which must have the captured ones' shapes and dtypes."""
        tensors, captured = batch.tensors(), self.inputs.tensors()
        for name in tensors.keys() | captured.keys():
            got, want = tensors.get(name), captured.get(name)
            if got is None or want is None or got.shape != want.shape or got.dtype != want.dtype:
                raise ValueError(
                    f"trainer.cuda_graph=true captured the step for batches whose {name} is {describe(want)}, and "
                    f"this batch's is {describe(got)}: a CUDA graph replays fixed shapes. Keep every batch the same "
                    "size, or set trainer.cuda_graph=false"
                )
        return tensors


def describe(tensor: torch.Tensor | None) -> str:
    return "absent" if tensor is None else f"{tuple(tensor.shape)} {tensor.dtype}"


@contextmanager
def no_autocast_cache() -> Iterator[None]:
    """autocast's cached weight casts must not outlive a capture (torch.cuda.graphs). Off in the warm-up steps too:
    torch.compile guards on the autocast state, and a change at the capture would recompile inside it."""
    cache = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(False)
    try:
        yield
    finally:
        torch.set_autocast_cache_enabled(cache)
