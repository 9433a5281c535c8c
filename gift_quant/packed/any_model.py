"""Load whatever gift-quant can evaluate: a gift-quant checkpoint or a plain Hugging Face model folder."""

from __future__ import annotations

from pathlib import Path

import torch

from ..model.loading import enable_kv_cache, load_model, load_tokenizer, resolve_model_dir
from ..util.errors import GiftQuantError
from .checkpoint import is_checkpoint, load, read_gift_config
from .run_folder import RUN_DIR, RUN_FILE


def load_any(path: str | None, dtype: torch.dtype = torch.float32, device="cpu", trust_remote_code=False):
    """(model, tokenizer, effective bits, description) for a gift checkpoint or a plain model folder."""
    if path is not None and is_checkpoint(path):
        doc = read_gift_config(Path(path))
        model = load(path, device=device, trust_remote_code=trust_remote_code)
        bits = doc.get("effective_bits", float("nan"))  # optional in a hand-made config
        return model, load_tokenizer(Path(path), trust_remote_code), bits, "gift-quant checkpoint"
    finished_finetune = path is not None and (Path(path) / "finetune_summary.json").is_file()
    if path is not None and (Path(path) / RUN_DIR / RUN_FILE).is_file() and not finished_finetune:
        raise GiftQuantError(f"{path} is an unfinished gift-quant run: rerun the same command to finish it")
    src = resolve_model_dir(path)
    model = load_model(src, dtype, trust_remote_code).to(device)
    enable_kv_cache(model, src)  # inference: generate() with the KV cache
    return model, load_tokenizer(src, trust_remote_code), float(torch.finfo(dtype).bits), "full-precision model"
