"""The peer: GPTQ by GPTQModel on the same model and calibration windows, for ``compare``'s ``gptq-peer``.

GPTQModel (the ``[peers]`` extra) quantizes and saves a standard GPTQ checkpoint. For evaluation its
weights are decoded exactly (``scale * (code - zero)`` in fp32 by ``pack.dequantize_packed``, the packed
layer's own dequantization, independent of GPTQModel's fp16 CPU kernel) into a plain full-precision copy
of the model, the same way gift-quant's own checkpoints are evaluated, so the comparison is between
quantizers, not kernels.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..config.settings import QuantizeConfig, Runtime
from ..packed.bits import dequantize_packed, unpack_cols
from ..util.errors import GiftQuantError

__all__ = ["dense_from_gptq", "gptq_stored_bits", "quantize_with_gptqmodel"]


def dense_from_gptq(qweight, qzeros, scales, g_idx, bits: int, zero_offset: int) -> torch.Tensor:
    """Dense (out, in) fp32 weight of a GPTQ-format layer; ``zero_offset`` = 1 for format v1 (stores zero-1)."""
    zeros = unpack_cols(qzeros.to(torch.int32), bits, scales.shape[1]).long() + zero_offset  # (G, out)
    return dequantize_packed(qweight.to(torch.int32), scales, zeros, g_idx, bits)


def gptq_stored_bits(in_features: int, out_features: int, bits: int, n_groups: int) -> float:
    """Bits per weight of a GPTQ-format layer: codes, fp16 scales, packed zeros (always stored), g_idx."""
    from ..packed.qlinear import effective_bits

    return effective_bits(in_features, out_features, bits, n_groups, 0, sym=False)


def quantize_with_gptqmodel(src: Path, out: Path, qcfg: QuantizeConfig, runtime: Runtime = Runtime()):
    """(plain fp32 model holding GPTQModel's dequantized weights, effective bits); checkpoint saved in ``out``."""
    # GPTQModel's thread pool asks for 2 loader workers but grants (cores + 1) // 2 CPU workers, so it
    # refuses to start on a 2-core machine unless told; its pack extension is a 30 s C++ build we skip
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 1)))
    os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")
    try:
        from gptqmodel import GPTQModel
        from gptqmodel.quantization.config import QuantizeConfig as PeerConfig
    except ImportError as exc:
        raise GiftQuantError("gptq-peer needs GPTQModel: pip install 'gift-quant[peers]'") from exc
    from safetensors import safe_open

    from ..model.loading import load_model, load_tokenizer, resolve_device
    from ..workflows.stages import calibration_set

    if qcfg.salient not in (None, 0) or (qcfg.salient is None and qcfg.salient_fraction):
        raise GiftQuantError("gptq-peer is plain GPTQ: call it with K = 0 salient columns")
    windows = calibration_set(load_tokenizer(src), qcfg)
    device = resolve_device(runtime.device)
    # act_group_aware (GPTQModel's default group-aware reordering) off: gift-quant's GPTQ has no such step,
    # and it refuses per-row grids; the settings otherwise match tools/bench_gptq.py's like-for-like pairing
    peer_cfg = PeerConfig(bits=qcfg.bits, group_size=qcfg.group_size, sym=qcfg.sym, desc_act=qcfg.act_order,
                          act_group_aware=False,
                          static_groups=qcfg.static_groups, true_sequential=True, damp_percent=qcfg.damp,
                          mse=2.0 if qcfg.clip == "mse" else 0.0,  # 2.0: the squared-error clip search
                          device=str(device), offload_to_disk=False)
    out = Path(out)
    if not (out / "quantize_config.json").is_file():
        model = GPTQModel.load(str(src), peer_cfg, dtype=torch.float32)
        model.quantize([{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in windows],
                       batch_size=1)
        model.save(str(out))
        del model
    saved = json.loads((out / "quantize_config.json").read_text())
    zero_offset = 0 if saved.get("checkpoint_format") == "gptq_v2" else 1
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            tensors.update({k: fh.get_tensor(k) for k in fh.keys()})
    plain = load_model(src, torch.float32)
    num = den = 0.0
    for key in (k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")):
        linear = plain.get_submodule(key)
        o, i = linear.weight.shape
        w = dense_from_gptq(tensors[f"{key}.qweight"], tensors[f"{key}.qzeros"], tensors[f"{key}.scales"],
                            tensors[f"{key}.g_idx"], qcfg.bits, zero_offset)
        with torch.no_grad():
            linear.weight.copy_(w)
        num += gptq_stored_bits(i, o, qcfg.bits, tensors[f"{key}.scales"].shape[0]) * i * o
        den += i * o
    if not den:
        raise GiftQuantError(f"{out}: GPTQModel saved no quantized layers")
    return plain, num / den
