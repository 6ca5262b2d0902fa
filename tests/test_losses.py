"""Loss math against closed forms and hand-computed float64 references."""

import math

import pytest
import torch
import torch.nn.functional as F

from fastreg.config import LossConfig
from fastreg.losses import FusedRegressionLoss, RegressionLoss, SEEDLoss, loss_terms, normalized_regression


def test_normalized_regression_is_two_minus_two_cos():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(7, 13, generator=g, dtype=torch.float64), torch.randn(7, 13, generator=g, dtype=torch.float64)
    cos = (s * t).sum(1) / (s.norm(dim=1) * t.norm(dim=1))
    assert torch.allclose(normalized_regression(s, t), (2 - 2 * cos).mean())


def test_simreg_closed_form_values():
    s = torch.tensor([[1.0, 0.0], [3.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[0.0, 2.0], [5.0, 0.0]], dtype=torch.float64)  # orthogonal -> 2, parallel -> 0
    loss, cos = RegressionLoss(LossConfig(name="simreg"), 2)(s, t)
    assert loss.item() == pytest.approx(1.0)
    assert cos.item() == pytest.approx(0.5)


def test_mse_is_unnormalized():
    s = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    t = torch.tensor([[4.0, 6.0]], dtype=torch.float64)
    loss, _ = RegressionLoss(LossConfig(name="mse"), 2)(s, t)
    assert loss.item() == pytest.approx(9 + 16)


def test_centered_regression_uses_previous_center_then_updates():
    loss_fn = RegressionLoss(LossConfig(name="simreg", center_teacher=True, center_momentum=0.75), 3).double()
    loss_fn.center.center.copy_(torch.tensor([1.0, 1.0, 1.0]))
    s = torch.randn(4, 3, dtype=torch.float64)
    t = torch.randn(4, 3, dtype=torch.float64) + 1
    loss, _ = loss_fn(s, t)
    assert loss.item() == pytest.approx(normalized_regression(s, t - 1).item())
    expected = 0.75 * torch.ones(3, dtype=torch.float64) + 0.25 * t.mean(0)
    assert torch.allclose(loss_fn.center.center, expected)


def test_center_frozen_in_eval_mode():
    loss_fn = RegressionLoss(LossConfig(name="simreg", center_teacher=True), 3).eval()
    loss_fn(torch.randn(4, 3), torch.randn(4, 3))
    assert torch.equal(loss_fn.center.center, torch.zeros(3))


def seed_reference(s, t, queue, tau_s, tau_t):
    """SEED's loss written out with python loops and math.exp: 3 samples, 4 queue entries."""

    def unit(v):
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b))

    total = 0.0
    for sb, tb in zip(s, t):
        sb, tb = unit(sb), unit(tb)
        keys = [tb] + [unit(q) for q in queue]  # the teacher's own embedding first
        zt = [dot(tb, k) / tau_t for k in keys]
        zs = [dot(sb, k) / tau_s for k in keys]
        mt, ms = max(zt), max(zs)
        pt = [math.exp(z - mt) for z in zt]
        pt = [p / sum(pt) for p in pt]
        log_norm = ms + math.log(sum(math.exp(z - ms) for z in zs))
        total += -sum(p * (z - log_norm) for p, z in zip(pt, zs))
    return total / len(s)


@pytest.mark.parametrize("tau_t", [0.5, 1e-4])
def test_seed_loss_hand_computed_float64(tau_t):
    s = [[1.0, 2.0, 0.5], [-1.0, 0.3, 2.0], [0.2, -0.7, 1.1]]
    t = [[0.9, 1.5, 0.0], [-0.5, 0.5, 1.0], [1.0, -1.0, 0.3]]
    queue = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.3, 0.3, -1.0], [-1.0, 0.2, 0.4]]
    loss_fn = SEEDLoss(LossConfig(name="seed", queue_size=4, tau_s=0.2, tau_t=tau_t), 3).double().eval()
    loss_fn.queue.copy_(F.normalize(torch.tensor(queue, dtype=torch.float64), dim=1))
    loss, _ = loss_fn(torch.tensor(s, dtype=torch.float64), torch.tensor(t, dtype=torch.float64))
    assert loss.item() == pytest.approx(seed_reference(s, t, queue, 0.2, tau_t), rel=1e-12)


def test_seed_enqueues_teacher_after_the_loss_and_wraps():
    loss_fn = SEEDLoss(LossConfig(name="seed", queue_size=5), 3).double()
    old = loss_fn.queue.clone()
    s = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 3, dtype=torch.float64)
    loss, _ = loss_fn(s, t)
    loss_fn_ref = SEEDLoss(LossConfig(name="seed", queue_size=5), 3).double().eval()
    loss_fn_ref.queue.copy_(old)
    assert torch.equal(loss, loss_fn_ref(s, t)[0])  # the loss used the queue before the update
    loss.backward()  # the in-place enqueue did not break autograd
    assert s.grad is not None
    assert torch.allclose(loss_fn.queue[:3], F.normalize(t, dim=1)) and torch.equal(loss_fn.queue[3:], old[3:])
    t2 = torch.randn(3, 3, dtype=torch.float64)
    loss_fn(s.detach(), t2)  # ptr 3 -> rows 3, 4, 0
    assert torch.allclose(loss_fn.queue[[3, 4, 0]], F.normalize(t2, dim=1))
    assert loss_fn.ptr.item() == 1


