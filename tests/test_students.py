import pytest
import torch
from torchvision import models as tvm

from fastreg.students import STUDENTS, Student


@pytest.mark.parametrize("arch", sorted(STUDENTS))
def test_student_outputs_its_pooled_feature(arch):
    student = Student(arch).eval()
    with torch.no_grad():
        feat = student(torch.randn(2, 3, 64, 64))
    assert feat.shape == (2, student.dim)


@pytest.mark.parametrize("arch,classifier", [("resnet18", "fc"), ("mobilenet_v2", "classifier"),
                                             ("efficientnet_b0", "classifier")])
def test_classifier_removed_backbone_matches_torchvision(arch, classifier):
    student = Student(arch).eval()
    ref = getattr(tvm, arch)().eval()
    missing = ref.load_state_dict(student.backbone.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith(classifier + ".") for k in missing)
    setattr(ref, classifier, torch.nn.Identity())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(student(x), ref(x))


def test_unknown_student():
    with pytest.raises(ValueError, match="student.arch"):
        Student("resnet19")
