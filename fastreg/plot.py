"""python -m fastreg.plot RUN_DIR: the loss, the lr and the k-NN curves of RUN_DIR/metrics.jsonl in RUN_DIR/curves.png.

The trainer draws it at the end of every run (rank 0); this door draws it again at any time, also while the run is
writing metrics.jsonl. metrics.jsonl (fastreg.run_log) holds one JSON object a line, each with its global "step":

    {"step": 8, "loss": 0.61, "loss/<teacher>": 0.61, "cos/<teacher>": 0.69, "lr": 0.05, "img_per_s": ..., ...}
    {"step": 8, "eval/knn20_majority": 41.0, "eval/knn20_weighted": 42.5, "eval/nn1": 37.5}

No torch here, and matplotlib (its Agg backend, no display) only once the file has been read: a bad RUN_DIR is
told in a fraction of a second.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fastreg.files import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)
METRICS, CURVES = "metrics.jsonl", "curves.png"


@dataclass
class Panel:
    """One plot: its title and y label, its series {label: (steps, values)} and what it says when it has none."""

    title: str
    ylabel: str
    series: dict[str, tuple[list[float], list[float]]]
    empty: str
    markers: bool = False  # k-NN: a few points, one per evaluation


def read_metrics(path: Path) -> list[dict[str, float]]:
    """metrics.jsonl's records in file order. Raises ValueError naming the file and line for one that is not a JSON
    object of numbers with a "step", and for a file with no record. A last line without its newline is one the
    trainer is writing (or was writing when killed; a resumed run drops it): left out, with a warning."""
    lines = path.read_text().splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        log.warning(
            "%s, line %d: cut short (the run is writing it, or was killed while it did): left out", path, len(lines)
        )
        lines = lines[:-1]
    if not lines:
        raise ValueError(
            f"{path} holds no complete line: the run has logged no step yet (the first comes after "
            "trainer.log_every steps, or at the first epoch's end); draw it once it has"
        )
    return [parse_record(line, path, n) for n, line in enumerate(lines, 1)]


def parse_record(line: str, path: Path, n: int) -> dict[str, float]:
    """Line `n` of metrics.jsonl `path` as {"step": ..., key: number}; ValueError naming the line otherwise."""
    where = f"{path}, line {n}"
    fix = "fastreg.train writes one JSON object of numbers a line with its step; fix or remove that line"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON ({e.msg} at column {e.colno}); {fix}") from None
    if not isinstance(record, dict) or "step" not in record:
        raise ValueError(f"{where}: {line.strip()[:80]} is not a metrics record (a JSON object with a step); {fix}")
    for key, value in record.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{where}: {key}={json.dumps(value)[:40]} is not a number; {fix}")
    return record


def series(records: list[dict[str, float]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the records that hold `key`, in file order."""
    held = [r for r in records if key in r]
    return [r["step"] for r in held], [r[key] for r in held]


def panels(records: list[dict[str, float]]) -> list[Panel]:
    """The loss (with each loss/<teacher> term when there are several: one term is the loss itself), the lr and
    every eval/<figure> (fastreg.eval.knn_accuracy's keys), against the step."""
    keys = list(dict.fromkeys(k for r in records for k in r))  # every key, in the order the run first logged it
    terms = [k for k in keys if k.startswith("loss/")]
    losses = ["loss", *terms] if len(terms) > 1 else ["loss"]
    figures = [k for k in keys if k.startswith("eval/")]

    def panel(title, ylabel, names, empty, markers=False):
        found = {name.removeprefix("eval/"): series(records, name) for name in names if name in keys}
        return Panel(title, ylabel, found, empty, markers)

    return [
        panel("training loss", "loss", losses, "no loss logged yet"),
        panel("learning rate", "lr", ["lr"], "no lr logged yet"),
        panel(
            "k-NN on data.val_root",
            "val top-1 %",
            figures,
            "no k-NN evaluation yet:\ndata.val_root is not set,\nor the first is still to come\n(trainer.eval_every)",
            markers=True,
        ),
    ]


def steps_per_epoch(records: list[dict[str, float]]) -> float | None:
    """Steps in an epoch, from a step line's "epoch" (step / batches per epoch); None when no line has one."""
    return next((r["step"] / r["epoch"] for r in records if r.get("epoch", 0) > 0), None)


def draw(panels: list[Panel], title: str, per_epoch: float | None = None) -> Figure:
    """The panels side by side against the step (sharing it; epochs on top when `per_epoch` is known), on a Figure
    of its own (Agg canvas: no display, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * len(panels), 4), layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title)
    for ax, p in zip(fig.subplots(1, len(panels), sharex=True), panels):
        ax.set(title=p.title, xlabel="step", ylabel=p.ylabel)
        if per_epoch:
            top = ax.secondary_xaxis("top", functions=(lambda s: s / per_epoch, lambda e: e * per_epoch))
            top.set_xlabel("epoch")
        for label, (steps, values) in p.series.items():
            ax.plot(steps, values, marker="o" if p.markers else None, label=label)
        if p.series:
            ax.legend(fontsize="small")
            ax.grid(alpha=0.3)
        else:
            ax.text(0.5, 0.5, p.empty, ha="center", va="center", transform=ax.transAxes, color="gray")
    return fig


def write_curves(run_dir: Path) -> tuple[list[Panel], Figure]:
    """RUN_DIR/curves.png from RUN_DIR/metrics.jsonl, written atomically: the panels and the Figure drawn. Raises
    ValueError or OSError (FileNotFoundError) with one line naming the folder or file and what to do."""
    path = run_dir / METRICS
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a folder: give a run folder (runs/<name>, trainer.out_dir)")
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {run_dir} is not a run folder, or its run has not started training (the trainer "
            f"writes {METRICS} from its first step on); give a run folder (runs/<name>, trainer.out_dir)"
        )
    records = read_metrics(path)
    drawn = panels(records)
    fig = draw(drawn, str(path), steps_per_epoch(records))
    atomic_write(run_dir / CURVES, lambda f: fig.savefig(f, format="png", dpi=100))
    return drawn, fig


def summary(panels: list[Panel]) -> str:
    """The most points a series of each panel has, e.g. "training loss 12, learning rate 12, k-NN on ... none"."""
    counts = [max((len(steps) for steps, _ in p.series.values()), default=0) for p in panels]
    return ", ".join(f"{p.title} {n or 'none'}" for p, n in zip(panels, counts))


def write_curves_or_warn(run_dir: Path) -> None:
    """write_curves at the end of a run: a picture that fails is a warning, never the loss of the run, which is
    saved and evaluated by then."""
    try:
        write_curves(run_dir)
    except Exception as e:  # a bug in drawing included: the run still ends as it should
        log.warning(
            "%s was not drawn (%s: %s); the run itself is complete. python -m fastreg.plot %s draws it again",
            run_dir / CURVES,
            type(e).__name__,
            e,
            run_dir,
        )
    else:
        log.info("loss, lr and k-NN curves in %s", run_dir / CURVES)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastreg.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="a run folder: runs/<name> (trainer.out_dir)")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.WARNING)
    try:
        drawn, _ = write_curves(args.run_dir)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {args.run_dir / CURVES}; points per panel: {summary(drawn)}")


if __name__ == "__main__":
    main()
