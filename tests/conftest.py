"""Shared test set-up: aqlm imports without torch.jit, numba pinned where aqlm's own kernels are compared."""

import os

os.environ.setdefault("AQ_USE_JIT", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
