"""Triton kernels with plain-PyTorch references; torch and triton only, usable in any trainer.

Each op comes three ways, as in Liger-Kernel: a function, a thin nn.Module, and registered ops (torch.library
triton_op) that torch.compile and CUDA graphs capture. CPU tensors run the same formulas in PyTorch.

    from fastreg.kernels import normalized_regression_loss, normalized_regression_losses
    loss = normalized_regression_loss(student_pred, teacher_feature)   # SimReg's loss, fused fwd + grad
    losses = normalized_regression_losses([(pred_a, feature_a, None), (pred_b, feature_b, weight_b)])  # 1 launch

    from fastreg.kernels import FusedMLPHead, fused_mlp_head
    head = FusedMLPHead(*eager_head)   # an nn.Sequential's Linear/BatchNorm1d/ReLU modules, run as fused GEMMs
"""

from fastreg.kernels.mlp_head import BatchNorm, FusedMLPHead, fused_mlp_head
from fastreg.kernels.normalized_regression import (
    NormalizedRegressionLoss,
    normalized_regression_loss,
    normalized_regression_losses,
)

__all__ = [
    "BatchNorm",
    "FusedMLPHead",
    "NormalizedRegressionLoss",
    "fused_mlp_head",
    "normalized_regression_loss",
    "normalized_regression_losses",
]
