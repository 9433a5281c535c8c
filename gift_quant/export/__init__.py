"""Exports of a native gift-quant checkpoint to formats that other tools load without gift-quant.

One module per format, all reading the checkpoint through ``native.NativeCheckpoint`` (its layers are
``QuantLinear`` modules, so each format dequantizes exactly as ``gift_quant.load`` computes) and
writing through ``folder.write_export``:

* ``gptq.py``, ``export_gptq_lora``: a standard GPTQ checkpoint of the non-salient part (transformers +
  optimum + gptqmodel, GPTQModel, vLLM) plus the LoRA adapter in ``adapter/``;
* ``compressed_tensors.py``, ``export_compressed_tensors``: the non-salient part as compressed-tensors
  ``pack-quantized`` linears (vLLM's WNA16 path, transformers) plus the same adapter;
* ``dense.py``, ``export_dense``: the merged full-precision model, an ordinary Hugging Face folder;
* ``gguf.py``, ``export_gguf``: llama.cpp's GGUF (Q4_0 / Q8_0 / Q4_1 blocks, exact) plus a LoRA GGUF;
* ``adapter.py``: the one-hot PEFT LoRA adapter that adds the salient columns back (also written by
  ``finetune``).

``export`` is the command line's entry point.
"""

from __future__ import annotations

from pathlib import Path

from ..util.errors import GiftQuantError
from .adapter import ADAPTER_DIR, LORA_RANKS, SalientAdapter, lora_rank, write_adapter
from .compressed_tensors import (
    CT_FORMAT,
    CT_VERSION,
    CTLayer,
    ct_layer,
    ct_quantization_config,
    ct_refusal,
    export_compressed_tensors,
)
from .dense import export_dense
from .folder import EXPORT_INFO
from .gguf import export_gguf
from .gptq import GPTQ_GROUP_SIZES, GPTQLayer, check_gptq_representable, export_gptq_lora, gptq_layer
from .native import NativeCheckpoint


def choose_format(nat: NativeCheckpoint) -> tuple[str, str]:
    """(format, why): compressed-tensors whenever it carries the checkpoint exactly (what vLLM serves at every bit
    width 2-8 on GPUs, at 4 bits on CPUs), else gptq-lora (GPTQ's g_idx carries compact groups), else dense."""
    refusal = ct_refusal(nat)
    if refusal is None:
        return "compressed-tensors", ("it carries every layer exactly; vLLM serves it at 2-8 bits on GPUs and at "
                                      "4 bits on CPUs (bfloat16)")
    try:
        check_gptq_representable(nat)
    except GiftQuantError as exc:
        return "dense", f"neither compressed-tensors ({refusal}) nor GPTQ ({exc}) carries it"
    return "gptq-lora", f"compressed-tensors cannot carry it: {refusal}"


FORMATS = ("gptq-lora", "compressed-tensors", "dense", "gguf")

__all__ = [
    "ADAPTER_DIR", "CT_FORMAT", "CT_VERSION", "EXPORT_INFO", "FORMATS", "GPTQ_GROUP_SIZES", "LORA_RANKS", "CTLayer",
    "GPTQLayer", "NativeCheckpoint", "SalientAdapter", "choose_format", "ct_layer", "ct_quantization_config", "export",
    "export_compressed_tensors", "export_dense", "export_gguf", "export_gptq_lora", "gptq_layer", "lora_rank",
    "write_adapter",
]


def export(ckpt: str | Path, out_dir: str | Path, fmt: str = "auto", dtype: str | None = None,
           checkpoint_format: str = "auto", overwrite: bool = False) -> dict:
    """The CLI's entry point: ``fmt`` is one of FORMATS, or ``auto`` (``choose_format``)."""
    if fmt == "auto":
        fmt, why = choose_format(NativeCheckpoint(ckpt))
        summary = export(ckpt, out_dir, fmt, dtype=dtype, checkpoint_format=checkpoint_format, overwrite=overwrite)
        return {**summary, "chosen_because": why}
    if fmt == "gptq-lora":
        return export_gptq_lora(ckpt, out_dir, dtype=dtype, checkpoint_format=checkpoint_format, overwrite=overwrite)
    if fmt == "compressed-tensors":
        return export_compressed_tensors(ckpt, out_dir, dtype=dtype, overwrite=overwrite)
    if fmt == "dense":
        return export_dense(ckpt, out_dir, dtype=dtype, overwrite=overwrite)
    if fmt == "gguf":
        return export_gguf(ckpt, out_dir, dtype=dtype, overwrite=overwrite)
    raise GiftQuantError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
