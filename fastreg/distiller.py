"""The Distiller: teachers, student, heads and losses in one module, a batch -> loss.

    s = student(x)                                   # (B, d) pooled feature of the student's view x
    for each teacher i:  t_i = teacher_i(x)          # (B, D_i), frozen, the SAME x; or a weak view of x's crop,
                                                     #   or of a crop of its own (data.teacher_view=weak,
                                                     #   data.teacher_crop); or the image's cached feature
                                                     #   (teacher.cache)
                         L_i = loss_i(head_i(s), t_i)    # fused simreg: all i in one kernel launch
                         # SEED's small patches p (data.small_patches): + CE(head_i(student(p)), teacher_i(p))
                         #   over the loss's second queue
    L = sum_i w_i L_i / sum_i w_i

The trainer sees `loss, metrics = distiller(batch)` and the interface below (trainable_parameters,
trained_buffers, save_state/load_state of the trained part, loss_names, student, wrap, compile); it never
reaches into the heads, the losses or the teachers.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastreg import checkpoint as ckpt
from fastreg.cached_teacher import CachedTeacher
from fastreg.config import TrainConfig
from fastreg.heads import build_head
from fastreg.index import DatasetIndex
from fastreg.losses import FusedRegressionLoss, build_loss, loss_terms
from fastreg.monitor import phase
from fastreg.pipelines import Batch
from fastreg.placement import Placement
from fastreg.students import Student
from fastreg.teachers import Teacher, build_teacher


class StudentWithHeads(nn.Module):
    """The trained part. DDP and torch.compile wrap this, never the frozen teachers (their own compile:
    teacher.compile)."""

    def __init__(self, student: Student, heads: nn.ModuleList):
        super().__init__()
        self.student, self.heads = student, heads

    def forward(
        self, images: torch.Tensor, patches: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """(every head's output of the images [(B, D_i)], and of the small patches [(B*P, D_i)] or None). One call
        for both, so DDP sees one forward per step; the student's BatchNorm normalizes each batch on its own."""
        s = self.student(images)  # (B, d), once for every head
        preds = [head(s) for head in self.heads]
        if patches is None:
            return preds, None
        s_p = self.student(patches)  # (B*P, d)
        return preds, [head(s_p) for head in self.heads]


class Distiller(nn.Module):
    def __init__(
        self,
        teachers: list[Teacher | CachedTeacher],
        student: Student,
        heads: list[nn.Module],
        losses: list[nn.Module],
        weights: list[float],
        amp_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.teachers = nn.ModuleList(teachers)
        self.model = StudentWithHeads(student, nn.ModuleList(heads))
        self.losses = nn.ModuleList(losses)
        self.weights = [w / sum(weights) for w in weights]
        self.amp_dtype = amp_dtype
        self.wrap(lambda m: m)

    @property
    def student(self) -> Student:
        """The student with its pooled feature: what evaluation and export see."""
        return self.model.student

    @property
    def loss_names(self) -> list[str]:
        """The per-teacher losses among the metrics, loss/<teacher>."""
        return [f"loss/{teacher.name}" for teacher in self.teachers]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def trained_buffers(self) -> dict[str, torch.Tensor]:
        """The trained part's buffers by name (BatchNorm's running statistics): a training step changes them."""
        return dict(self.model.named_buffers())

    def save_state(self) -> dict[str, Any]:
        """The trained part for a checkpoint (fastreg.checkpointer): the student's backbone, the heads, and the
        losses' buffers (SEED's queue, the teacher center)."""
        return {
            "student": self.student.backbone.state_dict(),
            "heads": self.model.heads.state_dict(),
            "loss": self.losses.state_dict(),
        }

    def load_state(self, state: dict[str, Any], source: Path) -> None:
        """save_state's entries back; a tensor that does not fit is an error naming it and `source`."""
        ckpt.load_state(self.student.backbone, state["student"], "student", source)
        ckpt.load_state(self.model.heads, state["heads"], "heads", source)
        ckpt.load_state(self.losses, state["loss"], "loss", source)

    def implementations(self) -> dict[str, list]:
        """What runs, for benchmarks: each head's class, whether each loss is fused, each teacher's inference."""
        return {
            "heads": [type(h).__name__ for h in self.model.heads],
            "fused_loss": [isinstance(loss, FusedRegressionLoss) for loss in self.losses],
            "teachers": [inference(teacher) for teacher in self.teachers],
        }

    def wrap(self, fn: Callable[[nn.Module], nn.Module]) -> None:
        """Run the trained part through fn(model), e.g. DDP; state_dict keys don't change."""
        self.__dict__["_run_model"] = fn(self.model)  # not a registered submodule: no duplicate keys
        self.__dict__["_run_losses"] = self.weighted_losses

    def compile(self, mode: str = "default") -> None:
        """torch.compile the trained part (after wrap) and the losses: two graphs per step, the teachers between
        them run as they are (fastreg.teachers: folded, optionally compiled on their own)."""
        self.__dict__["_run_model"] = torch.compile(self._run_model, mode=mode)
        self.__dict__["_run_losses"] = torch.compile(self.weighted_losses, mode=mode)

    def weighted_losses(
        self,
        preds: list[torch.Tensor],
        targets: list[torch.Tensor],
        patches: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """(sum_i w_i L_i, [(L_i, cos_i)]) of the heads' outputs against the teachers' features; patches: each
        teacher's (student, teacher) small-patch embeddings, or None."""
        terms = loss_terms(list(self.losses), preds, targets, patches)
        return sum(w * loss for w, (loss, _) in zip(self.weights, terms)), terms

    def autocast(self, device_type: str):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=device_type, dtype=self.amp_dtype)

    def bind_dataset(self, index: DatasetIndex | None) -> None:
        """Cached teachers check that their rows are the features of the loader's images (its index; None for
        synthetic data), then load their tables onto the device."""
        for teacher in self.teachers:
            if isinstance(teacher, CachedTeacher):
                teacher.bind_dataset(index)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """batch -> (weighted loss, {loss/<teacher>, cos/<teacher>} as 0-dim tensors)."""
        with self.autocast(batch.images.device.type), phase("student_forward"):
            preds, patch_preds = self._run_model(batch.images, batch.patches)
        with phase("teacher"):
            targets = [target(teacher, batch) for teacher in self.teachers]  # [(B, D_i)]
            patches = None
            if batch.patches is not None:  # data.small_patches: [(student (B*P, D_i), teacher (B*P, D_i))]
                patches = [(p, teacher(batch.patches)) for p, teacher in zip(patch_preds, self.teachers)]
        with phase("loss"):
            total, terms = self._run_losses(preds, targets, patches)  # [(loss_i, cos_i)]
        metrics = {}
        for teacher, (loss, cos) in zip(self.teachers, terms):
            metrics[f"loss/{teacher.name}"], metrics[f"cos/{teacher.name}"] = loss.detach(), cos
        return total, metrics


def target(teacher: Teacher | CachedTeacher, batch: Batch) -> torch.Tensor:
    """(B, D): a teacher's feature of the teachers' view, or a cached teacher's row of each image."""
    return teacher(batch.indices) if isinstance(teacher, CachedTeacher) else teacher(batch.teacher_view)


def inference(teacher: Teacher | CachedTeacher) -> str:
    """How a teacher runs: cached (no forward), eager, folded, or folded and compiled (fastreg.teacher_inference)."""
    if isinstance(teacher, CachedTeacher):
        return "cached"
    if teacher.backbone_dtype is None:
        return "eager"
    return "folded+compiled" if isinstance(teacher.backbone, torch._dynamo.eval_frame.OptimizedModule) else "folded"


def compile_report() -> str:
    """For train.log after the first compiled step: torch.compile's graphs and graph breaks in this process so far,
    with the most frequent break reasons (a break splits a graph and falls back to Python between the pieces)."""
    from torch._dynamo.utils import counters

    breaks = counters["graph_break"]
    text = f"torch.compile: {counters['stats']['unique_graphs']} graphs, {sum(breaks.values())} graph breaks"
    return text + "".join(f"; {n}x {reason}" for reason, n in breaks.most_common(5))


def build_distiller(cfg: TrainConfig, place: Placement) -> Distiller:
    amp_dtype, device = place.amp_dtype, place.device
    teachers = [
        CachedTeacher(t, key, device) if t.cache else build_teacher(t, amp_dtype=amp_dtype, device=device)
        for key, t in zip(cfg.teacher_keys, cfg.teachers)
    ]
    student = Student(cfg.student.arch)
    heads = [
        build_head(t.head, student.dim, teacher.dim, device, amp_dtype or torch.float32)
        for t, teacher in zip(cfg.teachers, teachers)
    ]
    losses = [build_loss(cfg.loss, teacher.dim, device, cfg.data.small_patches > 0) for teacher in teachers]
    distiller = Distiller(teachers, student, heads, losses, [t.weight for t in cfg.teachers], amp_dtype)
    distiller.model.to(device, memory_format=place.memory_format)
    distiller.losses.to(device)
    return distiller
