"""Perplexity over consecutive non-overlapping windows (the GPTQ-paper protocol)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, device: torch.device | str = "cpu", progress: bool = True,
               desc: str = "perplexity") -> dict:
    """exp(mean token NLL) over all next-token predictions of all windows (each window scored alone)."""
    model.eval()
    total_nll = 0.0
    count = 0
    for row in tqdm(windows, desc=desc, unit="window", disable=not progress):
        ids = row.unsqueeze(0).to(device)
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        total_nll += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return {"perplexity": math.exp(total_nll / count), "nll": total_nll / count, "tokens": count,
            "windows": int(windows.shape[0]), "seq_len": int(windows.shape[1])}
