"""python -m fastreg.eval: a trainer checkpoint's or an exported student's k-NN and linear figures, its features
cached, the result as a table. See fastreg.eval for the protocols."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from fastreg import checkpoint, files
from fastreg.config import HeadConfig
from fastreg.eval.feature_cache import cached_features
from fastreg.eval.features import count_classes
from fastreg.eval.linear import RECIPES, LinearRecipe, run_protocol, tuned_recipe
from fastreg.eval.neighbours import TIE_SEED, knn_accuracy, knn_label
from fastreg.export import WRONG_ARCH, check_keys, checkpoint_arch, read_checkpoint
from fastreg.heads import build_head
from fastreg.messages import listing
from fastreg.placement import AMP_DTYPES, pick_device
from fastreg.students import STUDENTS, Student


def load_student(ckpt: dict, path: str | Path, arch: str | None = None) -> tuple[nn.Module, str, dict]:
    """(backbone, arch, config) from `ckpt`, the contents of `path`: a trainer checkpoint or an exported student
    state_dict.

    A trainer checkpoint gives its config, and its arch unless `arch` overrides it. An exported
    state_dict has no config ({}), so `arch` is required. The weights must fit the arch exactly.
    """
    given = arch is not None
    if "student" in ckpt:
        fix = "Evaluate the checkpoint that fastreg.train wrote, or the student that fastreg.export wrote with --arch"
        config = checkpoint.check_entries(ckpt, Path(path), ("student", "config"), fix)["config"]
        arch = arch or checkpoint_arch(ckpt, path)
        state_dict = ckpt["student"]
    elif checkpoint.is_state_dict(ckpt):
        if arch is None:
            raise ValueError(
                f"{path} is an exported student state_dict, which has no config: pass --arch (one of {', '.join(STUDENTS)})"
            )
        config, state_dict = {}, ckpt
    else:
        raise ValueError(
            f"{path} is neither a trainer checkpoint (no 'student' entry) nor a state_dict of tensors "
            f"(keys: {listing(map(str, ckpt))})"
        )
    if arch not in STUDENTS:
        raise ValueError(f"--arch {arch!r} is not one of {', '.join(STUDENTS)}")
    check_keys(state_dict, arch, path, "pass the --arch it was trained as" if given else WRONG_ARCH)
    backbone = Student(arch).backbone
    backbone.load_state_dict(state_dict, strict=False)  # check_keys allowed only the classifier to be missing
    return backbone, arch, config


def load_head(ckpt: dict, path: str | Path, index: int, dim: int) -> nn.Module:
    """Head `index` of a trainer checkpoint `ckpt`, the contents of `path` (the head of teachers[index]), in eval
    mode, for SimReg's --use_pred: its output, rather than the backbone's feature, is what the k-NN and the linear
    probes see. `dim`: the student's feature width. Exported students have no heads (fastreg.export drops them)."""
    heads = ckpt.get("heads")
    teachers = (ckpt.get("config") or {}).get("teachers") or []
    if heads is None or not teachers:
        raise ValueError(
            f"--through-head needs a trainer checkpoint: {path} holds no heads (an exported student "
            "keeps the backbone only); evaluate the checkpoint that fastreg.train wrote"
        )
    if not 0 <= index < len(teachers):
        names = ", ".join(f"{i}: {t.get('name') or t.get('arch')}" for i, t in enumerate(teachers))
        raise ValueError(f"--through-head {index}: {path} has {len(teachers)} head(s), one per teacher ({names})")
    prefix = f"{index}."
    state = {k[len(prefix) :]: v for k, v in heads.items() if k.startswith(prefix)}
    out_dim = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 2][-1].shape[0]  # the last Linear
    head = build_head(HeadConfig(**{**teachers[index]["head"], "impl": "eager"}), dim, out_dim)
    head.load_state_dict(state)
    return head.eval()


