"""GPTQ + LoRA export: a standard GPTQ checkpoint of the non-salient part plus the salient-column adapter.

The base loads in transformers (optimum + gptqmodel kernels), GPTQModel and vLLM; the PEFT LoRA adapter in
``adapter/`` adds the salient columns back (see adapter.py), so base + adapter compute what
``gift_quant.load`` computes.

Why the GPTQ part is written with ``desc_act = true`` when there are salient columns: our groups are
runs of consecutive *non-salient* columns, so column j's group is not ``j // group_size``. The GPTQ
format names an arbitrary group per input column only through ``g_idx``, and loaders honour ``g_idx``
only in the act-order layout; without ``desc_act`` kernels may assume ``j // group_size`` (Marlin,
ExLlama) and dequantize with the wrong scales. The export also re-files every salient column into a
group with spare room (its code set to that group's zero point, so the base still holds exactly 0
there): every group then has exactly ``group_size`` columns but the last, the shape GPTQ act-order
produces and act-order kernels assume (gptqmodel's CPU int4 kernel, for one, builds its column
permutation from that assumption).

Zero points: GPTQ v1 (``checkpoint_format: gptq``, what vLLM's Marlin path and most tools read)
stores ``zero - 1``, so it cannot hold a zero point of 0, which asymmetric grids produce for groups
without negative weights. Such checkpoints are written as ``gptq_v2`` (the zero itself), unless the
caller insists on v1, which then fails with a message naming the formats that can carry it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..model.arch import model_linears
from ..packed.bits import dequantize_packed, pack_cols, pack_rows, packed_words
from ..packed.qlinear import QuantLinear
from ..util.errors import GiftQuantError
from .adapter import SalientAdapter, lora_rank
from .folder import cast_tensors, check_out, dtype_name, resolve_dtype, write_export
from .native import NativeCheckpoint, layer_codes, layer_zeros

__all__ = ["GPTQ_GROUP_SIZES", "ROW_GROUP_SIZES", "GPTQLayer", "check_gptq_representable", "export_gptq_lora",
           "gptq_layer", "row_group_size", "target_modules"]

GPTQ_GROUP_SIZES = (16, 32, 64, 128, 256, 512, 1024)  # what gptqmodel's kernels load, besides -1
# A per-row grid is written as groups of one of these (its one scale repeated in every group), the largest
# that divides every layer's in_features: the group sizes that both gptqmodel's CPU int4 kernel (torch's
# _weight_int4pack_mm_for_cpu: 32, 64, 128, 256) and the GPU kernels (Marlin, ExLlama: -1, 32, 64, 128) run.
# Group -1 (one group of in_features columns) fails the CPU int4 kernel for in_features 576 (SmolLM2).
ROW_GROUP_SIZES = (128, 64, 32)
_GPTQ_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx", "bias")  # GPTQ layers keep these in their own dtypes


@dataclass
class GPTQLayer:
    """One layer in GPTQ terms. ``zeros`` are the unpacked zero points (groups, out)."""

    bits: int
    qweight: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    trivial_g_idx: bool  # g_idx == j // group_size: exact without desc_act

    def dequantized(self, columns: torch.Tensor | None = None) -> torch.Tensor:
        """The base as a GPTQ kernel dequantizes it, (out, in) or (out, len(columns)), float32."""
        return dequantize_packed(self.qweight, self.scales, self.zeros, self.g_idx, self.bits, columns)


def gptq_layer(name: str, q: QuantLinear, group_size: int) -> GPTQLayer:
    """The GPTQ tensors of layer ``name`` with group size ``group_size`` (-1: one group per row).

    Non-salient columns keep their group, scale, zero and code. Salient columns are re-filed, in
    ascending order, into the groups with spare room (the last real group first, then padding groups
    beyond it) and take that group's zero point as their code, so the base is exactly 0 there.
    """
    in_f, out_f = q.in_features, q.out_features
    gs = in_f if group_size <= 0 else group_size
    n_groups = -(-in_f // gs)
    if q.n_groups == 1 and n_groups > 1:
        return _per_row_as_groups(q, gs)
    if q.n_groups > n_groups:
        raise GiftQuantError(
            f"{name}: {q.n_groups} quantization groups do not fit GPTQ's {n_groups} groups of {gs} columns; "
            "export the merged model (--format dense) instead")
    codes = layer_codes(q)  # (in, out)
    zeros = layer_zeros(q)
    scales = q.scales.to(torch.float16)
    g_idx = q.g_idx.long().clone()
    salient = q.salient_idx.long().sort().values
    is_salient = torch.zeros(in_f, dtype=torch.bool)
    is_salient[salient] = True
    fill = torch.bincount(g_idx[~is_salient], minlength=n_groups)
    if (fill > gs).any():
        raise GiftQuantError(
            f"{name}: a quantization group holds {int(fill.max())} columns, more than the group size {gs} "
            "GPTQ allows; export the merged model (--format dense) instead")
    pad = n_groups - q.n_groups
    if pad:  # unused by non-salient columns: scale 1, zero mid-range (>= 1, so GPTQ v1 stores it)
        scales = torch.cat([scales, torch.ones(pad, out_f, dtype=scales.dtype)])
        zeros = torch.cat([zeros, torch.full((pad, out_f), 2 ** (q.bits - 1), dtype=zeros.dtype)])
    g = 0
    for j in salient.tolist():
        while fill[g] >= gs:
            g += 1
        g_idx[j], fill[g] = g, fill[g] + 1
        codes[j] = zeros[g]
    qweight = pack_rows(codes, q.bits)[: packed_words(in_f, q.bits)].contiguous()
    return GPTQLayer(bits=q.bits, qweight=qweight, zeros=zeros, scales=scales.contiguous(),
                     g_idx=g_idx.to(torch.int32), trivial_g_idx=bool(torch.equal(g_idx, torch.arange(in_f) // gs)))


def _per_row_as_groups(q: QuantLinear, gs: int) -> GPTQLayer:
    """A per-row grid as GPTQ groups of ``gs`` columns (``gs`` divides in_features), each group holding the
    row's one scale and zero: the same dequantized weight, in a group size every kernel runs."""
    n_groups = q.in_features // gs
    codes = layer_codes(q)
    zeros = layer_zeros(q).expand(n_groups, -1).contiguous()
    codes[q.salient_idx.long()] = zeros[0]  # the base holds exactly 0 at the salient columns (already so)
    g_idx = torch.arange(q.in_features) // gs
    return GPTQLayer(bits=q.bits, qweight=pack_rows(codes, q.bits)[: packed_words(q.in_features, q.bits)].contiguous(),
                     zeros=zeros, scales=q.scales.to(torch.float16).expand(n_groups, -1).contiguous(),
                     g_idx=g_idx.to(torch.int32), trivial_g_idx=True)


