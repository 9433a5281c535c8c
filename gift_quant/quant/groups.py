"""Which quantization group each input column belongs to, and when each group's grid is fitted. Pure code.

Two layouts for ``group_size = g`` (per-row grids have one group and no layout question):

* ``natural`` (default): column ``j`` is in group ``j // g`` in the original column order, salient or not.
  A group's grid is fitted on its *non-salient* columns only; salient columns store the group's zero
  point, so the quantized part is exactly 0 there. Groups are contiguous column runs, which is the one
  layout formats without a ``g_idx`` can carry (compressed-tensors ``pack-quantized``, GGUF blocks,
  vLLM's WNA16 kernels). Under act-order the processing is permuted but the groups stay natural, so the
  grids are fitted upfront from the original weights (GPTQ's "static groups").
* ``compact``: groups are runs of ``g`` consecutive *non-salient* columns in processing order (salient
  columns are skipped, and filed in the last group). Every group then has exactly ``g`` rounded columns,
  at the price of a ``g_idx`` that only GPTQ-format clients read.

Grids are fitted lazily (when GPTQ reaches a group's first column, from the error-updated weights, as
the GPTQ reference does) whenever a group's columns are consecutive in processing order; otherwise
(``static_groups``, natural groups under act-order) upfront from the original weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config.settings import GROUP_LAYOUTS

__all__ = ["GroupPlan", "plan_groups"]


@dataclass
class GroupPlan:
    g_idx: torch.Tensor  # (in,) int32: group of each input column
    n_groups: int
    upfront: bool  # fit every grid before GPTQ starts (else lazily at each group's first processed column)

    def fitted_columns(self, group: int, is_salient: torch.Tensor) -> torch.Tensor:
        """The non-salient columns (natural order) whose values decide ``group``'s grid."""
        return torch.nonzero((self.g_idx == group) & ~is_salient.to(self.g_idx.device)).squeeze(1)

    def first_positions(self, order: torch.Tensor, n_rounded: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For lazy fitting: per processing position, its group, and the group's size if it starts there (else 0)."""
        g_pos = self.g_idx[order[:n_rounded]].long()
        starts = torch.ones(n_rounded, dtype=torch.bool, device=g_pos.device)
        starts[1:] = g_pos[1:] != g_pos[:-1]
        sizes = torch.bincount(g_pos, minlength=self.n_groups)
        if int(starts.sum()) != int((sizes > 0).sum()):  # a group split across the processing order
            raise AssertionError("lazy grid fitting needs each group's columns consecutive in processing order")
        return g_pos, torch.where(starts, sizes[g_pos], torch.zeros_like(g_pos))


def plan_groups(order: torch.Tensor, n_rounded: int, group_size: int, layout: str,
                act_order: bool, static_groups: bool) -> GroupPlan:
    """The group plan for a layer whose columns GPTQ processes in ``order`` (its first ``n_rounded`` are rounded).

    ``order`` is the processing order (non-salient columns, then the salient ones).
    """
    if layout not in GROUP_LAYOUTS:
        raise ValueError(f"group layout must be one of {', '.join(GROUP_LAYOUTS)} (got {layout!r})")
    in_f, dev = order.numel(), order.device
    span = in_f if layout == "natural" else n_rounded
    if group_size <= 0 or group_size >= span:  # one grid per row
        return GroupPlan(torch.zeros(in_f, dtype=torch.int32, device=dev), 1, upfront=True)
    n_groups = -(-span // group_size)
    if layout == "natural":
        g_idx = (torch.arange(in_f, device=dev) // group_size).to(torch.int32)
        return GroupPlan(g_idx, n_groups, upfront=static_groups or act_order)
    g_idx = torch.full((in_f,), n_groups - 1, dtype=torch.int32, device=dev)
    if static_groups:  # runs of non-salient columns in natural order, fitted before act-order permutes them
        rest = order[:n_rounded].sort().values
    else:
        rest = order[:n_rounded]
    g_idx[rest] = (torch.arange(n_rounded, device=dev) // group_size).to(torch.int32)
    return GroupPlan(g_idx, n_groups, upfront=static_groups)
