"""Distillation losses. Each maps (student prediction (B, D), teacher feature (B, D)) to
(scalar loss, mean cosine similarity); buffers (SEED's queue, the teacher center) live here, so they
are saved in checkpoints with the heads.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastreg.config import LossConfig
from fastreg.kernel_choice import impl_name, loss_auto, use_triton

log = logging.getLogger(__name__)


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """(B, D) per rank -> (world*B, D), rank order; identity without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """A bf16/fp16 head output in fp32 for an eager loss (float64 stays)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def normalized_regression(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """SimReg: mean_b || s_b/|s_b| - t_b/|t_b| ||^2 = mean_b (2 - 2 cos(s_b, t_b))."""
    return (F.normalize(s, dim=1) - F.normalize(t, dim=1)).pow(2).sum(1).mean()


class TeacherCenter(nn.Module):
    """A running mean of the teacher's features, subtracted from them (DINO-style centering).

    Post-ReLU teacher features often share one dominant direction; without centering the student first
    learns that mean direction, which carries no information about the image.
    """

    def __init__(self, dim: int, momentum: float):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t - self.center

    @torch.no_grad()
    def update(self, t: torch.Tensor) -> None:
        batch_mean = all_gather(t).mean(0)  # the same center on every rank
        self.center.mul_(self.momentum).add_(batch_mean, alpha=1 - self.momentum)


class RegressionLoss(nn.Module):
    """simreg (normalized) or mse (raw) regression of the teacher feature, optionally centered, in eager PyTorch."""

    def __init__(self, cfg: LossConfig, dim: int):
        super().__init__()
        self.normalized = cfg.name == "simreg"
        self.center = TeacherCenter(dim, cfg.center_momentum) if cfg.center_teacher else None

    def forward(self, s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        target = self.target(t)
        loss = self.regress(s, target)
        self.update(t)
        return loss, self.cosine(s, target, loss)

    def target(self, t: torch.Tensor) -> torch.Tensor:
        return self.center(t) if self.center is not None else t

    def regress(self, s: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        s = at_least_fp32(s)
        return normalized_regression(s, target) if self.normalized else (s - target).pow(2).sum(1).mean()

    def update(self, t: torch.Tensor) -> None:
        if self.center is not None and self.training:
            self.center.update(t)  # after the loss: this batch's target used the previous center

    def cosine(self, s: torch.Tensor, target: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        """Mean cos(s_b, target_b); for simreg it is 1 - loss / 2 (loss_b = 2 - 2 cos_b), no further pass."""
        if self.normalized:
            return 1 - loss.detach() / 2
        return F.cosine_similarity(at_least_fp32(s.detach()), target, dim=1).mean()


class FusedRegressionLoss(RegressionLoss):
    """simreg through fastreg.kernels' Triton loss: one pass for the loss and its gradient, pred in its own dtype."""

    def regress(self, s: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        from fastreg.kernels import normalized_regression_loss

        return normalized_regression_loss(s, target)


def loss_terms(
    loss_fns: list[nn.Module],
    preds: list[torch.Tensor],
    targets: list[torch.Tensor],
    patches: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(loss_i, cos_i)] of every teacher i; several fused simreg losses go through one kernel launch. patches:
    every teacher's (student, teacher) embeddings of the small patches (SEEDLoss's second term)."""
    if patches is not None:
        return [fn(s, t, p) for fn, s, t, p in zip(loss_fns, preds, targets, patches)]
    if len(loss_fns) == 1 or not all(isinstance(fn, FusedRegressionLoss) for fn in loss_fns):
        return [fn(s, t) for fn, s, t in zip(loss_fns, preds, targets)]
    from fastreg.kernels import normalized_regression_losses

    centered = [fn.target(t) for fn, t in zip(loss_fns, targets)]
    losses = normalized_regression_losses([(s, c, None) for s, c in zip(preds, centered)])
    for fn, t in zip(loss_fns, targets):
        fn.update(t)
    return [(loss, fn.cosine(s, c, loss)) for fn, s, c, loss in zip(loss_fns, preds, centered, losses)]


class SEEDLoss(nn.Module):
    """SEED: the student matches the teacher's similarity distribution over a queue of teacher embeddings.

    p_t = softmax([t.t, t.Q] / tau_t), log p_s = log_softmax([s.t, s.Q] / tau_s), L = -mean_b sum_k p_t log p_s,
    with s, t, Q L2-normalized and the teacher's own embedding prepended as the positive.

    With small patches (seed/small_patch_builder.py, main_small-patch.py) the patches' embeddings get the same
    term over a second queue, and L = L_global + L_small, each the mean over its own rows (B, and B x P). The
    second queue takes each image's first patch only, at the main queue's pointer.
    """

    def __init__(self, cfg: LossConfig, dim: int, small_patches: bool = False):
        super().__init__()
        self.tau_s, self.tau_t = cfg.tau_s, cfg.tau_t
        self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, dim), dim=1))  # (K, D)
        if small_patches:
            self.register_buffer("small_queue", F.normalize(torch.randn(cfg.queue_size, dim), dim=1))  # (K, D)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def forward(
        self, s: torch.Tensor, t: torch.Tensor, patches: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """s, t (B, D); patches: the patches' (s_p, t_p), each (B * P, D), image-major, or None."""
        s, t = F.normalize(at_least_fp32(s), dim=1), F.normalize(t, dim=1)
        loss = self.cross_entropy(s, t, self.queue)
        small_keys = None
        if patches is not None:
            s_p, t_p = F.normalize(at_least_fp32(patches[0]), dim=1), F.normalize(patches[1], dim=1)
            loss = loss + self.cross_entropy(s_p, t_p, self.small_queue)
            small_keys = t_p.view(len(t), -1, t_p.shape[1])[:, 0]  # (B, D): each image's first patch
        if self.training:
            self.enqueue(t, small_keys)
        return loss, (s.detach() * t).sum(1).mean()

    def cross_entropy(self, s: torch.Tensor, t: torch.Tensor, queue: torch.Tensor) -> torch.Tensor:
        """-mean_b sum_k softmax([t.t, t.Q] / tau_t) log_softmax([s.t, s.Q] / tau_s); s, t (N, D) normalized."""
        queue = queue.clone()  # autograd keeps Q for ds; the in-place enqueue after the loss must not change it
        logits_s = torch.cat([(s * t).sum(1, keepdim=True), s @ queue.T], dim=1) / self.tau_s  # (N, 1+K)
        logits_t = torch.cat([(t * t).sum(1, keepdim=True), t @ queue.T], dim=1) / self.tau_t  # (N, 1+K)
        return -(logits_t.softmax(1) * logits_s.log_softmax(1)).sum(1).mean()

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, small_keys: torch.Tensor | None = None) -> None:
        """Replace the oldest entries by every rank's teacher embeddings (ring buffer), and the small queue's at
        the same places by every rank's first-patch embeddings."""
        keys = all_gather(keys)[-self.queue.shape[0] :]  # (world*B, D), at most K of them
        idx = (self.ptr + torch.arange(keys.shape[0], device=keys.device)) % self.queue.shape[0]
        self.queue[idx] = keys
        if small_keys is not None:
            self.small_queue[idx] = all_gather(small_keys)[-self.queue.shape[0] :]
        self.ptr.copy_((self.ptr + keys.shape[0]) % self.queue.shape[0])


def build_loss(cfg: LossConfig, dim: int, device: torch.device, small_patches: bool = False) -> nn.Module:
    """SEEDLoss (with its second queue for small patches), or the eager or fused RegressionLoss as loss.impl and
    the device choose."""
    if cfg.name == "seed":
        return SEEDLoss(cfg, dim, small_patches)
    fused, why = False, "only simreg has a fused kernel"
    if cfg.name == "simreg":
        fused, why = use_triton("loss.impl", cfg.impl, device, lambda: _probe(device), lambda: loss_auto(device))
    log.info("loss %s: %s (%s)", cfg.name, impl_name(fused, device), why)
    return (FusedRegressionLoss if fused else RegressionLoss)(cfg, dim)


def _probe(device: torch.device) -> None:
    from fastreg.kernels import normalized_regression_loss

    normalized_regression_loss(torch.randn(2, 8, device=device), torch.randn(2, 8, device=device)).item()
