"""The full-precision perplexity, cached: it depends only on the source model and what is evaluated.

Every ``recover`` run reports the source model's perplexity beside its own, and computing it is a full
evaluation pass (about a minute for the default model on a CPU). The result is kept in
``cache_dir()/perplexity/`` under a key of everything it depends on: the model's fingerprint (its config
and weight files), the exact evaluation tokens (data, window length, window count and tokenizer all end
up in them), the compute dtype and device type, and the protocol version below. Like every other cached
file it is trusted only when it matches the sha256 recorded beside it after it was written; a missing,
damaged or unrecorded entry is recomputed and written again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

from ..data.windows import fingerprint_tokens
from ..util.files import atomic_write_text, cache_dir, sha256_file
from .perplexity import perplexity

# eval/perplexity.py's protocol; bump it when the protocol changes so earlier cached results are not used
PROTOCOL = 1

__all__ = ["PROTOCOL", "cache_key", "cached_perplexity"]


def cache_key(model_fingerprint: str, windows: torch.Tensor, dtype: torch.dtype, device: torch.device) -> str:
    fields = {"model": model_fingerprint, "windows": fingerprint_tokens(windows), "shape": list(windows.shape),
              "dtype": str(dtype), "device": torch.device(device).type, "protocol": PROTOCOL}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def _paths(key: str) -> tuple[Path, Path]:
    folder = cache_dir() / "perplexity"
    return folder / f"{key}.json", folder / f"{key}.sha256"


def _read(key: str) -> dict | None:
    doc, digest = _paths(key)
    try:
        if sha256_file(doc) != digest.read_text().strip():
            return None
        return json.loads(doc.read_text())
    except (OSError, ValueError):
        return None


def _write(key: str, result: dict) -> None:
    doc, digest = _paths(key)
    atomic_write_text(doc, json.dumps(result))
    atomic_write_text(digest, sha256_file(doc) + "\n")  # recorded after the file is complete


def cached_perplexity(model: Callable[[], torch.nn.Module], model_fingerprint: str, windows: torch.Tensor,
                      dtype: torch.dtype, device: torch.device, progress: bool = True,
                      desc: str = "perplexity") -> dict:
    """``perplexity`` of the model ``model()`` loads, from the cache when an entry for the same inputs is intact.

    ``model`` is only called on a miss, so a hit loads nothing. The result says where it came from
    (``cached``: the file, or None when computed now).
    """
    key = cache_key(model_fingerprint, windows, dtype, device)
    hit = _read(key)
    if hit is not None:
        return {**hit, "cached": str(_paths(key)[0])}
    result = perplexity(model().to(device), windows, device, progress=progress, desc=desc)
    _write(key, result)
    return {**result, "cached": None}