def _settings(args: argparse.Namespace, config: dict) -> argparse.Namespace:
    """Flags over the checkpoint config's data/eval values over defaults; checks the data folders."""
    data, ev = config.get("data") or {}, config.get("eval") or {}
    s = argparse.Namespace(
        train_root=args.train_root or data.get("knn_train_root") or data.get("root"),
        val_root=args.val_root or data.get("val_root"),
        crop_size=args.crop_size or data.get("crop_size") or 224,
        k=args.k or ev.get("knn_k") or 20,
        t=args.t or ev.get("knn_t") or 0.07,
        batch_size=args.batch_size or ev.get("batch_size") or 256,
        workers=args.workers if args.workers is not None else ev.get("workers", min(8, os.cpu_count() or 1)),
        loader=args.loader or data.get("loader") or "auto",
    )
    for flag, root in (("--train-root", s.train_root), ("--val-root", s.val_root)):
        if root is None:
            where = "the checkpoint's config does not name one" if config else "an exported student carries no config"
            raise ValueError(f"no {flag}: {where}; pass {flag} DIR (an ImageFolder)")
        if not Path(root).is_dir():
            raise FileNotFoundError(f"{flag} {root} is not a folder")
    return s


def _recipe(name: str, args: argparse.Namespace) -> LinearRecipe:
    """RECIPES[name] with the --linear-epochs, --linear-batch-size and --linear-lr that were given."""
    given = {"epochs": args.linear_epochs, "batch_size": args.linear_batch_size, "lr": args.linear_lr}
    return tuned_recipe(name, given, lambda key: f"--linear-{key.replace('_', '-')}")


def evaluate(args: argparse.Namespace) -> tuple[dict[str, float], dict]:
    """Run the CLI's evaluation: (results, facts about what ran, for the table)."""
    args.cache_dir = files.cache_folder("features", args.cache_dir)  # writable: before any feature is extracted
    ckpt = read_checkpoint(args.checkpoint)
    backbone, arch, config = load_student(ckpt, args.checkpoint, args.arch)
    if args.through_head is not None:  # the features are the head's output (SimReg's eval --use_pred)
        head = load_head(ckpt, args.checkpoint, args.through_head, STUDENTS[arch].dim)
        backbone = nn.Sequential(backbone, head)
    del ckpt  # the optimizer state and the rest: not needed from here on
    s = _settings(args, config)
    device = pick_device(args.device, key="--device")
    amp_dtype = AMP_DTYPES[args.precision]
    backbone.to(device)
    head = "" if args.through_head is None else f", through head {args.through_head}"
    tag = str(Path(args.checkpoint).resolve()) + head  # the head's features get their own cache slot
    train, val = (
        cached_features(
            backbone, root, s.crop_size, args.cache_dir, tag, s.batch_size, s.workers, device, amp_dtype, s.loader, key
        )
        for root, key in ((s.train_root, "--train-root"), (s.val_root, "--val-root"))
    )
    num_classes = count_classes(train, val, s.train_root, s.val_root)
    bank, queries = (F.normalize(x["feats"], dim=1) for x in (train, val))
    results = knn_accuracy(
        bank.to(device), train["labels"], queries, val["labels"], num_classes, k=s.k, t=s.t, seed=args.seed
    )
    recipes = {name: _recipe(name, args) for name in args.linear}
    for name, recipe in recipes.items():
        results[f"linear_{name}"] = run_protocol(
            name,
            recipe,
            backbone,
            train,
            val,
            num_classes,
            s.train_root,
            s.crop_size,
            s.workers,
            s.loader,
            device,
            amp_dtype,
            args.seed,
        )
    facts = {
        "arch": arch + head,
        "settings": s,
        "device": device,
        "n_train": len(train["labels"]),
        "n_val": len(val["labels"]),
        "cached": train["cached"] and val["cached"],
        "recipes": recipes,
    }
    return results, facts


def _protocols(args: argparse.Namespace, facts: dict) -> dict[str, str]:
    """What each result key measured, for the table."""
    s = facts["settings"]
    rows = {
        knn_label(s.k, "majority"): f"SimReg eval_knn.py: most of the {s.k} nearest, ties by seed {args.seed}",
        knn_label(s.k, "weighted"): f"{s.k} nearest, each adds exp(cos / {s.t})",
        "nn1": "label of the nearest",
    }
    sources = {
        "simreg": "SimReg eval_linear.py: fresh crops, standardized",
        "moco": "SEED main_lincls.py: fresh crops, raw feature",
        "cached": "cached center crops (a little lower)",
    }
    for name, r in facts["recipes"].items():
        lr = f"lr {r.lr:g} x {r.batch_size}/256" if r.scale_lr else f"lr {r.lr:g}"
        rows[f"linear_{name}"] = f"{sources[name]}, {r.epochs} epochs, batch {r.batch_size}, {lr}"
    return rows


