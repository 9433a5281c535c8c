"""gift-quant: GIFT-SW quantization recovery for Hugging Face causal LMs.

    import gift_quant
    model, tokenizer = gift_quant.load("runs/smollm2-w3"), gift_quant.load_tokenizer("runs/smollm2-w3")
"""

from __future__ import annotations


def load(path, device="cpu", dtype=None, trust_remote_code: bool = False, dense_cache: bool = True):
    """A model ready for inference (KV cache on) from a gift-quant output or a plain Hugging Face model folder.

    A checkpoint of ``quantize``/``recover`` loads with its packed layers (gift_quant.packed.checkpoint.load); the
    merged folder of ``finetune`` or any model folder loads with transformers.

    ``dense_cache``: a packed layer dequantizes once and keeps the dense weight (as fast as the full-precision
    model, and as large plus the packed buffers). ``False`` keeps only the packed buffers and dequantizes each
    layer at every forward pass: a fraction of the memory, slower decoding (BENCHMARKS.md, "Decode speed").
    Plain model folders are unaffected.
    """
    import torch

    from .packed.any_model import load_any
    from .packed.qlinear import QuantLinear

    model = load_any(str(path), dtype=dtype or torch.float32, device=device, trust_remote_code=trust_remote_code)[0]
    if dtype is not None:
        model = model.to(dtype)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.cache_dense, m._dense = bool(dense_cache), None
    return model


def load_tokenizer(path, trust_remote_code: bool = False):
    """The tokenizer saved beside a gift-quant output (or in a model folder)."""
    from pathlib import Path

    from .model.loading import load_tokenizer as _load

    return _load(Path(path), trust_remote_code)


__all__ = ["load", "load_tokenizer"]
