import os
import tempfile

# Tests run tiny models: intra-op threads only spin against each other (and against other processes) on
# the 2-core CI machine, so every test and every subprocess it starts uses one thread.
os.environ["OMP_NUM_THREADS"] = "1"
# Dataset indexes and demo files of the tests go to a fresh folder, never the user's ~/.cache/fastreg.
os.environ["FASTREG_CACHE"] = tempfile.mkdtemp(prefix="fastreg-test-cache-")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


collect_ignore = ["interpret"]  # run by test_kernels.py in a process with TRITON_INTERPRET=1
