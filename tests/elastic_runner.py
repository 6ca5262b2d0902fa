"""tests/fault_runner.py with its fault on torchrun's first attempt only: the worker group that torchrun
restarts (--max-restarts) runs unfaulted, so it resumes and finishes instead of dying at the same step again.

    torchrun --max-restarts=1 ... -- tests/elastic_runner.py --at-step N --rank R -- <hydra overrides>
"""

import os
import runpy
import sys
from pathlib import Path

if os.environ["TORCHELASTIC_RESTART_COUNT"] != "0":
    sys.argv = [sys.argv[0], *sys.argv[sys.argv.index("--") :]]  # fault_runner's options dropped
runpy.run_path(str(Path(__file__).with_name("fault_runner.py")), run_name="__main__")
