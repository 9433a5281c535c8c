"""Load whatever gift-quant can evaluate: a gift-quant checkpoint, an export of one, or a plain model folder.

What is scored is what would be served: a checkpoint with its packed layers (after the one integrity check),
an export as its real clients load it (served.py: base plus salient adapter), a plain folder with
transformers; the bits reported are those stored on disk, measured from the tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..model.loading import enable_kv_cache, load_model, load_tokenizer, resolve_model_dir
from ..util.errors import GiftQuantError
from .checkpoint import is_checkpoint, load, verify_checkpoint
from .run_folder import RUN_DIR, RUN_FILE
from .served import dense_bits, load_served, served_kind

__all__ = ["evaluable", "load_any"]


def evaluable(path: str | None) -> tuple[Path, str]:
    """(folder, what it is) of an eval target; refuses, with the reason, a folder eval cannot score
    faithfully. Loads nothing, so a bad target is refused before any model is built."""
    if path is not None and is_checkpoint(path):
        return Path(path), "gift-quant checkpoint"
    finished_finetune = path is not None and (Path(path) / "finetune_summary.json").is_file()
    if path is not None and (Path(path) / RUN_DIR / RUN_FILE).is_file() and not finished_finetune:
        raise GiftQuantError(f"{path} is an unfinished gift-quant run: rerun the same command to finish it")
    kind = served_kind(Path(path)) if path is not None and Path(path).is_dir() and not finished_finetune else None
    src = resolve_model_dir(path)
    if finished_finetune:
        return src, "finetune output (merged)"
    return src, kind or "full-precision model"


def load_any(path: str | None, dtype: torch.dtype = torch.float32, device="cpu", trust_remote_code=False,
             verified=None):
    """(model, tokenizer, stored bits per weight, description) for anything ``evaluable`` accepts
    (``verified``: integrity.verify_checkpoint's result for a checkpoint, when the caller ran it)."""
    src, kind = evaluable(path)
    if kind == "gift-quant checkpoint":
        verified = verified or verify_checkpoint(src, trust_remote_code)  # the one check every reader runs
        model = load(src, device=device, trust_remote_code=trust_remote_code, verified=verified)
        # bits measured from the stored tensors, not the config's record (which its own sha256 does not cover)
        return model, load_tokenizer(src, trust_remote_code), verified.effective_bits, kind
    if kind.startswith(("gptq", "compressed-tensors")):
        model, bits, kind = load_served(src, dtype, device)
        enable_kv_cache(model, src)
        return model, load_tokenizer(src, trust_remote_code), bits, kind
    model = load_model(src, dtype, trust_remote_code).to(device)
    enable_kv_cache(model, src)  # inference: generate() with the KV cache
    bits = dense_bits(src) or float(torch.finfo(dtype).bits)
    return model, load_tokenizer(src, trust_remote_code), bits, kind