def test_fused_simreg_loss_matches_eager_values_and_gradients():
    """impl=triton on CPU runs the fused op's PyTorch kernel (its Triton kernel: tests/interpret)."""
    cfg = LossConfig(name="simreg", center_teacher=True)
    fused, eager = FusedRegressionLoss(cfg, 16), RegressionLoss(cfg, 16)
    s, t = torch.randn(6, 16, requires_grad=True), torch.randn(6, 16)
    s2 = s.detach().clone().requires_grad_()
    (loss, cos), (ref, ref_cos) = fused(s, t), eager(s2, t)
    torch.testing.assert_close(cos, ref_cos)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(s.grad, s2.grad)
    torch.testing.assert_close(fused.center.center, eager.center.center)


def test_several_fused_teachers_are_one_call_with_each_teachers_loss(monkeypatch):
    """Two teachers of different widths, each with its own center: loss_terms sends both fused terms through one
    normalized_regression_losses call and gives what each eager loss gives alone (values, gradients, centers)."""
    import fastreg.kernels

    calls = []
    real = fastreg.kernels.normalized_regression_losses
    monkeypatch.setattr(
        fastreg.kernels, "normalized_regression_losses", lambda terms: calls.append(len(terms)) or real(terms)
    )
    cfg = LossConfig(name="simreg", center_teacher=True)
    fused, eager = (
        [FusedRegressionLoss(cfg, 16), FusedRegressionLoss(cfg, 24)],
        [RegressionLoss(cfg, d) for d in (16, 24)],
    )
    preds = [torch.randn(6, d, requires_grad=True) for d in (16, 24)]
    refs = [p.detach().clone().requires_grad_() for p in preds]
    targets = [torch.randn(6, d) + 1 for d in (16, 24)]
    got, want = loss_terms(fused, preds, targets), loss_terms(eager, refs, targets)
    assert calls == [2]
    sum(loss for loss, _ in got).backward()
    sum(loss for loss, _ in want).backward()
    for (loss, cos), (ref, ref_cos), p, r, f, e in zip(got, want, preds, refs, fused, eager):
        torch.testing.assert_close(loss, ref)
        torch.testing.assert_close(cos, ref_cos)
        torch.testing.assert_close(p.grad, r.grad)
        torch.testing.assert_close(f.center.center, e.center.center)
        assert f.center.center.abs().sum() > 0  # updated once, after the loss


def test_simreg_cosine_is_the_mean_cosine():
    """The metric 1 - loss / 2 is the mean cosine similarity (F.cosine_similarity) for nonzero rows."""
    s, t = torch.randn(7, 12, dtype=torch.float64), torch.randn(7, 12, dtype=torch.float64)
    _, cos = RegressionLoss(LossConfig(name="simreg"), 12)(s, t)
    torch.testing.assert_close(cos, F.cosine_similarity(s, t, dim=1).mean())


def test_loss_impl_choice():
    from fastreg.losses import build_loss

    cpu = torch.device("cpu")
    assert type(build_loss(LossConfig(), 8, cpu)) is RegressionLoss  # auto: eager on CPU
    assert type(build_loss(LossConfig(impl="triton"), 8, cpu)) is FusedRegressionLoss
    assert type(build_loss(LossConfig(name="mse", impl="auto"), 8, cpu)) is RegressionLoss
    with pytest.raises(ValueError, match="loss.impl=triton"):
        LossConfig(name="seed", impl="triton")


def test_seed_small_patches_add_a_term_over_the_second_queue_and_enqueue_each_images_first_patch():
    """main_small-patch.py: loss = CE(global, queue) + CE(patches, small_queue), each averaged over its rows;
    small_patch_builder.py enqueues t_small.view(B, P, D)[:, 0] at the main queue's pointer."""
    b, p, d, k = 3, 2, 3, 7
    cfg = LossConfig(name="seed", queue_size=k, tau_s=0.2, tau_t=0.5)
    loss_fn = SEEDLoss(cfg, d, small_patches=True).double()
    loss_fn.ptr.fill_(5)  # the enqueue wraps: rows 5, 6, 0
    g = torch.Generator().manual_seed(0)
    for buffer in (loss_fn.queue, loss_fn.small_queue):  # unit rows in float64, as the reference makes them
        buffer.copy_(F.normalize(torch.randn(k, d, generator=g, dtype=torch.float64), dim=1))
    queue, small_queue = loss_fn.queue.clone(), loss_fn.small_queue.clone()
    s, t = torch.randn(b, d, generator=g, dtype=torch.float64), torch.randn(b, d, generator=g, dtype=torch.float64)
    s_p, t_p = (torch.randn(b * p, d, generator=g, dtype=torch.float64) for _ in range(2))
    loss, _ = loss_fn(s, t, (s_p, t_p))
    expected = seed_reference(s.tolist(), t.tolist(), queue.tolist(), 0.2, 0.5) + seed_reference(
        s_p.tolist(), t_p.tolist(), small_queue.tolist(), 0.2, 0.5
    )
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    rows = [5, 6, 0]
    assert torch.allclose(loss_fn.queue[rows], F.normalize(t, dim=1))
    assert torch.allclose(loss_fn.small_queue[rows], F.normalize(t_p[::p], dim=1))  # patch 0 of images 0, 1, 2
    untouched = [1, 2, 3, 4]
    assert torch.equal(loss_fn.small_queue[untouched], small_queue[untouched]) and loss_fn.ptr.item() == 1
    assert "small_queue" in loss_fn.state_dict() and "small_queue" not in SEEDLoss(cfg, d).state_dict()
