"""Lanes: the sequences of a micro-batch split into parts whose forward and backward passes run in parallel
threads of one process, on one shared model.

Why: a training step is thousands of tensor operations. Splitting each operation between cores (torch's
intra-op threads) synchronises the cores thousands of times a step, and on a machine where other processes
also run, every one of those waits for a core that is busy elsewhere: there two intra-op threads measured
slower than one (BENCHMARKS.md, "One distillation step"). Lanes meet once per micro-batch: each runs the
student, the teacher and the loss of its own sequences with one thread, the way data-parallel processes do,
but in one process, so the model, the teacher and the kept noisy weights (recover/caches.py) exist once.

The math is fixed by the number of lanes, never by how many run at once: lane i's parts of the micro-batch
(``torch.tensor_split`` of its sequences) give its loss (a mean over its counted tokens) weighted by its
share of the micro-batch's counted tokens, so the lanes' losses add up to the micro-batch's mean; every
lane draws the micro-batch's noise (one noise key), as the micro-batch does in one pass; its gradients are
taken with ``torch.autograd.grad`` and added up in lane order. One worker or two, on any machine, give the
same bits (tests/test_train_caches.py). Against the one-pass micro-batch (``cpu_lanes: 1``) the result
differs in rounding only: the gradient's sums over tokens are grouped by lane.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from ..util.precision import Precision, autocast
from .objective import IGNORE, Objective, Teacher, objective_loss

__all__ = ["Lanes"]

_FP32 = Precision("fp32", "the default")


class Lanes:
    """``lanes`` parts per micro-batch, run by ``workers`` threads (1: one after the other in this thread)."""

    def __init__(self, lanes: int, workers: int):
        self.lanes, self.workers = lanes, max(1, min(workers, lanes))
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="gift-lane") if self.workers > 1 else None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None

    def backward(self, model, ids: torch.Tensor, labels: torch.Tensor, objective: Objective,
                 teacher: Teacher | None, params: list[torch.Tensor], scale: float, check: bool,
                 precision: Precision | None = None) -> tuple[float, dict]:
        """Add ``scale`` x the gradient of the micro-batch's loss to ``params``' ``.grad``; its loss and parts.

        ``precision`` bf16: each lane's forward pass and loss under bf16 autocast, which each lane's thread
        enters itself (autocast's state is per thread); None or fp32: float32 throughout.
        """
        parts = [p for p in torch.tensor_split(torch.arange(len(ids)), self.lanes) if len(p)]
        counted = [int((labels[p][:, 1:] != IGNORE).sum()) for p in parts]
        total = max(sum(counted), 1)

        def run(i: int):
            rows = parts[i].to(ids.device)
            with autocast(precision or _FP32, ids.device):  # this thread's own autocast state; backward outside it
                loss, got = objective_loss(model, ids[rows], labels[rows], objective, teacher, check=check and i == 0)
            share = counted[i] / total
            grads = torch.autograd.grad(loss * (share * scale), params, allow_unused=True)
            return float(loss.detach()) * share, {k: got[k] * share for k in ("ce", "kd")}, grads

        results = list(self.pool.map(run, range(len(parts)))) if self.pool else [run(i) for i in range(len(parts))]
        with torch.no_grad():
            for j, p in enumerate(params):
                g = None
                for _, _, grads in results:  # lane order: the sum does not depend on which lane finished first
                    if grads[j] is not None:
                        g = grads[j].clone() if g is None else g.add_(grads[j])
                if g is not None:
                    p.grad = g if p.grad is None else p.grad.add_(g)
        loss = sum(r[0] for r in results)
        return loss, {k: sum(r[1][k] for r in results) for k in ("ce", "kd")}
