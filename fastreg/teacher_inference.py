"""A frozen conv teacher as inference code: BatchNorm folded into the convolution before it, weights stored once
in the compute dtype.

A frozen network's eval-mode BatchNorm is an affine map per channel, y = (x - mean) / sqrt(var + eps) * gamma + beta,
so after a convolution z = W * x + b it folds into the convolution exactly:

    W' = W s,   b' = (b - mean) s + beta,   s = gamma / sqrt(var + eps)      (per output channel)

computed in float64 and then cast. The BatchNorm becomes an Identity in place, so the network's own forward runs
unchanged (residual adds, ReLUs, pooling), one kernel fewer per BatchNorm. With a compute dtype (training's
autocast dtype) the folded backbone is stored in it and run without autocast: no per-step weight casts.

The pairs are found by tracing the forward (torch.fx): a BatchNorm2d whose input is a Conv2d's output and nothing
else reads that output. Conv nets only; vision transformers have LayerNorm (no running statistics to fold) and
keep fp32 LayerNorm and softmax under autocast, so they stay as they are.
"""

from __future__ import annotations

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights


class _ConvLeaves(fx.Tracer):
    """Convs, BatchNorms and pools are leaves, subclasses included (BYOL's TF-SAME padded ones compute their
    padding from the input's size, which a symbolic trace cannot)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d)) or super().is_leaf_module(m, qualname)


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv name, batch-norm name) for every BatchNorm2d that reads only a Conv2d's output, in forward order."""
    modules = dict(model.named_modules())
    pairs = []
    for node in _ConvLeaves().trace(model).nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        source = node.args[0]
        if (
            isinstance(source, fx.Node)
            and source.op == "call_module"
            and isinstance(modules[source.target], nn.Conv2d)
            and len(source.users) == 1
        ):
            pairs.append((source.target, node.target))
    return pairs


@torch.no_grad()
def fold_batch_norms(model: nn.Module) -> int:
    """Fold every BatchNorm2d that follows a Conv2d into it, in place (the BatchNorm becomes an Identity); returns
    how many. The model must be in eval mode: folding uses the running statistics."""
    if model.training:
        raise ValueError("fold_batch_norms folds running statistics: call model.eval() first")
    pairs = conv_bn_pairs(model)
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        weight, bias = fuse_conv_bn_weights(
            conv.weight.double(),
            conv.bias.double() if conv.bias is not None else None,
            bn.running_mean.double(),
            bn.running_var.double(),
            bn.eps,
            bn.weight.double() if bn.weight is not None else None,
            bn.bias.double() if bn.bias is not None else None,
        )
        conv.weight = nn.Parameter(weight.to(conv.weight.dtype), requires_grad=False)
        conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
        model.set_submodule(bn_name, nn.Identity())
    return len(pairs)
