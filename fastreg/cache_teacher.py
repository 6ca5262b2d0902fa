"""python -m fastreg.cache_teacher OUT [--teacher N] [--dtype float16|float32] [key=value ...]

SimReg's cached teacher (simreg.py --use_cache): the teacher's feature of every training image, computed once,
then looked up by the trainer (teacher.cache=OUT) instead of running the teacher at every step.

    for every image i of data.root's validated index:
        features[i] = teacher(center_crop(image_i))     # (D,); resize crop*256/224, center crop: the eval view
    OUT/features.npy   (N, D), a .npy that numpy memory-maps; row i is the index's sample i
    OUT/meta.json      the dataset's digests (names and labels; bytes) and root, the teacher, the view, the dtype,
                       a CRC-32 per 65,536 rows, this command's arguments: what teacher.cache checks

The official code loads a dict of one feature per file name, computed by a script it does not include. One
fixed feature per image can only come from a fixed view; the center crop is the deterministic view of its
(and CompRess's) evaluation, so that is the view cached here. The student trains on its own augmented views
against it, which SimReg's README reports as slightly below the online teacher for the same pair.

The key=value overrides compose the training config (experiment=..., data.root=..., teacher.checkpoint=...),
so the index, teacher and precision are the training run's. Under torchrun every rank computes the contiguous
shard DALI's reader gives it and writes its rows into one file (ranks on one machine, or a shared file system).
Everything is written into OUT.partial/ and renamed to OUT at the end: OUT is whole or absent. One writer at a
time: rank 0 holds OUT.lock (fastreg.lock) from before OUT is looked at until it is renamed. A feature that is not
finite, or overflows float16, is refused by image name before it is written (pass --dtype float32 for the latter).
SIGTERM or SIGUSR1, from main's first line on (before the imports of torch and hydra, which take seconds), stops the
run at once with exit code 75 (EX_TEMPFAIL, on which a Slurm script requeues) and one line: nothing is written, rank
0 removes OUT.partial and OUT.lock on the way out, and the same command starts over. The work is in
fastreg/cache_writer.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from fastreg.preemption import AtOnce, when_stopped


def stopped_outcome(out: Path, existed: bool) -> str:
    """What a stop signal leaves, once rank 0 removed OUT.partial and OUT.lock: nothing (or, after the rename, the
    whole cache). Another rank's stop leaves them to rank 0, which stops too (torchrun forwards the signal)."""
    if out.exists() and not existed:
        return f"{out} was complete before it: train with teacher.cache={out}"
    partial = out.with_name(out.name + ".partial")
    left = f"; {partial} is left, and the next run removes it" if partial.exists() else ""
    return f"nothing was written to {out}, and {out.name}.lock is released{left}: the same command starts over"


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("out", type=Path, help="the cache's folder; must not exist")
    parser.add_argument("--teacher", type=int, default=0, help="which of the config's teachers (default 0)")
    parser.add_argument(
        "--dtype", choices=("float16", "float32"), default="float16", help="float16 (default) halves the file"
    )
    args, overrides = parser.parse_known_args(argv)
    if bad := [o for o in overrides if o.startswith("-") or "=" not in o]:
        parser.error(f"unknown argument(s) {bad}: after OUT and the flags come training overrides, key=value")
    return args, overrides


def write(out: Path, teacher: int, dtype: str, overrides: list[str]) -> None:
    """The cache written, or the user's error in one line with exit code 1, as fastreg.train does."""
    import torch.distributed as dist  # here, not at the top: a stop signal during these imports is handled
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from fastreg import files
    from fastreg.cache_writer import compose_config, write_cache
    from fastreg.preflight import check_paths, check_teacher_inputs
    from fastreg.train import USER_ERRORS

    arguments = ["--teacher", str(teacher), "--dtype", dtype, *overrides]  # after OUT, for meta.json
    try:
        cfg = compose_config(overrides)
        if not 0 <= teacher < len(cfg.teachers):
            raise ValueError(f"--teacher {teacher}: the config has {len(cfg.teachers)} teacher(s)")
        check_paths(cfg)  # as the trainer does first: every path the config names, before the teacher or the index
        check_teacher_inputs(cfg)  # a ViT's patches tile the crop (or teacher.input_size)
        files.cache_folder("index")
        write_cache(cfg, out, teacher, dtype, arguments)
    except (*USER_ERRORS, HydraException, OmegaConfBaseException) as e:  # as fastreg.train: one line, exit 1
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        cause = f"\n{e.__cause__}" if isinstance(e, HydraException) and e.__cause__ else ""  # as hydra prints it
        sys.exit(f"error: {e}{cause}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    program = "python -m fastreg.cache_teacher"
    with AtOnce(program, lambda: "nothing was written: the same command starts over", "while it writes the cache"):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        args, overrides = parse_args(argv)
        out = args.out.expanduser().resolve()
        existed = out.exists()
        when_stopped(lambda: stopped_outcome(out, existed))
        write(out, args.teacher, args.dtype, overrides)
    print(f"teacher features written to {out}; train with teacher.cache={out}")


if __name__ == "__main__":
    main()