def _report(args: argparse.Namespace, results: dict[str, float], facts: dict) -> None:
    s = facts["settings"]
    table = Table(title=f"{Path(args.checkpoint).name} ({facts['arch']}, crop {s.crop_size})")
    table.add_column("figure")
    table.add_column("top-1 %", justify="right")
    protocols = _protocols(args, facts)
    for key in protocols:
        table.add_row(key, f"{results[key]:.2f}")
    console = Console(highlight=False, soft_wrap=True)
    console.print(table)
    width = max(map(len, protocols))
    for key, protocol in protocols.items():  # below the table, which would wrap them at the terminal's width
        console.print(f"{key:<{width}}  {protocol}")
    console.print(f"bank:     {facts['n_train']} images in {s.train_root}")
    console.print(f"queries:  {facts['n_val']} images in {s.val_root}")
    source = "read from the cache" if facts["cached"] else "extracted and cached"
    console.print(f"features: {source} in {args.cache_dir}, on {facts['device']}, {args.precision}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m fastreg.eval", description="k-NN (majority, weighted), 1-NN and linear top-1 of a student."
    )
    p.add_argument(
        "checkpoint",
        help="trainer checkpoint, or a student exported by fastreg.export (then --arch and roots are required)",
    )
    p.add_argument("--arch", choices=list(STUDENTS), help="student arch (default: the checkpoint's config)")
    p.add_argument(
        "--through-head",
        type=int,
        nargs="?",
        const=0,
        metavar="N",
        help="evaluate the output of the student's head N (default 0: the first teacher's) instead of its backbone "
        "feature, as SimReg's --use_pred (trainer checkpoints only: exports drop the heads)",
    )
    p.add_argument(
        "--train-root",
        help="ImageFolder of the k-NN bank / linear training set (default: data.knn_train_root or data.root)",
    )
    p.add_argument("--val-root", help="ImageFolder of the queries / linear test set (default: data.val_root)")
    p.add_argument("--crop-size", type=int, help="center and random-resized crop (default: data.crop_size, else 224)")
    p.add_argument(
        "--linear",
        nargs="+",
        choices=list(RECIPES),
        default=[],
        metavar="PROTOCOL",
        help="also train linear classifiers by these protocols: simreg (SimReg's), moco (SEED's), cached "
        "(fast, on cached center-crop features)",
    )
    p.add_argument("--linear-epochs", type=int, help="default: the protocol's (simreg 40, moco 100, cached 40)")
    p.add_argument("--linear-batch-size", type=int, help="default: 256")
    p.add_argument(
        "--linear-lr",
        type=float,
        help="default: the protocol's (simreg 0.01, cached 0.01, moco 30 at batch 256, scaled by batch/256)",
    )
    p.add_argument("--k", type=int, help="k-NN neighbours (default: eval.knn_k, else 20)")
    p.add_argument("--t", type=float, help="weighted k-NN temperature (default: eval.knn_t, else 0.07)")
    p.add_argument(
        "--seed",
        type=int,
        default=TIE_SEED,
        help="seed of the majority vote's tie-break, the linear heads' init and the random crops",
    )
    p.add_argument(
        "--precision",
        choices=list(AMP_DTYPES),
        default="fp32",
        help="autocast dtype of the backbone's forward (default fp32)",
    )
    p.add_argument("--batch-size", type=int, help="feature extraction batch (default: eval.batch_size, else 256)")
    p.add_argument(
        "--workers", type=int, help="DataLoader workers or DALI threads (default: eval.workers, else min(8, CPUs))"
    )
    p.add_argument(
        "--loader",
        choices=("auto", "dali", "torchvision"),
        help="decoder of the images (default: data.loader, else auto: DALI when installed)",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--cache-dir", type=Path, help=f"feature cache (default: {files.cache_dir('features')})")
    args = p.parse_args(argv)
    try:
        results, facts = evaluate(args)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from e
    _report(args, results, facts)
