"""fastreg.kernels dropped into other people's trainers, on CPU: timm's own FeatureDistillationTask with SimReg's
loss in place of its MSE, and a plain loop under torch.compile(fullgraph=True). Each gives the gradients (or the
trained weights) of the eager formula, and a wrong loss in the same harness does not, so the comparison can fail.
Also: the CPU path is said once at INFO, and a second backward gets fastreg's own message."""

from __future__ import annotations

import logging

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.task import FeatureDistillationTask
from torch import nn

from fastreg.kernels import NormalizedRegressionLoss, normalized_regression_loss


def simreg_formula(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SimReg's loss as the paper writes it: mean_b || p_b/|p_b| - t_b/|t_b| ||^2."""
    return (F.normalize(pred, dim=1) - F.normalize(target, dim=1)).pow(2).sum(1).mean()


def wrong_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """timm's own criterion, the MSE of the raw features: what the comparison must tell apart."""
    return F.mse_loss(pred, target)


class SimRegFeatureDistillation(FeatureDistillationTask):
    """timm's feature distillation with one criterion changed: `distill_loss(student feature, teacher feature)`
    where timm calls F.mse_loss. Teacher, projection, input normalization and loss weights stay timm's."""

    def __init__(self, *args, distill_loss: nn.Module, **kwargs):
        super().__init__(*args, **kwargs)
        self.distill_loss = distill_loss

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        student_logits, student_features = self.trainable_module(input)
        task_loss = self.criterion(student_logits, target)
        with torch.no_grad():
            input_kd = self.teacher.normalize_input(input, self.student_mean, self.student_std)
            teacher_features = self.teacher(input_kd, return_features=True)
        kd_loss = self.distill_loss(student_features, teacher_features)
        loss = self.task_loss_weight * task_loss + self.distill_loss_weight * kd_loss
        return {"loss": loss, "output": student_logits, "task_loss": task_loss, "kd_loss": kd_loss}


class Formula(nn.Module):
    def __init__(self, loss):
        super().__init__()
        self.loss = loss

    def forward(self, pred, target):
        return self.loss(pred, target)


def timm_task_gradients(distill_loss: nn.Module) -> dict[str, torch.Tensor]:
    """One step of timm's task (a test_resnet student, a test_convnext teacher: 256 -> 24 features, so timm adds
    its projection): the gradient of every trainable parameter."""
    torch.manual_seed(0)
    student = timm.create_model("test_resnet", num_classes=10)
    teacher = timm.create_model("test_convnext", num_classes=10)
    task = SimRegFeatureDistillation(
        student,
        teacher,
        criterion=nn.CrossEntropyLoss(),
        distill_loss=distill_loss,
        distill_loss_weight=5.0,
        verbose=False,
    )
    task.train()
    images, labels = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(1)), torch.arange(6)
    task(images, labels)["loss"].backward()
    return {name: p.grad.clone() for name, p in task.trainable_module.named_parameters() if p.grad is not None}


def test_the_fused_loss_in_timms_feature_distillation_task_gives_the_formulas_gradients():
    fused = timm_task_gradients(NormalizedRegressionLoss())
    formula = timm_task_gradients(Formula(simreg_formula))
    wrong = timm_task_gradients(Formula(wrong_loss))
    assert fused.keys() == formula.keys() and "projection.weight" in fused
    for name in formula:
        torch.testing.assert_close(fused[name], formula[name], rtol=1e-4, atol=1e-6, msg=name)
    assert not torch.allclose(wrong["projection.weight"], formula["projection.weight"], rtol=1e-2, atol=1e-4)


def trained_weights(loss_fn, compiled: bool, steps: int = 3) -> list[torch.Tensor]:
    """A plain loop, the README's drop-in: student and head under SGD, a frozen teacher, `steps` steps, the
    forward (teacher, student, head, loss) compiled whole (fullgraph=True: a graph break is an error) or eager."""
    torch.manual_seed(0)
    teacher = nn.Linear(32, 16).requires_grad_(False)
    student = nn.Sequential(nn.Linear(32, 64), nn.ReLU())
    head = nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 16))
    optimizer = torch.optim.SGD([*student.parameters(), *head.parameters()], lr=0.5)

    def forward(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = teacher(images)  # (B, 16)
        return loss_fn(head(student(images)), target)

    run = torch.compile(forward, fullgraph=True) if compiled else forward  # compile traces forward and backward
    for i in range(steps):
        run(torch.randn(8, 32, generator=torch.Generator().manual_seed(i))).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in [*student.parameters(), *head.parameters()]]


def test_the_fused_loss_under_torch_compile_fullgraph_trains_as_the_formula():
    torch._dynamo.reset()
    fused = trained_weights(normalized_regression_loss, compiled=True)
    formula = trained_weights(simreg_formula, compiled=False)
    wrong = trained_weights(wrong_loss, compiled=True)
    for a, b in zip(fused, formula):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not all(torch.allclose(a, b, rtol=1e-2, atol=1e-4) for a, b in zip(wrong, formula))


def test_the_cpu_path_is_said_once_at_info(caplog):
    """Without it a drop-in on a CPU ran the PyTorch formulas with no sign that no kernel ran."""
    from fastreg.kernels import paths

    paths._say.cache_clear()
    pred, target = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8)
    with caplog.at_level(logging.INFO, logger="fastreg.kernels"):
        for _ in range(3):
            normalized_regression_loss(pred, target).backward()
    said = [r.getMessage() for r in caplog.records if r.name == "fastreg.kernels"]
    assert said == [
        "fastreg.kernels: normalized_regression_loss on cpu tensors runs its PyTorch formulas (Triton kernels "
        "build for GPUs only)"
    ]


def test_a_second_backward_gets_fastregs_message():
    """backward scales the saved gradient in place; a second backward(retain_graph=True) got torch's generic
    "modified by an inplace operation" error, which does not say what to do."""
    pred, target = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8)
    loss = normalized_regression_loss(pred, target)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=r"one backward per forward and term \(term 0 again\): compute the loss"):
        loss.backward()
