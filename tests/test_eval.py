"""fastreg.eval: k-NN against independent references, the linear protocols, the feature cache and the CLI."""

from __future__ import annotations

import dataclasses
import logging
import math
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import make_image_folder, tiny_overrides
from PIL import Image
from sklearn.neighbors import KNeighborsClassifier

import fastreg.eval.linear
from fastreg import eval as ev
from fastreg.pipelines import Batch
from fastreg.pipelines.pil_folder import eval_loader
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


def _reference_majority(bank, bank_labels, queries, num_classes, k, seed):
    """SimReg's vote written out with python loops in float64: the k nearest by L2 distance, a Counter of their
    labels; among the classes with the most votes the one whose tie key (ev.tie_order, the documented random
    draw) is largest. Also returns which queries had a tie."""
    bank, queries = bank.double().numpy(), queries.double().numpy()
    preds, tied = [], []
    for i, q in enumerate(queries):
        dists = [float(np.sum((q - b) ** 2)) for b in bank]
        nearest = sorted(range(len(dists)), key=lambda j: dists[j])[:k]
        votes = Counter(int(bank_labels[j]) for j in nearest)
        top = max(votes.values())
        leaders = [c for c, n in votes.items() if n == top]
        keys = ev.tie_order(i, num_classes, seed).tolist()
        preds.append(max(leaders, key=lambda c: keys[c]))
        tied.append(len(leaders) > 1)
    return preds, tied


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
    torch.save(
        {
            "student": student.backbone.state_dict(),
            "heads": {},
            "loss": {},
            "optimizer": {},
            "scaler": None,
            "epoch": 1,
            "step": 10,
            "rng": {},
            "commit": "test",
            "config": {
                "student": {"arch": arch},
                "data": {"root": str(train_root), "val_root": str(val_root), "knn_train_root": None, "crop_size": crop},
                "eval": {"knn_k": 5, "knn_t": 0.07, "batch_size": 4, "workers": 0},
            },
        },
        path,
    )
    return student


# --------------------------------------------------------------------------------------------- k-NN


@pytest.mark.parametrize("k, t, chunk_size", [(1, 0.07, None), (5, 0.07, 7), (20, 0.07, 1), (20, 0.5, None)])
def test_knn_matches_brute_force_reference(k, t, chunk_size):
    bank, bank_labels, queries, query_labels = _clusters(200, 60, num_classes=5, dim=16, spread=1.2)
    preds = ev.knn_predict(bank, bank_labels, queries, 5, k=k, t=t, chunk_size=chunk_size)["weighted"]
    assert preds.tolist() == _reference_knn(bank, bank_labels, queries, 5, k, t)
    acc = ev.knn_accuracy(bank, bank_labels, queries, query_labels, 5, k=k, t=t, chunk_size=chunk_size)
    assert acc[f"knn{k}_weighted"] == pytest.approx(100.0 * (preds == query_labels).float().mean().item())
    assert 20 < acc[f"knn{k}_weighted"] < 100  # the clusters overlap: a non-trivial case


def test_nn1_matches_sklearn():
    bank, bank_labels, queries, query_labels = _clusters(300, 100, num_classes=4, dim=8, spread=1.0, seed=1)
    sk = KNeighborsClassifier(n_neighbors=1, metric="cosine", algorithm="brute").fit(bank.numpy(), bank_labels.numpy())
    sk_preds = torch.from_numpy(sk.predict(queries.numpy()))
    acc = ev.knn_accuracy(bank, bank_labels, queries, query_labels, 4, k=20, t=0.07)
    assert acc["nn1"] == pytest.approx(100.0 * (sk_preds == query_labels).float().mean().item())
    at_1 = ev.knn_predict(bank, bank_labels, queries, 4, k=1)
    assert at_1["weighted"].tolist() == at_1["majority"].tolist() == sk_preds.tolist()
    assert ev.knn_predict(bank, bank_labels, queries, 4, k=20)["nn1"].tolist() == sk_preds.tolist()


