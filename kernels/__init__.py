"""Triton kernels (fused MLP head, normalized-regression loss) with autograd Functions; torch and triton only."""
