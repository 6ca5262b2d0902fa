import pytest
import torch
import torch.nn.functional as F
from torchvision import models as tvm

from fastreg.students import STUDENTS, Student

# The feature width of each paper's network: SEED's MobileNet-v3-L ends Linear(960, 1280) + h-swish + Dropout,
# SEED's EfficientNet-B0 pools 1280 channels, SimReg's MobileNet-v2 pools 1280 (its last 1x1 conv)
DIMS = {
    "resnet18": 512,
    "resnet34": 512,
    "resnet50": 2048,
    "mobilenet_v2": 1280,
    "mobilenet_v3_large": 1280,
    "mobilenet_v3_large_seed": 1280,
    "efficientnet_b0": 1280,
    "efficientnet_b0_tf": 1280,
    "cnn_tiny": 64,
    "cnn_small": 128,
}


def test_every_student_has_its_papers_width():
    assert set(DIMS) == set(STUDENTS)


@pytest.mark.parametrize("arch", sorted(STUDENTS))
def test_student_outputs_its_feature(arch):
    student = Student(arch).eval()
    with torch.no_grad():
        feat = student(torch.randn(2, 3, 64, 64))
    assert student.dim == DIMS[arch] and feat.shape == (2, DIMS[arch])


def _torchvision_twin(student: Student) -> torch.nn.Module:
    """torchvision's model of the student's arch holding the student's weights (its final Linear stays random)."""
    ref = getattr(tvm, student.arch)()
    missing = ref.load_state_dict(student.backbone.state_dict(), strict=False).missing_keys
    final = STUDENTS[student.arch].final_linear
    assert sorted(missing) == [f"{final}.bias", f"{final}.weight"]
    return ref.eval()


def test_mobilenet_v3_feature_is_torchvisions_penultimate_output():
    """avgpool -> flatten -> Linear(960, 1280) -> h-swish, written out by hand; Dropout is the identity in eval."""
    student = Student("mobilenet_v3_large").eval()
    ref = _torchvision_twin(student)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pooled = ref.avgpool(ref.features(x)).flatten(1)  # (2, 960)
        h = F.linear(pooled, ref.classifier[0].weight, ref.classifier[0].bias)  # (2, 1280)
        expected = h * (h + 3).clamp(0, 6) / 6  # h-swish (SEED's h_swish: x * relu6(x + 3) / 6)
        torch.testing.assert_close(student(x), expected)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2", "efficientnet_b0"])
def test_pooled_students_match_torchvision_without_its_final_linear(arch):
    student = Student(arch).eval()
    ref = _torchvision_twin(student)
    ref.set_submodule(STUDENTS[arch].final_linear, torch.nn.Identity())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(student(x), ref(x))


# The module whose output SEED's Dropout(0.2) takes: h-swish after Linear(960, 1280); EfficientNet's pooling
DROPPED_FROM = {
    "mobilenet_v3_large": "classifier.1",
    "mobilenet_v3_large_seed": "classifier.1",
    "efficientnet_b0": "avgpool",
    "efficientnet_b0_tf": "global_pool",
}


def _feature_and_dropout_input(student: Student, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    seen = []
    # clone: torchvision's Dropout(inplace=True) overwrites the tensor the hook sees
    hook = student.backbone.get_submodule(DROPPED_FROM[student.arch]).register_forward_hook(
        lambda m, i, out: seen.append(out.detach().flatten(1).clone())
    )
    with torch.no_grad():
        feat = student(x)
    hook.remove()
    return feat, seen[0]


@pytest.mark.parametrize("arch", sorted(DROPPED_FROM))
def test_seed_students_drop_out_in_training_only(arch):
    """train(): feature = h * mask / 0.8 with about 20% of the mask zero, and two passes differ; eval(): feature = h."""
    torch.manual_seed(0)
    student, x = Student(arch), torch.randn(8, 3, 64, 64)
    feat, h = _feature_and_dropout_input(student.train(), x)
    kept = h != 0
    ratio = feat[kept] / h[kept]
    dropped = torch.isclose(ratio, torch.tensor(0.0))
    assert torch.allclose(ratio[~dropped], torch.tensor(1 / 0.8))
    assert 0.15 < dropped.float().mean().item() < 0.25  # ~10k entries: p=0.2 within a few standard deviations
    assert not torch.equal(student(x), student(x))

    feat, h = _feature_and_dropout_input(student.eval(), x)
    assert torch.equal(feat, h)
    with torch.no_grad():
        assert torch.equal(student(x), student(x))


def test_simreg_mobilenet_v2_has_no_dropout():
    """SimReg's MobileNet-v2 pools straight into its fc: training-mode passes agree (BN uses the batch's statistics)."""
    student = Student("mobilenet_v2").train()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(student(x), student(x))


def test_unknown_student():
    with pytest.raises(ValueError, match="student.arch"):
        Student("resnet19")