def test_similarity_weighting_overrules_majority():
    # One class-0 neighbour almost on the query (cos ~ 1) against two class-1 neighbours at cos 0.5.
    bank = F.normalize(torch.tensor([[1.0, 0.05], [0.5, 0.866], [0.5, -0.866], [-1.0, 0.0]]), dim=1)
    bank_labels = torch.tensor([0, 1, 1, 0])
    query = torch.tensor([[1.0, 0.0]])
    preds = ev.knn_predict(bank, bank_labels, query, 2, k=3, t=0.07)
    assert preds["weighted"].item() == 0  # exp(1/.07) >> 2 exp(.5/.07)
    assert preds["majority"].item() == 1  # two votes against one
    assert ev.knn_predict(bank, bank_labels, query, 2, k=3, t=1e4)["weighted"].item() == 1  # flat weights = majority


def test_tiny_temperature_stays_finite():
    bank, bank_labels, queries, _ = _clusters(100, 30, num_classes=3, dim=8, spread=1.0, seed=2)
    preds = ev.knn_predict(bank, bank_labels, queries, 3, k=10, t=1e-3)  # exp(1/1e-3) overflows without the shift
    assert preds["weighted"].tolist() == preds["nn1"].tolist()


@pytest.mark.parametrize("k, chunk_size, seed", [(4, None, 0), (6, 7, 0), (20, 1, 3), (2, 5, 1)])
def test_majority_matches_brute_force_count_with_the_tie_rule(k, chunk_size, seed):
    bank, bank_labels, queries, query_labels = _clusters(120, 80, num_classes=6, dim=4, spread=2.0, seed=seed)
    expected, tied = _reference_majority(bank, bank_labels, queries, 6, k, seed)
    assert sum(tied) >= 5  # the case under test: ties at the top of the vote
    preds = ev.knn_predict(bank, bank_labels, queries, 6, k=k, chunk_size=chunk_size, seed=seed)["majority"]
    assert preds.tolist() == expected
    acc = ev.knn_accuracy(bank, bank_labels, queries, query_labels, 6, k=k, chunk_size=chunk_size, seed=seed)
    assert acc[f"knn{k}_majority"] == pytest.approx(100.0 * np.mean(np.array(expected) == query_labels.numpy()))


def test_majority_ties_go_to_a_tied_class_both_ways_and_ignore_chunking():
    # Every query sits on e1 (400 copies, which differ only in their index and so in their tie keys). Its 5
    # nearest: 2 of class 1 and 2 of class 3 (cos 0.99 and 0.98), 1 of class 0 (cos 0.97); classes 2 and 4 are
    # far away. So 1 and 3 tie, and class 0's single vote must never win.
    def at(cos, sign=1.0):
        return [cos, sign * math.sqrt(1 - cos**2), 0.0]

    bank = torch.tensor([at(0.99), at(0.99, -1), at(0.98), at(0.98, -1), at(0.97), [-1.0, 0, 0], [0, 0, -1.0]])
    bank_labels = torch.tensor([1, 3, 3, 1, 0, 2, 4])
    queries = torch.tensor([[1.0, 0, 0]]).repeat(400, 1)
    preds = ev.knn_predict(bank, bank_labels, queries, 5, k=5)["majority"]
    assert set(preds.tolist()) == {1, 3}
    assert 0.4 < (preds == 1).float().mean().item() < 0.6  # a fair draw: 400 queries, sd 0.025
    for chunk_size in (1, 7, 400):
        assert torch.equal(ev.knn_predict(bank, bank_labels, queries, 5, k=5, chunk_size=chunk_size)["majority"], preds)
    again = ev.knn_predict(bank, bank_labels, queries, 5, k=5, seed=1)["majority"]
    assert set(again.tolist()) == {1, 3} and not torch.equal(again, preds)  # the seed draws the ties


def test_tie_order_is_a_permutation_fixed_by_seed_and_query():
    order = ev.tie_order(7, 10, seed=0)
    assert sorted(order.tolist()) == list(range(10))
    assert torch.equal(order, ev.tie_order(7, 10, seed=0))
    assert not torch.equal(order, ev.tie_order(8, 10, seed=0)) and not torch.equal(order, ev.tie_order(7, 10, seed=1))


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

    monkeypatch.setattr(fastreg.eval.linear, "make_probe", recording_probe)  # where linear_probe looks it up
    train, train_y, val, val_y = _clusters(40, 10, num_classes=2, dim=4, spread=0.5)
    ev.linear_probe(train, train_y, val, val_y, 2, batch_size=16)  # 3 steps per epoch, 40 epochs
    assert len(seen) == 120
    assert (
        seen[:45] == [0.01] * 45
        and seen[45:90] == pytest.approx([1e-3] * 45)
        and seen[90:] == pytest.approx([1e-4] * 30)
    )


