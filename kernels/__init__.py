"""Triton kernels with plain-PyTorch references; torch and triton only, usable in any trainer.

    from fastreg.kernels import normalized_regression_loss, normalized_regression_losses
    loss = normalized_regression_loss(student_pred, teacher_feature)   # SimReg's loss, fused fwd + grad
    losses = normalized_regression_losses([(pred_a, feature_a, None), (pred_b, feature_b, weight_b)])  # 1 launch

    from fastreg.kernels import FusedMLPHead
    head = FusedMLPHead(*eager_head)   # an nn.Sequential's Linear/BatchNorm1d/ReLU modules, run as fused GEMMs
"""

from fastreg.kernels.mlp_head import FusedMLPHead
from fastreg.kernels.normalized_regression import (
    NormalizedRegressionLoss, normalized_regression_loss, normalized_regression_losses,
)

__all__ = ["FusedMLPHead", "NormalizedRegressionLoss", "normalized_regression_loss", "normalized_regression_losses"]
