"""fastreg.eval: k-NN against independent references, the linear probe, the feature cache and the CLI."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.neighbors import KNeighborsClassifier

from fastreg import eval as ev
from fastreg.pipelines.torchvision import eval_loader
from fastreg.students import Student


# ------------------------------------------------------------------------------------------ helpers



def _clusters(n_bank: int, n_query: int, num_classes: int, dim: int, spread: float, seed: int = 0):
    """L2-normalized points around random class centres: (bank, bank_labels, queries, query_labels)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=g)
    labels = torch.randint(num_classes, (n_bank + n_query,), generator=g)
    x = F.normalize(centres[labels] + spread * torch.randn(n_bank + n_query, dim, generator=g), dim=1)
    return x[:n_bank], labels[:n_bank], x[n_bank:], labels[n_bank:]


def _reference_knn(bank, bank_labels, queries, num_classes, k, t):
    """Weighted k-NN written out with python loops in float64, independent of fastreg.eval."""
    bank, queries = bank.double().numpy(), queries.double().numpy()
    preds = []
    for q in queries:
        sims = [float(np.dot(q, b)) for b in bank]
        nearest = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * num_classes
        for i in nearest:
            votes[int(bank_labels[i])] += math.exp(sims[i] / t)
        preds.append(max(range(num_classes), key=lambda c: votes[c]))
    return preds