@pytest.mark.parametrize(
    "batch, expected",
    [
        # epoch: lr, worked out by hand from main_lincls.py adjust_learning_rate (lr 30, warmup 5, steps 60/80)
        (256, {0: 30, 1: 30, 4: 30, 5: 30, 59: 30, 60: 3, 79: 3, 80: 0.3, 99: 0.3}),
        (512, {0: 30, 1: 36, 2: 42, 4: 54, 5: 60, 59: 60, 60: 6, 79: 6, 80: 0.6, 99: 0.6}),
        (128, {0: 30, 1: 27, 3: 21, 4: 18, 5: 15, 59: 15, 60: 1.5, 80: 0.15}),
        (1024, {0: 30, 1: 48, 4: 102, 5: 120, 60: 12, 80: 1.2}),
    ],
)
def test_moco_lr_schedule_in_closed_form(batch, expected):
    recipe = dataclasses.replace(ev.RECIPES["moco"], batch_size=batch)
    assert {e: recipe.lr_at(e) for e in expected} == pytest.approx(expected)
    assert (recipe.epochs, recipe.momentum, recipe.weight_decay) == (100, 0.9, 0.0)


def test_simreg_recipe_and_schedule_steps_at_15_and_30():
    recipe = ev.RECIPES["simreg"]
    assert (recipe.epochs, recipe.batch_size, recipe.momentum, recipe.weight_decay) == (40, 256, 0.9, 1e-4)
    lrs = [recipe.lr_at(e) for e in range(40)]
    assert (
        lrs[:15] == [0.01] * 15 and lrs[15:30] == pytest.approx([1e-3] * 15) and lrs[30:] == pytest.approx([1e-4] * 10)
    )
    assert dataclasses.replace(recipe, batch_size=512).lr_at(0) == 0.01  # SimReg does not scale lr by batch


def test_simreg_head_standardizes_by_the_fixed_train_statistics():
    g = torch.Generator().manual_seed(0)
    train = 3 * torch.randn(50, 4, generator=g) + torch.tensor([5.0, -1, 0, 2])  # raw features, not normalized
    head = ev.simreg_head(train, num_classes=3)
    assert [type(m).__name__ for m in head] == ["L2Norm", "FullBatchNorm", "Linear"]
    assert sum(p.numel() for p in head.parameters()) == 4 * 3 + 3  # only the Linear trains

    # by hand, float64: z = x / |x|, mean_j = sum_i z_ij / N, var_j = sum_i (z_ij - mean_j)^2 / (N - 1)
    z = [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in train.double().tolist()]
    mean = [sum(row[j] for row in z) / 50 for j in range(4)]
    var = [sum((row[j] - mean[j]) ** 2 for row in z) / 49 for j in range(4)]
    batch = torch.randn(6, 4, generator=g)  # another batch: its own statistics must not matter
    zb = F.normalize(batch.double(), dim=1)
    expected = (zb - torch.tensor(mean)) / torch.sqrt(torch.tensor(var) + 1e-5)
    for mode in (True, False):
        torch.testing.assert_close(head[:2].train(mode)(batch).double(), expected, rtol=1e-5, atol=1e-5)


def test_moco_head_is_a_plain_linear_with_small_normal_init():
    head = ev.moco_head(512, 100, seed=1)
    assert isinstance(head, torch.nn.Linear) and torch.all(head.bias == 0)
    assert head.weight.std().item() == pytest.approx(0.01, rel=0.05) and abs(head.weight.mean().item()) < 1e-3


class _Views:
    """A stand-in for the training loader: 3 batches of 4 random images per epoch, 2 classes."""

    def __init__(self):
        self.epochs = []

    def epoch(self, e):
        self.epochs.append(e)
        g = torch.Generator().manual_seed(e)
        for _ in range(3):
            yield Batch(torch.randn(4, 3, 16, 16, generator=g), torch.randint(2, (4,), generator=g), torch.arange(4))


