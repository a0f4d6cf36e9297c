"""Shared pytest fixtures."""

import torch

# ``pytest -n 2`` runs two workers on a 2-core machine: one torch thread each. With two threads per worker the
# thread pools spin against each other (measured: a small LDDMM fit 16 s instead of 1.3 s under load).
torch.set_num_threads(1)
