import os
import sys
from pathlib import Path

import torch

# tests/ holds helper modules (models.py, tiny_tokenizer.py) imported by name.
sys.path.insert(0, str(Path(__file__).parent))

# Without a GPU, Triton kernels run in the interpreter. Set it before anything
# imports triton, so every kernel module sees one consistent setting.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