@pytest.mark.parametrize("name", ["simreg", "moco"])
def test_train_on_views_sets_the_lr_per_epoch_and_keeps_the_backbone_frozen(name):
    backbone = Student("cnn_tiny").backbone.train()
    frozen = {k: v.clone() for k, v in backbone.state_dict().items()}
    train_feats = torch.randn(20, 64)
    head = ev.simreg_head(train_feats, 2) if name == "simreg" else ev.moco_head(64, 2)
    stats = {k: v.clone() for k, v in head.state_dict().items() if k.startswith("1.")}  # simreg: FullBatchNorm
    modes, lrs = [], []
    backbone.register_forward_hook(lambda m, *_: modes.append(m.training))
    recipe = dataclasses.replace(ev.RECIPES[name], epochs=8, milestones=(2, 6), batch_size=512)
    optimizer_step = torch.optim.SGD.step

    def recording_step(self, *args, **kwargs):
        lrs.append(self.param_groups[0]["lr"])
        return optimizer_step(self, *args, **kwargs)

    views = _Views()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.SGD, "step", recording_step)
        before = [p.clone() for p in head.parameters()]
        ev.train_on_views(backbone, head, recipe, views, torch.device("cpu"))
    assert views.epochs == list(range(8)) and modes == [False] * 24 and backbone.training
    assert lrs == pytest.approx([recipe.lr_at(e) for e in range(8) for _ in range(3)])
    assert all(torch.equal(v, backbone.state_dict()[k]) for k, v in frozen.items())  # BN running stats too
    assert all(torch.equal(v, head.state_dict()[k]) for k, v in stats.items())  # FullBatchNorm's fixed stats
    assert not any(torch.equal(a, b) for a, b in zip(before, head.parameters()))  # the Linear trained


def test_augmented_views_draw_fresh_labelled_crops_each_epoch(folders):
    views = ev.augmented_views(
        str(folders[0]), 32, 5, 1, "auto", torch.device("cpu"), seed=0, channels_last=True, half=False
    )
    epochs = [[(b.images.clone(), b.labels.clone()) for b in views.epoch(e)] for e in range(2)]
    assert [len(e) for e in epochs] == [2, 2]  # 12 images at batch 5: the partial batch is dropped
    x, y = epochs[0][0]
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.float32 and set(y.tolist()) <= {0, 1}
    a, b = (torch.cat([x for x, _ in e]) for e in epochs)
    assert not torch.allclose(a, b)  # other crops (and order) in epoch 1


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


def test_feature_cache_sees_images_replaced_in_place(tmp_path):
    """The cache was keyed by the folders' mtimes, which files rewritten under their names leave as they were: the
    features of the old pixels came back. It is keyed by the index's content digest, over every file's bytes."""
    root = _image_folder(tmp_path / "data", per_class=2)
    model = Student("cnn_tiny").backbone
    first = ev.cached_features(model, str(root), 32, tmp_path / "c", "t", 8, 0, "cpu")
    folders = {p: p.stat().st_mtime_ns for p in (root, root / "cat", root / "dog")}
    for i in range(2):  # the cats' pixels under the dogs' names
        (root / "dog" / f"{i}.jpg").write_bytes((root / "cat" / f"{i}.jpg").read_bytes())
    assert {p: p.stat().st_mtime_ns for p in folders} == folders
    again = ev.cached_features(model, str(root), 32, tmp_path / "c", "t", 8, 0, "cpu")
    assert not again["cached"] and again["labels"].tolist() == [0, 0, 1, 1]
    torch.testing.assert_close(again["feats"][2:], first["feats"][:2])


def test_feature_cache_of_a_missing_folder_names_its_argument(tmp_path):
    model = Student("cnn_tiny").backbone
    with pytest.raises(FileNotFoundError, match=f"^dataset root {tmp_path / 'nope'} does not exist .*--val-root"):
        ev.cached_features(model, str(tmp_path / "nope"), 32, tmp_path / "c", "t", 8, 0, "cpu", key="--val-root")


def test_a_damaged_cache_file_is_an_error_that_says_to_delete_it(folders, tmp_path):
    model = Student("cnn_tiny").backbone
    ev.cached_features(model, str(folders[0]), 32, tmp_path, "ckpt.pt", 4, 0, "cpu")
    [cached] = tmp_path.glob("*.pt")
    cached.write_bytes(cached.read_bytes()[:100])  # cut short
    with pytest.raises(ValueError, match=f"cached features {cached} is not a readable PyTorch checkpoint.*delete it"):
        ev.cached_features(model, str(folders[0]), 32, tmp_path, "ckpt.pt", 4, 0, "cpu")


