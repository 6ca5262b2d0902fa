"""The distribution: its wheel carries every config with no build warning, and its core requires torch alone.
(Installing it into a venv of torch alone, with the README's line: tests/check_light_install.py, in make test.)"""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_wheel_carries_the_configs_builds_without_warnings_and_requires_torch_alone(tmp_path):
    """The editable install printed 8 setuptools warnings ("Installing 'fastreg.configs.data' as data is
    deprecated"), and the one distribution required DALI, hydra, timm and 8 more for the kernels alone."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", str(tmp_path), str(REPO)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not re.findall(r".*\w+Warning\b.*", proc.stdout + proc.stderr)
    (wheel,) = tmp_path.glob("fastreg_distill-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"fastreg/configs/{p.relative_to(REPO / 'configs')}" for p in (REPO / "configs").rglob("*.yaml")}
    assert configs and configs <= names
    # every module of the three source folders, at its import path (a package missing from pyproject's explicit
    # list, as fastreg.eval once was, would be left out)
    folders = {"fastreg": "fastreg", "kernels": "fastreg/kernels", "pipelines": "fastreg/pipelines"}
    modules = {f"{to}/{p.relative_to(REPO / src)}" for src, to in folders.items() for p in (REPO / src).rglob("*.py")}
    assert "fastreg/eval/library.py" in modules and not modules - names, sorted(modules - names)
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    requires = re.findall(r"^Requires-Dist: (.*)$", metadata, flags=re.M)
    assert [r for r in requires if "extra ==" not in r] == ["torch>=2.6"]
    assert re.search(r"^Name: fastreg-distill$", metadata, flags=re.M)