def _image_folder(root, classes=("cat", "dog"), per_class=6, size=32):
    """A tiny ImageFolder of JPEGs: each class has its own colour, plus noise."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            base = np.zeros((size, size, 3)) + (60 + 120 * c)
            img = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i}.jpg", quality=95)
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    return _image_folder(base / "train"), _image_folder(base / "val", per_class=3)


def _trainer_checkpoint(path, arch, train_root, val_root, crop=32, seed=0):
    torch.manual_seed(seed)
    student = Student(arch)
    torch.save({
        "student": student.backbone.state_dict(), "heads": {}, "loss": {}, "optimizer": {}, "scaler": None,
        "epoch": 1, "step": 10, "rng": {}, "commit": "test",
        "config": {"student": {"arch": arch},
                   "data": {"root": str(train_root), "val_root": str(val_root), "knn_train_root": None, "crop_size": crop},
                   "eval": {"knn_k": 5, "knn_t": 0.07, "batch_size": 4, "workers": 0}},
    }, path)
    return student


# --------------------------------------------------------------------------------------------- k-NN


@pytest.mark.parametrize("k, t, chunk_size", [(1, 0.07, None), (5, 0.07, 7), (20, 0.07, 1), (20, 0.5, None)])
def test_knn_matches_brute_force_reference(k, t, chunk_size):
    bank, bank_labels, queries, query_labels = _clusters(200, 60, num_classes=5, dim=16, spread=1.2)
    preds, _ = ev.knn_predict(bank, bank_labels, queries, 5, k=k, t=t, chunk_size=chunk_size)
    assert preds.tolist() == _reference_knn(bank, bank_labels, queries, 5, k, t)
    acc = ev.knn_accuracy(bank, bank_labels, queries, query_labels, 5, k=k, t=t, chunk_size=chunk_size)
    assert acc["knn"] == pytest.approx(100.0 * (preds == query_labels).float().mean().item())
    assert 20 < acc["knn"] < 100  # the clusters overlap: a non-trivial case


def test_nn1_matches_sklearn():
    bank, bank_labels, queries, query_labels = _clusters(300, 100, num_classes=4, dim=8, spread=1.0, seed=1)
    sk = KNeighborsClassifier(n_neighbors=1, metric="cosine", algorithm="brute").fit(bank.numpy(), bank_labels.numpy())
    sk_preds = torch.from_numpy(sk.predict(queries.numpy()))
    acc = ev.knn_accuracy(bank, bank_labels, queries, query_labels, 4, k=20, t=0.07)
    assert acc["nn1"] == pytest.approx(100.0 * (sk_preds == query_labels).float().mean().item())
    assert ev.knn_predict(bank, bank_labels, queries, 4, k=1)[0].tolist() == sk_preds.tolist()
    assert ev.knn_predict(bank, bank_labels, queries, 4, k=20)[1].tolist() == sk_preds.tolist()


def test_similarity_weighting_overrules_majority():
    # One class-0 neighbour almost on the query (cos ~ 1) against two class-1 neighbours at cos 0.5.
    bank = F.normalize(torch.tensor([[1.0, 0.05], [0.5, 0.866], [0.5, -0.866], [-1.0, 0.0]]), dim=1)
    bank_labels = torch.tensor([0, 1, 1, 0])
    query = torch.tensor([[1.0, 0.0]])
    assert ev.knn_predict(bank, bank_labels, query, 2, k=3, t=0.07)[0].item() == 0  # exp(1/.07) >> 2 exp(.5/.07)
    assert ev.knn_predict(bank, bank_labels, query, 2, k=3, t=1e4)[0].item() == 1  # flat weights = majority vote


def test_tiny_temperature_stays_finite():
    bank, bank_labels, queries, _ = _clusters(100, 30, num_classes=3, dim=8, spread=1.0, seed=2)
    preds, nn1 = ev.knn_predict(bank, bank_labels, queries, 3, k=10, t=1e-3)  # exp(1/1e-3) overflows without the shift
    assert preds.tolist() == ev.knn_predict(bank, bank_labels, queries, 3, k=1)[0].tolist() == nn1.tolist()


# ------------------------------------------------------------------------------------- linear probe


def test_linear_probe_separates_separable_features():
    train, train_y, val, val_y = _clusters(600, 200, num_classes=4, dim=16, spread=0.3, seed=3)
    assert ev.linear_probe(train, train_y, val, val_y, 4, batch_size=64) >= 98.0


def test_probe_bn_has_no_affine_and_lr_drops_at_15_and_30():
    probe, optimizer, schedule = ev.make_probe(8, 3)
    bn = probe[1]
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine and bn.weight is None and bn.bias is None
    assert [type(m).__name__ for m in probe] == ["L2Norm", "BatchNorm1d", "Linear"]
    assert sum(p.numel() for p in probe.parameters()) == 8 * 3 + 3  # only the Linear trains
    group = optimizer.param_groups[0]
    assert (group["momentum"], group["weight_decay"]) == (0.9, 1e-4)
    lrs = []
    for _ in range(40):
        lrs.append(group["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[:15] == [0.01] * 15
    assert lrs[15:30] == pytest.approx([1e-3] * 15) and lrs[30:] == pytest.approx([1e-4] * 10)


def test_linear_probe_steps_the_schedule_once_per_epoch(monkeypatch):
    seen, make_probe = [], ev.make_probe  # lr at every optimizer step

    def recording_probe(*args, **kwargs):
        probe, optimizer, schedule = make_probe(*args, **kwargs)
        optimizer.register_step_pre_hook(lambda opt, *_: seen.append(opt.param_groups[0]["lr"]))
        return probe, optimizer, schedule

    monkeypatch.setattr(ev, "make_probe", recording_probe)
    train, train_y, val, val_y = _clusters(40, 10, num_classes=2, dim=4, spread=0.5)
    ev.linear_probe(train, train_y, val, val_y, 2, batch_size=16)  # 3 steps per epoch, 40 epochs
    assert len(seen) == 120
    assert seen[:45] == [0.01] * 45 and seen[45:90] == pytest.approx([1e-3] * 45) and seen[90:] == pytest.approx([1e-4] * 30)


# ----------------------------------------------------------------------------------- features, cache


def test_extract_features_are_normalized_and_mode_is_restored(folders):
    model = Student("cnn_tiny").backbone.train()
    loader = eval_loader(str(folders[0]), 32, 5, 0)
    feats, labels = ev.extract_features(model, loader, "cpu")
    assert feats.shape == (12, 64) and feats.dtype == torch.float32
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(12))
    assert labels.tolist() == [0] * 6 + [1] * 6 and model.training


def test_feature_cache_reuses_and_invalidates(folders, tmp_path):
    train_root = str(folders[0])
    model = Student("cnn_tiny").backbone
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))

    def get():
        return ev.cached_features(model, train_root, 32, tmp_path, "ckpt.pt", 4, 0, "cpu")

    first = get()
    assert not first["cached"] and len(calls) == 3 and first["classes"] == ["cat", "dog"]
    second = get()
    assert second["cached"] and len(calls) == 3  # the model did not run again
    torch.testing.assert_close(second["feats"], first["feats"])

    with torch.no_grad():  # the checkpoint changed: new weights
        model.features[0].weight.mul_(-1.5)
    third = get()
    assert not third["cached"] and len(calls) == 6
    assert not torch.allclose(third["feats"], first["feats"])
    assert len(list(tmp_path.glob("*.pt"))) == 1  # the stale file of this slot was replaced

    other = ev.cached_features(model, str(folders[1]), 32, tmp_path, "ckpt.pt", 4, 0, "cpu")  # another split
    assert not other["cached"] and len(list(tmp_path.glob("*.pt"))) == 2


def test_feature_cache_sees_new_images(tmp_path):
    root = _image_folder(tmp_path / "data", per_class=2)
    model = Student("cnn_tiny").backbone
    assert len(ev.cached_features(model, str(root), 32, tmp_path / "c", "t", 8, 0, "cpu")["labels"]) == 4
    Image.new("RGB", (32, 32)).save(root / "dog" / "new.jpg")
    again = ev.cached_features(model, str(root), 32, tmp_path / "c", "t", 8, 0, "cpu")
    assert not again["cached"] and len(again["labels"]) == 5


def test_knn_eval_on_an_image_folder(folders):
    result = ev.knn_eval(Student("cnn_tiny").backbone, str(folders[0]), str(folders[1]), 32, 4, 0, "cpu", k=5, t=0.07)
    assert set(result) == {"knn", "nn1"} and all(0 <= v <= 100 for v in result.values())


# ---------------------------------------------------------------------------------------------- CLI


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "fastreg.eval", *map(str, args)], capture_output=True, text=True, timeout=300)


def test_cli_on_a_trainer_checkpoint(folders, tmp_path, capsys):
    _trainer_checkpoint(tmp_path / "ckpt.pt", "cnn_tiny", *folders)
    run = _cli(tmp_path / "ckpt.pt", "--linear", "--linear-epochs", "3", "--cache-dir", tmp_path / "cache", "--device", "cpu")
    assert run.returncode == 0, run.stderr
    for row in ("k-NN (k=5, t=0.07)", "1-NN", "linear probe (3 epochs)", "bank:     12 images", "extracted and cached"):
        assert row in run.stdout

    ev.main([str(tmp_path / "ckpt.pt"), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"])  # again, in process
    assert "read from the cache" in capsys.readouterr().out


def test_cli_on_an_exported_resnet18(folders, tmp_path, capsys):
    torch.save(Student("resnet18").backbone.state_dict(), tmp_path / "r18.pt")
    ev.main([str(tmp_path / "r18.pt"), "--arch", "resnet18", "--train-root", str(folders[0]), "--val-root", str(folders[1]),
             "--crop-size", "32", "--workers", "0", "--k", "3", "--cache-dir", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    assert "r18.pt (resnet18, crop 32)" in out and "k-NN (k=3, t=0.07)" in out and "1-NN" in out


def _cli_error(*args) -> str:
    with pytest.raises(SystemExit) as exit_:
        ev.main([str(a) for a in args])
    return str(exit_.value)


def test_cli_errors(folders, tmp_path):
    roots = ["--train-root", folders[0], "--val-root", folders[1]]
    assert "does not exist" in _cli_error(tmp_path / "nope.pt")

    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert "is not a torch checkpoint" in _cli_error(tmp_path / "notes.txt")
    torch.save({"epoch": 3, "model": "x"}, tmp_path / "other.pt")
    assert "neither a trainer checkpoint (no 'student' entry) nor a state_dict" in _cli_error(tmp_path / "other.pt")

    sd = Student("resnet18").backbone.state_dict()
    torch.save(sd, tmp_path / "r18.pt")
    assert "pass --arch" in _cli_error(tmp_path / "r18.pt")
    assert "no --train-root" in _cli_error(tmp_path / "r18.pt", "--arch", "resnet18")
    message = _cli_error(tmp_path / "r18.pt", "--arch", "cnn_tiny", *roots)
    assert "do not fit cnn_tiny: missing keys [features.0.weight" in message and "unexpected keys [conv1.weight" in message

    del sd["layer4.1.bn2.running_mean"]
    torch.save(sd, tmp_path / "partial.pt")
    assert "missing keys [layer4.1.bn2.running_mean]" in _cli_error(tmp_path / "partial.pt", "--arch", "resnet18", *roots)