def test_the_cli_caches_features_under_fastreg_cache(folders, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTREG_CACHE", str(tmp_path / "cache"))
    torch.save(Student("cnn_tiny").backbone.state_dict(), tmp_path / "tiny.pt")
    _cli_on_folders(tmp_path / "tiny.pt", "cnn_tiny", folders, "--device", "cpu")
    assert len(list((tmp_path / "cache" / "features").glob("*.pt"))) == 2  # the bank's and the queries'


def test_knn_eval_on_an_image_folder(folders):
    result = ev.knn_eval(Student("cnn_tiny").backbone, str(folders[0]), str(folders[1]), 32, 4, 0, "cpu", k=5, t=0.07)
    assert set(result) == {"knn5_majority", "knn5_weighted", "nn1"} and all(0 <= v <= 100 for v in result.values())


# ---------------------------------------------------------------------------------------------- CLI


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "fastreg.eval", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def _figures(out: str) -> dict[str, float]:
    """{figure: top-1} from the CLI's table rows ("│ knn5_majority │ ... │ 50.00 │")."""
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in out.splitlines() if line.startswith("│")]
    return {row[0]: float(row[-1]) for row in rows if row and row[0] and row[-1].replace(".", "").isdigit()}


def test_cli_on_a_trainer_checkpoint(folders, tmp_path, capsys):
    _trainer_checkpoint(tmp_path / "ckpt.pt", "cnn_tiny", *folders)
    run = _cli(
        tmp_path / "ckpt.pt",
        "--linear",
        "cached",
        "--linear-epochs",
        "3",
        "--cache-dir",
        tmp_path / "cache",
        "--device",
        "cpu",
    )
    assert run.returncode == 0, run.stderr
    assert set(_figures(run.stdout)) == {"knn5_majority", "knn5_weighted", "nn1", "linear_cached"}
    for row in ("3 epochs, batch 256, lr 0.01", "bank:     12 images", "extracted and cached", "cpu, fp32"):
        assert row in run.stdout

    ev.main([str(tmp_path / "ckpt.pt"), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"])  # again, in process
    assert "read from the cache" in capsys.readouterr().out
    ev.main(
        [str(tmp_path / "ckpt.pt"), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--precision", "bf16"]
    )
    assert "extracted and cached in" in capsys.readouterr().out  # another precision, other features


def test_cli_runs_every_protocol_on_a_trained_checkpoint(tmp_path, caplog):
    """A student distilled for one epoch by the trainer, whose own k-NN and fastreg.eval.knn's (the library's, on
    the checkpoint's backbone) report the CLI's three figures exactly:
    both extract in eval.precision's fp32 (the trainer's k-NN ran under the training autocast, bf16 here, and
    the same checkpoint gave other figures than the CLI, with nothing said)."""
    from hydra import compose, initialize_config_module

    from fastreg.train import train

    data = make_image_folder(tmp_path / "data", per_class=8)
    overrides = tiny_overrides(data, tmp_path / "run") + [f"data.val_root={data}", "trainer.epochs=1", "eval.knn_k=5"]
    overrides.append("trainer.precision=bf16")
    with initialize_config_module("fastreg.configs", version_base="1.3"), caplog.at_level(logging.INFO, "fastreg.eval"):
        results = train(compose("config", overrides=overrides))
    assert set(results) == {"knn5_majority", "knn5_weighted", "nn1"}
    assert '"eval/knn5_majority"' in (tmp_path / "run" / "metrics.jsonl").read_text()
    assert "k-NN: features in fp32 (eval.precision)" in caplog.messages

    run = _cli(
        tmp_path / "run" / "ckpt_epoch0001.pt",
        "--linear",
        "simreg",
        "moco",
        "cached",
        "--linear-epochs",
        "2",
        "--linear-batch-size",
        "8",
        "--workers",
        "1",
        "--cache-dir",
        tmp_path / "cache",
        "--device",
        "cpu",
    )
    assert run.returncode == 0, run.stderr
    figures = _figures(run.stdout)
    assert set(figures) == {"knn5_majority", "knn5_weighted", "nn1", "linear_simreg", "linear_moco", "linear_cached"}
    assert all(0 <= v <= 100 for v in figures.values())
    assert {k: round(v, 2) for k, v in results.items()} == {k: figures[k] for k in results}
    for row in ("SimReg eval_linear.py", "SEED main_lincls.py", "lr 30 x 8/256", "2 epochs, batch 8"):
        assert row in run.stdout

    # the library's k-NN of the same student, as a plain nn.Module, with the CLI's settings and default precision
    ckpt = tmp_path / "run" / "ckpt_epoch0001.pt"
    student, _, _ = ev.load_student(torch.load(ckpt, weights_only=True), ckpt)
    library = ev.knn(student, data, data, crop_size=32, k=5, device="cpu", batch_size=4, workers=1)
    assert {k: round(v, 2) for k, v in library.items()} == {k: figures[k] for k in results}
    assert library == results  # the trainer's k-NN, unrounded


def _faint_folder(root, per_class: int, seed: int, classes: int = 4, size: int = 36, signal: int = 2):
    """JPEGs of noise, one channel `signal` brighter per class: a random CNN's figures on them are far from 0 and
    100 % and move with any change of its features (another crop, precision or tie seed)."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 160, (size, size, 3)).astype(np.uint8)
            img[..., c % 3] += signal * (1 + c // 3)
            Image.fromarray(img).save(root / f"class{c}" / f"{i}.jpg", quality=90)
    return root


def test_the_library_gives_the_cli_figures_of_any_backbone(tmp_path, capsys):
    """fastreg.eval.knn and linear_eval on a plain nn.Module give the figures of the CLI on the same weights, and
    those figures would not match with another crop, precision or tie seed: the equality can fail."""
    train, val = _faint_folder(tmp_path / "train", 8, seed=0), _faint_folder(tmp_path / "val", 6, seed=1)
    torch.manual_seed(0)
    model = Student("cnn_tiny").backbone
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    roots = ["--arch", "cnn_tiny", "--train-root", train, "--val-root", val, "--crop-size", 32, "--batch-size", 4]
    linear = ["--linear", "simreg", "moco", "cached", "--linear-epochs", 2, "--linear-batch-size", 8]
    ev.main([str(a) for a in [tmp_path / "tiny.pt", *roots, *linear, "--k", 5, "--workers", 0, "--device", "cpu"]])
    figures = _figures(capsys.readouterr().out)

    settings = {"crop_size": 32, "batch_size": 4, "workers": 0, "device": "cpu"}
    library = ev.knn(model, train, val, k=5, **settings)
    for protocol in ("simreg", "moco", "cached"):
        library[f"linear_{protocol}"] = ev.linear_eval(
            model, train, val, protocol, epochs=2, linear_batch_size=8, **settings
        )
    assert {k: round(v, 2) for k, v in library.items()} == figures
    assert all(0 < figures[k] < 100 for k in ("knn5_majority", "knn5_weighted", "nn1", "linear_simreg"))
    knn_figures = {k: figures[k] for k in ("knn5_majority", "knn5_weighted", "nn1")}
    for change in ({"crop_size": 28}, {"precision": "bf16"}, {"seed": 1}):
        other = ev.knn(model, train, val, k=5, **{**settings, **change})
        assert {k: round(v, 2) for k, v in other.items()} != knn_figures, change


def test_the_library_names_its_arguments_in_its_errors(folders, tmp_path):
    model, settings = Student("cnn_tiny").backbone, {"crop_size": 32, "workers": 0, "device": "cpu"}
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope'} does not exist .*train_root"):
        ev.knn(model, tmp_path / "nope", folders[1], **settings)
    with pytest.raises(ValueError, match="^precision='fp8' is not one of bf16, fp16, fp32$"):
        ev.knn(model, *folders, precision="fp8", **settings)
    with pytest.raises(ValueError, match="^protocol='dino' is not one of simreg, moco, cached$"):
        ev.linear_eval(model, *folders, "dino", **settings)
    with pytest.raises(ValueError, match="^epochs must be positive, got 0$"):
        ev.linear_eval(model, *folders, epochs=0, **settings)
    with pytest.raises(ValueError, match="linear_batch_size must be 12 or less$"):
        ev.linear_eval(model, *folders, linear_batch_size=64, **settings)


def test_cli_on_an_exported_resnet18(folders, tmp_path, capsys):
    torch.save(Student("resnet18").backbone.state_dict(), tmp_path / "r18.pt")
    _cli_on_folders(tmp_path / "r18.pt", "resnet18", folders, "--cache-dir", tmp_path / "cache")
    out = capsys.readouterr().out
    assert "r18.pt (resnet18, crop 32)" in out and set(_figures(out)) == {"knn3_majority", "knn3_weighted", "nn1"}


def _cli_on_folders(weights, arch: str, folders, *extra) -> None:
    """fastreg.eval on exported weights with the folders' train and val roots, crop 32, k 3, in process."""
    roots = ["--train-root", folders[0], "--val-root", folders[1]]
    args = [weights, "--arch", arch, *roots, "--crop-size", 32, "--workers", 0, "--k", 3, *extra]
    ev.main([str(a) for a in args])


def _cli_error(*args) -> str:
    with pytest.raises(SystemExit) as exit_:
        ev.main([str(a) for a in args])
    return str(exit_.value)


def test_cli_names_a_trainer_checkpoint_without_its_config(folders, tmp_path):
    """The config gives the arch and the data folders: without it the CLI once said config.student.arch=None."""
    _trainer_checkpoint(tmp_path / "ckpt.pt", "cnn_tiny", *folders)
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    del state["config"]
    torch.save(state, tmp_path / "no_config.pt")
    assert _cli_error(tmp_path / "no_config.pt", "--arch", "cnn_tiny") == (
        f"error: {tmp_path / 'no_config.pt'} has no 'config' entry, which every trainer checkpoint has (this file "
        "holds student, heads, loss, optimizer, scaler, epoch, step, rng, commit): it was written by something else, "
        "or changed. Evaluate the checkpoint that fastreg.train wrote, or the student that fastreg.export wrote with "
        "--arch"
    )


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
    assert (
        "do not fit cnn_tiny: missing keys [features.0.weight" in message and "unexpected keys [conv1.weight" in message
    )
    assert f"the student weights of {tmp_path / 'r18.pt'}" in message and message.endswith(
        "pass the --arch it was trained as"
    )

    linear = [
        "--train-root",
        folders[0],
        "--val-root",
        folders[1],
        "--arch",
        "resnet18",
        "--crop-size",
        "32",
        "--workers",
        "0",
        "--cache-dir",
        tmp_path / "cache",
        "--linear",
        "simreg",
    ]
    assert "--linear-batch-size must be 12 or less" in _cli_error(tmp_path / "r18.pt", *linear)
    assert "--linear-epochs must be positive, got 0" in _cli_error(tmp_path / "r18.pt", *linear, "--linear-epochs", "0")

    del sd["layer4.1.bn2.running_mean"]
    torch.save(sd, tmp_path / "partial.pt")
    assert "missing keys [layer4.1.bn2.running_mean]" in _cli_error(
        tmp_path / "partial.pt", "--arch", "resnet18", *roots
    )


def test_through_head_evaluates_the_trained_heads_output(tmp_path, capsys):
    """--through-head (SimReg's --use_pred): the head rebuilt from the checkpoint gives, in eval mode, exactly what
    the trainer's own head gives; the CLI evaluates its output; exported students and a head that is not there
    are refused by name."""
    from hydra import compose, initialize_config_module

    from fastreg.config import to_config
    from fastreg.trainer import Trainer

    data = make_image_folder(tmp_path / "data", per_class=8)
    overrides = tiny_overrides(data, tmp_path / "run") + [f"data.val_root={data}", "trainer.epochs=1"]
    with initialize_config_module("fastreg.configs", version_base="1.3"):
        trainer = Trainer(to_config(compose("config", overrides=overrides)))
    trainer.fit()
    ckpt = tmp_path / "run" / "ckpt_epoch0001.pt"
    trained = trainer.distiller.model.heads[0].eval()  # simreg4: its BatchNorms' running statistics count here
    head = ev.load_head(torch.load(ckpt, weights_only=True), ckpt, 0, dim=64)
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.equal(head(x), trained(x)) and head(x).shape == (5, 128)

    ev.main([str(ckpt), "--through-head", "--k", "3", "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"])
    out = capsys.readouterr().out
    assert "cnn_tiny, through head 0" in out and set(_figures(out)) == {"knn3_majority", "knn3_weighted", "nn1"}
    assert "has 1 head(s), one per teacher (0: cnn_small)" in _cli_error(ckpt, "--through-head", "1")
    torch.save(torch.load(ckpt, weights_only=True)["student"], tmp_path / "exported.pt")
    assert "holds no heads" in _cli_error(tmp_path / "exported.pt", "--arch", "cnn_tiny", "--through-head")