def row_group_size(nat: NativeCheckpoint) -> int:
    """The GPTQ group size a per-row checkpoint is written with (see ROW_GROUP_SIZES), or -1 where none fits.

    -1 is exact too, for the kernels that take it (gptqmodel's TorchLinear at 2/3/8 bits, Marlin); 4-bit has
    no CPU kernel for it beyond 256 columns, so a 4-bit layer that no supported size divides is refused."""
    sizes = [g for g in ROW_GROUP_SIZES if all(q.in_features % g == 0 for q in nat.layers.values())]
    if sizes:
        return sizes[0]
    if nat.bits == 4:
        odd = next(n for n, q in nat.layers.items() if q.in_features % ROW_GROUP_SIZES[-1])
        raise GiftQuantError(
            f"{odd}: in_features {nat.layers[odd].in_features} is not a multiple of 32, so this per-row 4-bit grid "
            "has no GPTQ form that gptqmodel's CPU kernel runs (groups of 32/64/128/256); export with --format "
            "compressed-tensors or --format dense instead")
    return -1


def _pack_zeros(zeros: torch.Tensor, bits: int, v1: bool, out_f: int) -> torch.Tensor:
    return pack_cols(zeros - 1 if v1 else zeros, bits)[:, : packed_words(out_f, bits)].contiguous()


