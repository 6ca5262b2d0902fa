"""k-NN evaluation: SimReg's majority vote, the weighted vote (DINO / InstDisc) and 1-NN, on features or on a
model and an ImageFolder pair (the bank's and the queries' folders). See fastreg.eval for the three figures."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from fastreg.config import TrainConfig
from fastreg.eval.features import count_classes, folder_features
from fastreg.placement import AMP_DTYPES
from fastreg.seeding import mix_seed

log = logging.getLogger(__name__)
SIM_ELEMENTS = 2**26  # entries of one chunk's (queries, bank) similarity matrix: 256 MiB in fp32
TIE_SEED = 0  # the majority vote's tie-break when no --seed is given (the trainer's k-NN)


def knn_label(k: int, vote: str) -> str:
    """Result key of a k-NN figure: knn20_majority, knn20_weighted (the 1-NN figure is "nn1")."""
    return f"knn{k}_{vote}"


def _neighbours(
    bank: torch.Tensor, queries: torch.Tensor, k: int, chunk_size: int | None
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Per chunk of queries, (index of its first query, sim (q, k), index (q, k)) of the k most similar bank
    rows, nearest first. On L2-normalized rows ||a - b||^2 = 2 - 2 a.b, so this is also SimReg's k nearest
    by L2 distance (eval_knn.py faiss_knn, IndexFlatL2).

    The default chunk keeps the (q, N) similarity matrix under SIM_ELEMENTS entries.
    """
    step = chunk_size or max(1, SIM_ELEMENTS // bank.shape[0])
    for start in range(0, queries.shape[0], step):
        sim = queries[start : start + step].to(bank.device) @ bank.T  # (q, D) @ (D, N) -> (q, N)
        yield start, *sim.topk(min(k, bank.shape[0]), dim=1)


def _weighted_vote(sim: torch.Tensor, neighbour_labels: torch.Tensor, num_classes: int, t: float) -> torch.Tensor:
    """Class scores (q, C): each neighbour adds exp(sim / t) to its class's score.

    The row's largest similarity is subtracted first (a common factor per row, so the argmax is the
    same) to keep exp finite at small t.
    """
    weights = ((sim - sim[:, :1]) / t).exp()  # (q, k); sim is sorted, column 0 is the row max
    scores = torch.zeros(sim.shape[0], num_classes, device=sim.device)
    return scores.scatter_add_(1, neighbour_labels, weights)


def tie_order(query: int, num_classes: int, seed: int) -> torch.Tensor:
    """The majority vote's tie keys of global query index `query`: a random permutation of the classes (C,).

    Its generator's seed is mix_seed("tie", seed, query, bits=32): a hash keeps (seed, query) pairs from sharing
    one, and torch's CPU generator reads only the low 32 bits of a seed.
    """
    generator = torch.Generator().manual_seed(mix_seed("tie", seed, query, bits=32))
    return torch.randperm(num_classes, generator=generator)


def _majority_vote(neighbour_labels: torch.Tensor, num_classes: int, first_query: int, seed: int) -> torch.Tensor:
    """SimReg's majority vote (eval_knn.py faiss_knn): the class (q,) with the most of the k neighbours.

    SimReg breaks a tie by shuffling the (class, count) pairs with python's global RNG and taking the first
    maximum: a uniformly random one of the tied classes, different in every run. Here query i's score of
    class c is count[i, c] * C + tie_order(i)[c]. The keys are distinct and below C, so more votes always
    win, and among tied classes the one with the larger key wins: still uniform among the tied classes,
    but a function of (seed, i) alone, whatever the chunking or device. Keys are drawn only for rows whose
    top count is shared; elsewhere they cannot change the winner.
    """
    counts = torch.zeros(neighbour_labels.shape[0], num_classes, dtype=torch.long, device=neighbour_labels.device)
    counts.scatter_add_(1, neighbour_labels, torch.ones_like(neighbour_labels))  # (q, C) votes
    tied = ((counts == counts.max(1, keepdim=True).values).sum(1) > 1).nonzero().flatten().tolist()
    keys = torch.zeros_like(counts)
    if tied:
        keys[tied] = torch.stack([tie_order(first_query + r, num_classes, seed) for r in tied]).to(keys.device)
    return (counts * num_classes + keys).argmax(1)


def knn_predict(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    num_classes: int,
    k: int = 20,
    t: float = 0.07,
    chunk_size: int | None = None,
    seed: int = TIE_SEED,
) -> dict[str, torch.Tensor]:
    """{"majority", "weighted", "nn1"}: each query's class (Q,) by the three votes, on bank's device, from one pass.

    bank (N, D) and queries (Q, D) are L2-normalized; k is clipped to N. `chunk_size` queries are
    compared at a time (default: as many as keep the similarity matrix under SIM_ELEMENTS); `seed` draws
    the majority vote's tie keys.
    """
    bank_labels = bank_labels.to(bank.device)
    votes: dict[str, list[torch.Tensor]] = {"majority": [], "weighted": [], "nn1": []}
    for start, sim, idx in _neighbours(bank, queries, k, chunk_size):
        neighbour_labels = bank_labels[idx]  # (q, k), nearest first
        votes["majority"].append(_majority_vote(neighbour_labels, num_classes, start, seed))
        votes["weighted"].append(_weighted_vote(sim, neighbour_labels, num_classes, t).argmax(1))
        votes["nn1"].append(neighbour_labels[:, 0])
    return {name: torch.cat(v) for name, v in votes.items()}


def knn_accuracy(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    **options,
) -> dict[str, float]:
    """Top-1 % as {knn<k>_majority, knn<k>_weighted, nn1}; options (t, chunk_size, seed) as knn_predict's."""
    preds = knn_predict(bank, bank_labels, queries, num_classes, k=k, **options)
    y = query_labels.to(bank.device)
    names = {knn_label(k, "majority"): "majority", knn_label(k, "weighted"): "weighted", "nn1": "nn1"}
    return {key: 100.0 * (preds[vote] == y).double().mean().item() for key, vote in names.items()}


def knn_eval(
    model: nn.Module,
    train_root: str,
    val_root: str,
    crop_size: int,
    batch_size: int,
    workers: int,
    device: str | torch.device,
    k: int,
    t: float,
    amp_dtype: torch.dtype | None = None,
    loader: str = "auto",
    root_keys: tuple[str, str] = ("data.knn_train_root", "data.val_root"),
    **index_options,
) -> dict[str, float]:
    """knn_accuracy's three figures for `model`, with train_root's images as the bank and val_root's as the
    queries; `loader` is the data.loader that decodes them (auto: DALI when it can be imported), root_keys the
    keys that gave the two roots (for the messages), index_options (max_bad_fraction, progress) go to the
    dataset index.

    Nothing is cached: during training the model changes between calls.
    """
    train, val = (
        folder_features(model, root, crop_size, batch_size, workers, device, amp_dtype, loader, key, **index_options)
        for root, key in zip((train_root, val_root), root_keys)
    )
    num_classes = count_classes(train, val, train_root, val_root)
    bank, queries = (F.normalize(x["feats"], dim=1) for x in (train, val))  # (N, D), (Q, D)
    return knn_accuracy(bank.to(device), train["labels"], queries, val["labels"], num_classes, k=k, t=t)


def knn_eval_run(model: nn.Module, cfg: TrainConfig, device: torch.device) -> dict[str, float]:
    """knn_eval with a training run's settings: data.knn_train_root (else data.root) as the bank, data.val_root as
    the queries, the run's crop size, loader and eval.* settings (eval.precision: python -m fastreg.eval's)."""
    d, e = cfg.data, cfg.eval
    bank = d.knn_train_root or d.root
    log.info("k-NN: features in %s (eval.precision)", e.precision)
    return knn_eval(
        model,
        bank,
        d.val_root,
        d.crop_size,
        e.batch_size,
        e.workers,
        device,
        e.knn_k,
        e.knn_t,
        amp_dtype=AMP_DTYPES[e.precision],
        loader=d.loader,
        root_keys=("data.knn_train_root" if d.knn_train_root else "data.root", "data.val_root"),
        max_bad_fraction=d.max_bad_fraction,
        progress=False,
    )
