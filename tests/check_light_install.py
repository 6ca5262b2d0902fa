"""The kernels' install as README.md gives it, in a fresh venv that has torch alone (`make light-install`, part of
`make test`): the README's install line adds fastreg-distill and no other package, `pip check` is clean, the
README's drop-in snippet runs on the CPU, and a trainer module refuses to import in one line naming the extra.

    python tests/check_light_install.py VENV TORCH_REQUIREMENT      (make passes build/light-venv torch==<pin>)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTION = "## The fused kernels in your own trainer"


def kernels_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(SECTION)
    end = text.index("\n## ", start + len(SECTION))
    return text[start:end]


def readme_install_line(section: str) -> str:
    """The section's line that installs the kernels alone (`pip install .`, run from the clone)."""
    lines = re.findall(r"^(pip install \S+)", section, flags=re.M)
    light = [line for line in lines if "[" not in line]
    assert len(light) == 1, f"README.md, {SECTION!r}: expected one kernels-only pip install line, found {lines}"
    return light[0]


def readme_snippet(section: str) -> str:
    """The section's first python block: the drop-in loop."""
    return re.search(r"^```python\n(.*?)^```", section, flags=re.S | re.M).group(1)


def run(command: list[str] | str, venv: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", "VIRTUAL_ENV": str(venv)}
    env.pop("PYTHONPATH", None)
    return subprocess.run(command, cwd=cwd, env=env, text=True, capture_output=True, shell=isinstance(command, str))


def check(proc: subprocess.CompletedProcess, what: str) -> str:
    if proc.returncode != 0:
        sys.exit(f"light install: {what} failed (exit {proc.returncode})\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def freeze(venv: Path) -> set[str]:
    """Installed distributions, one `name==version` (or `name @ url`) each."""
    return set(check(run(["pip", "freeze", "--all"], venv, REPO), "pip freeze").splitlines())


def main(venv: Path, torch_requirement: str) -> None:
    section = kernels_section()
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    check(run(["pip", "install", "-q", torch_requirement], venv, REPO), f"pip install {torch_requirement}")
    before = freeze(venv)

    line = readme_install_line(section)
    check(run(line, venv, REPO), line)  # as written, in the clone
    added = freeze(venv) - before
    assert [re.split(r"==| @ ", a)[0] for a in added] == ["fastreg-distill"], f"{line} added {sorted(added)}"
    check(run(["pip", "check"], venv, REPO), "pip check")

    with tempfile.TemporaryDirectory() as elsewhere:  # not the clone, whose fastreg/ would shadow the install
        printed = check(run(["python", "-c", readme_snippet(section)], venv, Path(elsewhere)), "the drop-in snippet")
        refused = run(["python", "-c", "import fastreg.trainer"], venv, Path(elsewhere))
    last = refused.stderr.strip().splitlines()[-1]
    expected = "pip install 'fastreg-distill[train]'"
    assert (
        refused.returncode == 1
        and last.startswith("ModuleNotFoundError: fastreg.trainer needs")
        and last.endswith(expected)
    ), refused.stderr[-2000:]
    print(f"light install: {line} added {sorted(added)}; pip check clean; the drop-in snippet printed")
    print(printed.strip())
    print(f"without the extra: {last}")
    shutil.rmtree(venv)  # 5 GB of torch


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve(), sys.argv[2])