def check_gptq_representable(nat: NativeCheckpoint) -> list[str]:
    """Errors for what GPTQ loaders cannot take; returns warnings for what only some servers refuse."""
    if not nat.layers:
        raise GiftQuantError(f"{nat.path} has no quantized layers to export")
    if nat.bits == 3:
        bad = [n for n, q in nat.layers.items() if q.in_features % 32 or q.out_features % 32]
        if bad:
            raise GiftQuantError(
                f"3-bit GPTQ needs in/out features divisible by 32 ({bad[0]} is not); "
                "export the merged model (--format dense) instead")
    gs = nat.group_size
    warnings = []
    if nat.bits in (2, 3):
        warnings.append(f"{nat.bits}-bit GPTQ loads in transformers/GPTQModel, but current vLLM serves GPTQ only at 4 "
                        "and 8 bits (Marlin; vllm-project/vllm#38288): for vLLM export with --format "
                        "compressed-tensors")
    if gs > 0 and gs not in GPTQ_GROUP_SIZES and any(gs < q.in_features for q in nat.layers.values()):
        raise GiftQuantError(
            f"group_size {gs} is not one GPTQ kernels load ({', '.join(map(str, GPTQ_GROUP_SIZES))} or per-row); "
            "export the merged model (--format dense) instead, or quantize with a supported --group-size")
    if gs > 0:
        odd = [n for n, q in nat.layers.items() if q.in_features % gs]
        if odd:
            warnings.append(f"group_size {gs} does not divide in_features of {odd[0]} ({len(odd)} layers): "
                            "transformers/GPTQModel load it, vLLM refuses such layers")
    # transformers (through optimum) swaps every linear inside the decoder blocks for a GPTQ layer
    expected = set(model_linears(nat.skeleton()))
    if expected != set(nat.layers):
        extra = sorted(expected ^ set(nat.layers))[:3]
        raise GiftQuantError(
            f"the checkpoint's quantized layers are not exactly the linears of the decoder blocks (e.g. {extra}), "
            "which GPTQ loaders assume; export the merged model (--format dense) instead")
    return warnings


def target_modules(nat: NativeCheckpoint) -> list[str]:
    """Short names (q_proj ...) when they select exactly our layers (what vLLM expects), else full names."""
    linear = [n for n, m in nat.skeleton().named_modules() if isinstance(m, torch.nn.Linear)]
    ours = set(nat.layers)
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in ours})
    if {n for n in linear if n.rsplit(".", 1)[-1] in suffixes} == ours:
        return suffixes
    return sorted(ours)


def _checkpoint_format(nat: NativeCheckpoint, requested: str, warnings: list[str]) -> str:
    """``gptq`` or ``gptq_v2`` for ``requested`` (auto, gptq or gptq_v2), given the stored zero points."""
    # padding groups get zero 2^(b-1) >= 1, so only the stored zero points can rule out v1
    has_zero_0 = not nat.sym and any(int(layer_zeros(q).min()) < 1 for q in nat.layers.values())
    if requested == "auto":
        requested = "gptq_v2" if has_zero_0 else "gptq"
    elif requested == "gptq" and has_zero_0:
        raise GiftQuantError(
            "this asymmetric checkpoint has zero points equal to 0, which GPTQ v1 (it stores zero - 1) cannot hold; "
            "export with --checkpoint-format gptq_v2 (GPTQModel, transformers) or --format dense (any server)")
    if requested == "gptq_v2":
        warnings.append("checkpoint_format gptq_v2: GPTQModel and transformers load it, vLLM only through its "
                        "gptq kernel (not Marlin)")
    return requested


def _gptq_tensors(nat: NativeCheckpoint, gs: int, v1: bool, adapter: SalientAdapter) -> tuple[dict, bool]:
    """(every tensor of the base, desc_act); one layer at a time, its unpacked codes live only in gptq_layer."""
    tensors = dict(nat.other_tensors())
    desc_act = False
    for name, q in nat.layers.items():
        g = gptq_layer(name, q, gs)
        desc_act |= not g.trivial_g_idx
        tensors[f"{name}.qweight"] = g.qweight
        tensors[f"{name}.qzeros"] = _pack_zeros(g.zeros, nat.bits, v1, q.out_features)
        tensors[f"{name}.scales"] = g.scales
        tensors[f"{name}.g_idx"] = g.g_idx
        if q.bias is not None:
            tensors[f"{name}.bias"] = q.bias.to(torch.float16)  # GPTQ layers keep their bias in float16
        adapter.add(name, q, g.dequantized(q.salient_idx.long()))
    return tensors, desc_act


