"""Where and in what precision a run computes, decided once from the config and handed to the trainer, the
Distiller, the loaders and evaluation (none of them re-derives it)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def pick_device(choice: str, key: str = "trainer.device", index: int = 0) -> torch.device:
    """auto: CUDA where one is visible, else the CPU. `key` names the setting in the error; `index`: the CUDA
    device (torchrun's LOCAL_RANK)."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{key}=cuda but no CUDA device is visible; use {key}=cpu")
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", index)
    return torch.device("cpu")


def auto_precision(device: str) -> str:
    """trainer.precision=auto for trainer.device=`device`: bf16 autocast where the hardware computes in bf16 (CUDA;
    CPUs with AVX512-BF16 or AMX, which oneDNN reports), else fp32. A CPU without them emulates bf16: R50 -> R18 at
    batch 16 on this project's 2-core CPU machines took 175 s per step under bf16 autocast and 10 s in fp32."""
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return "bf16" if cuda or torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


@dataclass(frozen=True)
class Placement:
    device: torch.device
    amp_dtype: torch.dtype | None  # autocast's dtype for teachers and student; None: fp32, no autocast
    memory_format: torch.memory_format  # of images and convolution weights
    scaler: bool  # fp16: a GradScaler scales the loss

    @property
    def half_images(self) -> bool:
        """Whether loaders may hand over float16 images (where that is fast: DALI on a GPU): under autocast."""
        return self.amp_dtype is not None

    def loader_options(self) -> dict:
        """Where a loader puts its batches: fastreg.pipelines.build_loader's device, memory_format and half."""
        return {"device": self.device, "memory_format": self.memory_format, "half": self.half_images}

    @classmethod
    def of(cls, precision: str, channels_last: bool, device: torch.device) -> Placement:
        return cls(
            device,
            AMP_DTYPES[precision],
            torch.channels_last if channels_last else torch.contiguous_format,
            precision == "fp16",
        )
