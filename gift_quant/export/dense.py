"""Dense export: the merged full-precision model (salient columns in place) as an ordinary Hugging Face folder.

Loads with ``AutoModelForCausalLM.from_pretrained`` and serves anywhere (vLLM, TGI, llama.cpp conversion
...), at full-precision size; the fallback for whatever the quantized formats cannot carry.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .folder import cast_tensors, check_out, dtype_name, resolve_dtype, write_export
from .native import NativeCheckpoint

__all__ = ["export_dense"]


def export_dense(ckpt: str | Path, out_dir: str | Path, dtype: str | torch.dtype | None = None,
                 overwrite: bool = False) -> dict:
    """The merged model (dequantized weights with the salient columns in place) as a plain HF folder.

    ``dtype``: of every floating tensor; default the checkpoint's compute dtype (the source model's).
    """
    nat = NativeCheckpoint(ckpt)
    out_dir = Path(out_dir)
    dtype = resolve_dtype(dtype, nat.dtype)
    check_out(out_dir, nat.path, overwrite)
    tensors = dict(nat.other_tensors())
    for name, q in nat.layers.items():
        tensors[f"{name}.weight"] = q.dense_weight(dtype)  # cast now: one float32 layer at a time
        if q.bias is not None:
            tensors[f"{name}.bias"] = q.bias
    tensors = cast_tensors(tensors, nat, dtype)
    params = sum(v.numel() for v in tensors.values())
    summary = {"out": str(out_dir), "format": "dense", "dtype": dtype_name(dtype), "parameters": params}
    write_export(out_dir, nat, summary, tensors, dtype)
    return summary