def _gptq_quantization_config(nat: NativeCheckpoint, gs: int, desc_act: bool, checkpoint_format: str) -> dict:
    """``quantize_config.json``, also config.json's ``quantization_config``."""
    q = nat.doc["quantize"]
    return {
        "quant_method": "gptq", "bits": nat.bits, "group_size": gs, "desc_act": desc_act, "sym": nat.sym,
        "lm_head": False, "true_sequential": True, "damp_percent": float(q.get("damp", 0.01)),
        "static_groups": bool(q.get("static_groups", False)), "act_group_aware": False,
        "checkpoint_format": checkpoint_format, "format": checkpoint_format, "pack_dtype": "int32",
        "meta": {"quantizer": [f"gift-quant:{nat.doc.get('version', '0')}"]},
    }


def export_gptq_lora(ckpt: str | Path, out_dir: str | Path, dtype: str | torch.dtype | None = None,
                     checkpoint_format: str = "auto", overwrite: bool = False) -> dict:
    """GPTQ base (``out_dir``) + PEFT LoRA adapter (``out_dir/adapter``) equal to the native model.

    ``dtype``: of the unquantized tensors (embeddings, norms, lm_head) and the config's dtype; default
    the checkpoint's compute dtype. vLLM's GPTQ kernels want float16 (Marlin also bfloat16).
    ``checkpoint_format``: ``gptq`` (v1, zero - 1 stored; every GPTQ loader), ``gptq_v2`` (the zero
    itself; GPTQModel, transformers, recent vLLM's gptq kernel) or ``auto`` (v1 unless an asymmetric
    zero point of 0 needs v2). Returns a summary; ``warnings`` lists what some servers will refuse.
    """
    nat = NativeCheckpoint(ckpt)
    out_dir = Path(out_dir)
    dtype = resolve_dtype(dtype, nat.dtype)
    if checkpoint_format not in ("auto", "gptq", "gptq_v2"):
        raise GiftQuantError(f"checkpoint_format must be auto, gptq or gptq_v2 (got {checkpoint_format!r})")
    r = lora_rank(nat.max_salient)
    warnings = check_gptq_representable(nat)
    per_row = nat.group_size <= 0
    gs = row_group_size(nat) if per_row else nat.group_size
    check_out(out_dir, nat.path, overwrite)
    checkpoint_format = _checkpoint_format(nat, checkpoint_format, warnings)

    adapter = SalientAdapter(r, nat.salient_dtype)
    tensors, desc_act = _gptq_tensors(nat, gs, checkpoint_format == "gptq", adapter)
    quant_owned = {f"{n}.{s}" for n in nat.layers for s in _GPTQ_SUFFIXES}
    tensors = cast_tensors(tensors, nat, dtype, keep=quant_owned)
    biases = [q.bias.dtype for q in nat.layers.values() if q.bias is not None]
    if any(d != torch.float16 for d in biases):
        warnings.append("linear biases are stored in float16, as GPTQ layers hold them (rounded from "
                        f"{dtype_name(biases[0])})")
    qcfg = _gptq_quantization_config(nat, gs, desc_act, checkpoint_format)
    targets = target_modules(nat)
    summary = {"out": str(out_dir), "format": "gptq-lora", "bits": nat.bits, "group_size": gs, "sym": nat.sym,
               "desc_act": desc_act, "checkpoint_format": checkpoint_format, "lora_rank": r,
               "per_row_written_as_groups": per_row and gs > 0,
               "max_salient": nat.max_salient, "dtype": dtype_name(dtype), "adapter_dtype": dtype_name(adapter.dtype),
               "target_modules": targets, "warnings": warnings}
    write_export(out_dir, nat, summary, tensors, dtype, qcfg, {"quantize_config.json": json.dumps(qcfg, indent=2)},
                 adapter, targets)
    return summary
