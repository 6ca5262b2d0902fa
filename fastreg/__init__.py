"""fastreg: distill large frozen self-supervised teachers into small fast students (SimReg, SEED).

`pip install fastreg-distill` gives fastreg.kernels (torch only); the rest of fastreg (the trainer, the pipelines,
the evaluation) needs the [train] extra. Importing one of those modules without it raises one line that names
the missing packages and the pip command, rather than the first ModuleNotFoundError deep inside.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.metadata
import re
import sys

DISTRIBUTION = "fastreg-distill"
TRAIN_EXTRA = f"pip install '{DISTRIBUTION}[train]'"


@functools.cache
def missing_for_training() -> tuple[str, ...]:
    """The [train] extra's distributions that are not installed; none when fastreg-distill itself is not installed
    (a source tree on sys.path: its requirements are unknown)."""
    try:
        requirements = importlib.metadata.requires(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        return ()
    names = [re.match(r"[A-Za-z0-9._-]+", r).group(0) for r in requirements if re.search(r"extra\s*==\s*.train.", r)]
    return tuple(name for name in names if not installed(name))


def installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


class _TrainExtra(importlib.abc.MetaPathFinder):
    """Asked first for every fastreg.* module but fastreg.kernels: refuses it when the [train] extra is missing."""

    def find_spec(self, name, path, target=None):
        if name.startswith("fastreg.") and not name.startswith("fastreg.kernels") and missing_for_training():
            raise ModuleNotFoundError(
                f"{name} needs fastreg's [train] extra ({', '.join(missing_for_training())} not installed): "
                f"{TRAIN_EXTRA}",
                name=name,
            )
        return None  # the usual finders find it


sys.meta_path.insert(0, _TrainExtra())
