"""gift-quant: GIFT-SW quantization recovery for Hugging Face causal LMs.

    import gift_quant
    model, tokenizer = gift_quant.load("runs/smollm2-w3"), gift_quant.load_tokenizer("runs/smollm2-w3")
"""

from __future__ import annotations


def load(path, device="cpu", dtype=None, trust_remote_code: bool = False):
    """A model ready for inference (KV cache on) from a gift-quant output or a plain Hugging Face model folder.

    A checkpoint of ``quantize``/``recover`` loads with its packed layers (gift_quant.packed.checkpoint.load); the
    merged folder of ``finetune`` or any model folder loads with transformers.
    """
    import torch

    from .packed.any_model import load_any

    model = load_any(str(path), dtype=dtype or torch.float32, device=device, trust_remote_code=trust_remote_code)[0]
    if dtype is not None:
        model = model.to(dtype)
    return model


def load_tokenizer(path, trust_remote_code: bool = False):
    """The tokenizer saved beside a gift-quant output (or in a model folder)."""
    from pathlib import Path

    from .model.loading import load_tokenizer as _load

    return _load(Path(path), trust_remote_code)


__all__ = ["load", "load_tokenizer"]
