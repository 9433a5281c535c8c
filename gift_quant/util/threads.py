"""CPU thread count for small-op loops.

GPTQ's column loop and the clip search are thousands of small tensor ops; on CPU, OpenMP
synchronisation across threads costs more than it saves (measured: a 1536x576 GPTQ took 1.2 s
with one thread and 20x longer with two on a busy 2-core machine). Large matmuls keep all threads.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["cpu_threads"]


@contextlib.contextmanager
def cpu_threads(n: int, active: bool = True):
    if not active:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
