"""Triton kernels with plain-PyTorch references; torch and triton only, usable in any trainer.

    from fastreg.kernels import normalized_regression_loss
    loss = normalized_regression_loss(student_pred, teacher_feature)   # SimReg's loss, fused fwd + grad
"""

from fastreg.kernels.normalized_regression import NormalizedRegressionLoss, normalized_regression_loss

__all__ = ["NormalizedRegressionLoss", "normalized_regression_loss"]
