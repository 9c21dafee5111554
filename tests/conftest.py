import os
import sys
from pathlib import Path

import pytest
import torch

# tests/ holds helper modules (models.py, tiny_tokenizer.py) imported by name.
sys.path.insert(0, str(Path(__file__).parent))

# Without a GPU, Triton kernels run in the interpreter. Set it before anything
# imports triton, so every kernel module sees one consistent setting.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module on one torch thread, then restore the setting. Modules of tiny matmuls opt in
    (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`): on a busy shared CPU a second
    OpenMP thread only spins (measured 20-40x slower, e.g. RTN quantization under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
