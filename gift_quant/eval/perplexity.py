"""Perplexity over consecutive non-overlapping windows (the GPTQ-paper protocol)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

__all__ = ["perplexity"]


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, device: torch.device | str = "cpu", progress: bool = True,
               desc: str = "perplexity") -> dict:
    """exp(mean token NLL) over all next-token predictions of all windows (each window scored alone)."""
    model.eval()
    window_nll = []  # mean token NLL of each window: lets two models be compared window by window
    for row in tqdm(windows, desc=desc, unit="window", disable=not progress):
        ids = row.unsqueeze(0).to(device)
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        window_nll.append(float(F.cross_entropy(logits, ids[0, 1:], reduction="mean")))
    nll = sum(window_nll) / len(window_nll)  # equal-length windows: the mean over all tokens
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": len(window_nll) * (windows.shape[1] - 1),
            "windows": int(windows.shape[0]), "seq_len": int(windows.shape[1]), "window_nll": window_nll}
