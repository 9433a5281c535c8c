"""Exports of a native gift-quant checkpoint to formats that other tools load without gift-quant.

* ``export_gptq_lora``: a standard GPTQ checkpoint of the non-salient part (transformers + optimum +
  gptqmodel, GPTQModel, vLLM) plus a PEFT LoRA adapter in ``adapter/`` that adds the salient columns
  back: ``lora_A`` = one-hot rows selecting the salient inputs, ``lora_B`` = the salient columns minus
  what the quantized base holds there, one rank r for every module (zero-padded), ``lora_alpha = r``
  so the scaling is 1. Base + adapter compute what ``gift_quant.load`` computes.
* ``export_compressed_tensors``: the non-salient part as compressed-tensors ``pack-quantized`` linears
  (vLLM's WNA16 path, transformers with compressed-tensors) plus the same LoRA adapter. Exact for
  per-row grids and for grouped grids whose groups are contiguous column runs; the format has no
  g_idx, so groups that skip salient columns or follow act-order are refused (gptq-lora carries them).
* ``export_dense``: the merged full-precision model, an ordinary Hugging Face folder.

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
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .cache import atomic_dir
from .checkpoint import WEIGHTS_NAME, copy_tokenizer_files, read_gift_config
from .errors import GiftQuantError
from .models import parse_dtype
from .pack import pack_cols, pack_rows, unpack_cols, unpack_rows

LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # ranks vLLM's --max-lora-rank accepts (beside 1)
GPTQ_GROUP_SIZES = (16, 32, 64, 128, 256, 512, 1024)  # what gptqmodel's kernels load, besides -1
ADAPTER_DIR = "adapter"
EXPORT_INFO = "gift_quant_export.json"  # provenance of an export; every loader ignores it
FORMATS = ("gptq-lora", "compressed-tensors", "dense")
CT_FORMAT = "pack-quantized"  # compressed-tensors' packed int format (vLLM's WNA16 scheme)
CT_VERSION = "0.20.0"  # the compressed-tensors release whose decompressor the tests check the format against
_QUANT_SUFFIXES = ("qweight", "scales", "qzeros", "g_idx", "salient_idx", "salient_weight", "bias")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------------------- reading the native checkpoint


@dataclass
class NativeLayer:
    """The stored tensors of one quantized linear (GPTQ layout, see qlinear.QuantLinear)."""

    name: str
    in_features: int
    out_features: int
    bits: int
    sym: bool
    qweight: torch.Tensor  # int32 (ceil(in/32)*bits, out)
    scales: torch.Tensor  # fp16 (G, out)
    qzeros: torch.Tensor | None  # int32 (G, ceil(out/32)*bits), asymmetric only; the zero itself
    g_idx: torch.Tensor  # int32 (in,)
    salient_idx: torch.Tensor  # int32 (K,)
    salient_weight: torch.Tensor  # (out, K)
    bias: torch.Tensor | None

    @property
    def n_groups(self) -> int:
        return self.scales.shape[0]

    @property
    def n_salient(self) -> int:
        return self.salient_idx.numel()

    def codes(self) -> torch.Tensor:
        """(in, out) int64."""
        return unpack_rows(self.qweight, self.bits, self.in_features).long()

    def zeros(self) -> torch.Tensor:
        """(G, out) int64 zero points."""
        if self.sym:
            return torch.full(self.scales.shape, 2 ** (self.bits - 1), dtype=torch.int64)
        return unpack_cols(self.qzeros, self.bits, self.out_features).long()

    def dequantized_base(self) -> torch.Tensor:
        """dequant(codes) (out, in) float32; 0 at the salient columns in a well-formed checkpoint."""
        g = self.g_idx.long()
        return (self.scales.float()[g] * (self.codes() - self.zeros()[g]).float()).T.contiguous()

    def dense_weight(self) -> torch.Tensor:
        """What QuantLinear computes with: the base with the salient columns scattered in (float32)."""
        w = self.dequantized_base()
        w[:, self.salient_idx.long()] = self.salient_weight.float()
        return w


class NativeCheckpoint:
    """A native checkpoint read straight from its files: no model is built, nothing is unpickled."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.doc = read_gift_config(self.path)
        self.config = json.loads((self.path / "config.json").read_text())
        q = self.doc["quantize"]
        self.bits, self.sym = int(q["bits"]), bool(q["sym"])
        self.group_size = int(q.get("group_size", -1))
        self.dtype = parse_dtype(self.doc.get("dtype", "float32"))
        with safe_open(self.path / WEIGHTS_NAME, "pt") as f:
            self.tensors = {k: f.get_tensor(k) for k in f.keys()}
        self.layers: dict[str, NativeLayer] = {}
        t = self.tensors
        for name, info in self.doc["layers"].items():
            missing = [s for s in ("qweight", "scales", "g_idx", "salient_idx", "salient_weight")
                       if f"{name}.{s}" not in t] + ([] if self.sym or f"{name}.qzeros" in t else ["qzeros"])
            if missing:
                raise GiftQuantError(f"{self.path / WEIGHTS_NAME} lacks {name}.{missing[0]} named in its config; "
                                     "the checkpoint is damaged: quantize again")
            self.layers[name] = NativeLayer(
                name, int(info["in_features"]), int(info["out_features"]), self.bits, self.sym,
                t[f"{name}.qweight"], t[f"{name}.scales"], t.get(f"{name}.qzeros"), t[f"{name}.g_idx"],
                t[f"{name}.salient_idx"], t[f"{name}.salient_weight"], t.get(f"{name}.bias"))
        self._skeleton = None

    def other_tensors(self) -> dict[str, torch.Tensor]:
        """Everything that is not a quantized linear's buffer: embeddings, norms, lm_head ..."""
        owned = {f"{n}.{s}" for n in self.layers for s in _QUANT_SUFFIXES}
        return {k: v for k, v in self.tensors.items() if k not in owned}

    def skeleton(self):
        """The model built on the meta device from config.json: module names, tied embeddings."""
        if self._skeleton is None:
            from transformers import AutoConfig, AutoModelForCausalLM

            with torch.device("meta"):
                self._skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(self.path))
        return self._skeleton

    @property
    def max_salient(self) -> int:
        return max((lay.n_salient for lay in self.layers.values()), default=0)


# ---------------------------------------------------------------------------- shared plumbing


def _check_out(out_dir: Path, ckpt: Path, overwrite: bool) -> None:
    if out_dir.resolve() == ckpt.resolve() or ckpt.resolve() in out_dir.resolve().parents:
        raise GiftQuantError(f"export folder {out_dir} is inside the checkpoint {ckpt}; choose another folder")
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise GiftQuantError(f"export folder {out_dir} is a file; give a folder path")
    if any(out_dir.iterdir()):
        if not (out_dir / EXPORT_INFO).is_file():
            raise GiftQuantError(f"export folder {out_dir} exists and is not a gift-quant export; choose a new folder")
        if not overwrite:
            raise GiftQuantError(f"export folder {out_dir} holds an earlier export; pass --overwrite to replace it")


def _tie_fixup(tensors: dict[str, torch.Tensor], nat: NativeCheckpoint) -> dict[str, torch.Tensor]:
    """Write tied embeddings the way ``save_pretrained`` does: input embedding kept, output dropped.

    The native file is written by safetensors' ``save_model``, which keeps whichever name of a shared
    tensor sorts first (``lm_head.weight`` for Llama); transformers looks for the input embedding.
    """
    model = nat.skeleton()
    if not getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        return tensors
    names = {id(m): n for n, m in model.named_modules()}
    inp = names[id(model.get_input_embeddings())] + ".weight"
    out_mod = model.get_output_embeddings()
    outp = names[id(out_mod)] + ".weight" if out_mod is not None else None
    tensors = dict(tensors)
    if inp not in tensors and outp in tensors:
        tensors[inp] = tensors[outp]
    if outp != inp:
        tensors.pop(outp, None)
    return tensors


def _config_json(nat: NativeCheckpoint, dtype: torch.dtype, quantization_config: dict | None) -> str:
    cfg = {k: v for k, v in nat.config.items() if k != "quantization_config"}
    # the native config records use_cache false (set while quantizing); served models want the KV cache
    if "use_cache" in cfg:
        cfg["use_cache"] = True
    cfg["dtype"] = _dtype_name(dtype)
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = _dtype_name(dtype)
    if quantization_config is not None:
        cfg["quantization_config"] = quantization_config
    return json.dumps(cfg, indent=2)


def _export_info(nat: NativeCheckpoint, fmt: str, summary: dict) -> str:
    info = {"format": fmt, "source_checkpoint": str(nat.path.resolve()), "tool": nat.doc.get("tool"),
            "version": nat.doc.get("version"), "native_effective_bits": nat.doc.get("effective_bits"),
            "salient_per_layer": {n: lay.n_salient for n, lay in nat.layers.items()},
            "provenance": nat.doc.get("provenance"), "quantize": nat.doc.get("quantize"),
            **{k: v for k, v in summary.items() if k not in ("out", "format")}}
    return json.dumps(info, indent=1, default=str)


def _resolve_dtype(dtype, default: torch.dtype) -> torch.dtype:
    if dtype is None:
        return default
    return parse_dtype(dtype) if isinstance(dtype, str) else dtype


# ---------------------------------------------------------------------------- dense


def export_dense(ckpt: str | Path, out_dir: str | Path, dtype: str | torch.dtype | None = None,
                 overwrite: bool = False) -> dict:
    """The merged model (dequantized weights with the salient columns in place) as a plain HF folder.

    ``dtype``: of every floating tensor; default the checkpoint's compute dtype (the source model's).
    Loads with ``AutoModelForCausalLM.from_pretrained`` and serves anywhere (vLLM, TGI, llama.cpp
    conversion ...), at full-precision size.
    """
    nat = NativeCheckpoint(ckpt)
    out_dir = Path(out_dir)
    dtype = _resolve_dtype(dtype, nat.dtype)
    _check_out(out_dir, nat.path, overwrite)
    tensors = dict(nat.other_tensors())
    for name, lay in nat.layers.items():
        tensors[f"{name}.weight"] = lay.dense_weight().to(dtype)  # cast now: one float32 layer at a time
        if lay.bias is not None:
            tensors[f"{name}.bias"] = lay.bias
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous()
               for k, v in _tie_fixup(tensors, nat).items()}
    params = sum(v.numel() for v in tensors.values())
    summary = {"out": str(out_dir), "format": "dense", "dtype": _dtype_name(dtype), "parameters": params}
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(_config_json(nat, dtype, None))
        copy_tokenizer_files(nat.path, tmp)
        (tmp / EXPORT_INFO).write_text(_export_info(nat, "dense", summary))
    return summary


# ---------------------------------------------------------------------------- GPTQ + LoRA


def lora_rank(k: int) -> int:
    """The smallest rank of LORA_RANKS that holds ``k`` salient columns."""
    for r in LORA_RANKS:
        if k <= r:
            return r
    raise GiftQuantError(
        f"a layer has {k} salient columns, more than the largest LoRA rank servers accept ({LORA_RANKS[-1]}, "
        "vLLM's --max-lora-rank limit); export the merged model with --format dense instead")


@dataclass
class GPTQLayer:
    """One layer in GPTQ terms. ``zeros`` are the unpacked zero points (groups, out)."""

    bits: int
    in_features: int
    qweight: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    trivial_g_idx: bool  # g_idx == j // group_size: exact without desc_act

    def dequantized(self, columns: torch.Tensor | None = None) -> torch.Tensor:
        """The base as a GPTQ kernel dequantizes it, (out, in) or (out, len(columns)), float32."""
        codes = unpack_rows(self.qweight, self.bits, self.in_features).long()
        g = self.g_idx.long()
        if columns is not None:
            codes, g = codes[columns], g[columns]
        return (self.scales.float()[g] * (codes - self.zeros[g]).float()).T.contiguous()


def _packed_words(n: int, bits: int) -> int:
    """Words gptqmodel allocates for ``n`` packed values (it does not pad to whole runs of 32)."""
    return math.ceil(n * bits / 32)


def gptq_layer(lay: NativeLayer, group_size: int) -> GPTQLayer:
    """The GPTQ tensors of one layer with group size ``group_size`` (-1: one group per row).

    Non-salient columns keep their group, scale, zero and code. Salient columns are re-filed, in
    ascending order, into the groups with spare room (the last real group first, then padding groups
    beyond it) and take that group's zero point as their code, so the base is exactly 0 there.
    """
    in_f, out_f = lay.in_features, lay.out_features
    gs = in_f if group_size <= 0 else group_size
    n_groups = -(-in_f // gs)
    if lay.n_groups > n_groups:
        raise GiftQuantError(
            f"{lay.name}: {lay.n_groups} quantization groups do not fit GPTQ's {n_groups} groups of {gs} columns; "
            "export the merged model (--format dense) instead")
    codes = lay.codes()  # (in, out)
    zeros = lay.zeros()
    scales = lay.scales.to(torch.float16)
    g_idx = lay.g_idx.long().clone()
    salient = lay.salient_idx.long().sort().values
    is_salient = torch.zeros(in_f, dtype=torch.bool)
    is_salient[salient] = True
    fill = torch.bincount(g_idx[~is_salient], minlength=n_groups)
    if (fill > gs).any():
        raise GiftQuantError(
            f"{lay.name}: a quantization group holds {int(fill.max())} columns, more than the group size {gs} "
            "GPTQ allows; export the merged model (--format dense) instead")
    pad = n_groups - lay.n_groups
    if pad:  # unused by non-salient columns: scale 1, zero mid-range (>= 1, so GPTQ v1 stores it)
        scales = torch.cat([scales, torch.ones(pad, out_f, dtype=scales.dtype)])
        zeros = torch.cat([zeros, torch.full((pad, out_f), 2 ** (lay.bits - 1), dtype=zeros.dtype)])
    g = 0
    for j in salient.tolist():
        while fill[g] >= gs:
            g += 1
        g_idx[j], fill[g] = g, fill[g] + 1
        codes[j] = zeros[g]
    qweight = pack_rows(codes, lay.bits)[: _packed_words(in_f, lay.bits)].contiguous()
    return GPTQLayer(bits=lay.bits, in_features=in_f, qweight=qweight, zeros=zeros, scales=scales.contiguous(),
                     g_idx=g_idx.to(torch.int32), trivial_g_idx=bool(torch.equal(g_idx, torch.arange(in_f) // gs)))


def _pack_zeros(zeros: torch.Tensor, bits: int, v1: bool, out_f: int) -> torch.Tensor:
    return pack_cols(zeros - 1 if v1 else zeros, bits)[:, : _packed_words(out_f, bits)].contiguous()


def _check_gptq_representable(nat: NativeCheckpoint) -> list[str]:
    """Errors for what GPTQ loaders cannot take; returns warnings for what only some servers refuse."""
    if not nat.layers:
        raise GiftQuantError(f"{nat.path} has no quantized layers to export")
    if nat.bits == 3:
        bad = [n for n, lay in nat.layers.items() if lay.in_features % 32 or lay.out_features % 32]
        if bad:
            raise GiftQuantError(
                f"3-bit GPTQ needs in/out features divisible by 32 ({bad[0]} is not); "
                "export the merged model (--format dense) instead")
    gs = nat.group_size
    warnings = []
    if gs > 0 and gs not in GPTQ_GROUP_SIZES and any(gs < lay.in_features for lay in nat.layers.values()):
        raise GiftQuantError(
            f"group_size {gs} is not one GPTQ kernels load ({', '.join(map(str, GPTQ_GROUP_SIZES))} or per-row); "
            "export the merged model (--format dense) instead, or quantize with a supported --group-size")
    if gs > 0:
        odd = [n for n, lay in nat.layers.items() if lay.in_features % gs]
        if odd:
            warnings.append(f"group_size {gs} does not divide in_features of {odd[0]} ({len(odd)} layers): "
                            "transformers/GPTQModel load it, vLLM refuses such layers")
    # transformers (through optimum) swaps every linear inside the decoder blocks for a GPTQ layer
    from .arch import block_linears, find_blocks

    prefix, blocks = find_blocks(nat.skeleton())
    expected = {f"{prefix}.{i}.{n}" for i, b in enumerate(blocks) for n in block_linears(b)}
    if expected != set(nat.layers):
        extra = sorted(expected ^ set(nat.layers))[:3]
        raise GiftQuantError(
            f"the checkpoint's quantized layers are not exactly the linears of the decoder blocks (e.g. {extra}), "
            "which GPTQ loaders assume; export the merged model (--format dense) instead")
    return warnings


def _target_modules(nat: NativeCheckpoint) -> list[str]:
    """Short names (q_proj ...) when they select exactly our layers (what vLLM expects), else full names."""
    linear = [n for n, m in nat.skeleton().named_modules() if isinstance(m, torch.nn.Linear)]
    ours = set(nat.layers)
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in ours})
    if {n for n in linear if n.rsplit(".", 1)[-1] in suffixes} == ours:
        return suffixes
    return sorted(ours)


def _adapter_config_json(r: int, targets: list[str], tmp: Path) -> None:
    from peft import LoraConfig

    LoraConfig(r=r, lora_alpha=r, target_modules=targets, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
               inference_mode=True, init_lora_weights=True).save_pretrained(str(tmp))


class SalientAdapter:
    """The PEFT LoRA adapter that adds the salient columns back on top of an exported quantized base.

    Per module: ``lora_A`` (r, in) one-hot rows selecting the salient inputs, ``lora_B`` (out, r) the
    salient columns minus what the exported base holds there (0 by construction; the caller passes the
    base's values at those columns, computed from the tensors it writes), zero-padded to rank ``r``;
    ``lora_alpha = r`` so the scaling is 1. Shared by every quantized export format.
    """

    def __init__(self, nat: NativeCheckpoint, r: int):
        self.r = r
        self.sal_dtype = next(iter(nat.layers.values())).salient_weight.dtype
        self.dtype = self.sal_dtype
        self.tensors: dict[str, torch.Tensor] = {}

    def add(self, lay: NativeLayer, base_at_salient: torch.Tensor) -> None:
        """``base_at_salient``: (out, K) float32, the base as its loaders dequantize it at ``lay.salient_idx``."""
        idx = lay.salient_idx.long()
        a = torch.zeros(self.r, lay.in_features)
        a[torch.arange(idx.numel()), idx] = 1.0
        b = torch.zeros(lay.out_features, self.r)
        b[:, : idx.numel()] = lay.salient_weight.float() - base_at_salient.float()
        if not torch.equal(b.to(self.sal_dtype).float(), b):
            self.dtype = torch.float32  # the base is not 0 at some salient column: keep B exact
        # earlier layers cast to sal_dtype were exact there, so a later switch to float32 loses nothing
        self.tensors[f"base_model.model.{lay.name}.lora_A.weight"] = a.to(self.dtype)
        self.tensors[f"base_model.model.{lay.name}.lora_B.weight"] = b.to(self.dtype)

    def write(self, folder: Path, targets: list[str]) -> None:
        folder.mkdir()
        tensors = {k: v.to(self.dtype).contiguous() for k, v in self.tensors.items()}
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        _adapter_config_json(self.r, targets, folder)


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
    dtype = _resolve_dtype(dtype, nat.dtype)
    if checkpoint_format not in ("auto", "gptq", "gptq_v2"):
        raise GiftQuantError(f"checkpoint_format must be auto, gptq or gptq_v2 (got {checkpoint_format!r})")
    r = lora_rank(nat.max_salient)
    warnings = _check_gptq_representable(nat)
    _check_out(out_dir, nat.path, overwrite)
    gs = nat.group_size if nat.group_size > 0 else -1
    # padding groups get zero 2^(b-1) >= 1, so only the stored zero points can rule out v1
    has_zero_0 = not nat.sym and any(int(lay.zeros().min()) < 1 for lay in nat.layers.values())
    if checkpoint_format == "auto":
        checkpoint_format = "gptq_v2" if has_zero_0 else "gptq"
    elif checkpoint_format == "gptq" and has_zero_0:
        raise GiftQuantError(
            "this asymmetric checkpoint has zero points equal to 0, which GPTQ v1 (it stores zero - 1) cannot hold; "
            "export with --checkpoint-format gptq_v2 (GPTQModel, transformers) or --format dense (any server)")
    if checkpoint_format == "gptq_v2":
        warnings.append("checkpoint_format gptq_v2: GPTQModel and transformers load it, vLLM only through its "
                        "gptq kernel (not Marlin)")
    v1 = checkpoint_format == "gptq"

    # one layer at a time (its unpacked codes live only inside gptq_layer): GPTQ tensors + adapter
    tensors = dict(nat.other_tensors())
    adapter = SalientAdapter(nat, r)
    desc_act = False
    for name, lay in nat.layers.items():
        g = gptq_layer(lay, gs)
        desc_act |= not g.trivial_g_idx
        tensors[f"{name}.qweight"] = g.qweight
        tensors[f"{name}.qzeros"] = _pack_zeros(g.zeros, nat.bits, v1, lay.out_features)
        tensors[f"{name}.scales"] = g.scales
        tensors[f"{name}.g_idx"] = g.g_idx
        if lay.bias is not None:
            tensors[f"{name}.bias"] = lay.bias.to(torch.float16)  # GPTQ layers keep their bias in float16
        adapter.add(lay, g.dequantized(lay.salient_idx.long()))
    quant_owned = {f"{n}.{s}" for n in nat.layers for s in ("qweight", "qzeros", "scales", "g_idx", "bias")}
    tensors = {k: (v.to(dtype) if v.is_floating_point() and k not in quant_owned else v).contiguous()
               for k, v in _tie_fixup(tensors, nat).items()}
    biases = [lay.bias.dtype for lay in nat.layers.values() if lay.bias is not None]
    if any(d != torch.float16 for d in biases):
        warnings.append("linear biases are stored in float16, as GPTQ layers hold them (rounded from "
                        f"{_dtype_name(biases[0])})")
    q = nat.doc["quantize"]
    qcfg = {
        "quant_method": "gptq", "bits": nat.bits, "group_size": gs, "desc_act": desc_act, "sym": nat.sym,
        "lm_head": False, "true_sequential": True, "damp_percent": float(q.get("damp", 0.01)),
        "static_groups": bool(q.get("static_groups", False)), "act_group_aware": False,
        "checkpoint_format": checkpoint_format, "format": checkpoint_format, "pack_dtype": "int32",
        "meta": {"quantizer": [f"gift-quant:{nat.doc.get('version', '0')}"]},
    }
    targets = _target_modules(nat)

    summary = {"out": str(out_dir), "format": "gptq-lora", "bits": nat.bits, "group_size": gs, "sym": nat.sym,
               "desc_act": desc_act, "checkpoint_format": checkpoint_format, "lora_rank": r,
               "max_salient": nat.max_salient, "dtype": _dtype_name(dtype), "adapter_dtype": _dtype_name(adapter.dtype),
               "target_modules": targets, "warnings": warnings}
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "quantize_config.json").write_text(json.dumps(qcfg, indent=2))
        (tmp / "config.json").write_text(_config_json(nat, dtype, qcfg))
        copy_tokenizer_files(nat.path, tmp)
        adapter.write(tmp / ADAPTER_DIR, targets)
        (tmp / EXPORT_INFO).write_text(_export_info(nat, "gptq-lora", summary))
    return summary


# ---------------------------------------------------------------------------- compressed-tensors + LoRA


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
        return pack_rows(self.codes, self.bits)[: _packed_words(self.in_features, self.bits)].T.contiguous()

    def weight_zero_point(self) -> torch.Tensor:
        """int32 (ceil(out * bits / 32), groups): the zero points packed along the output dimension."""
        return pack_rows(self.zeros.T, self.bits)[: _packed_words(self.out_features, self.bits)].contiguous()

    def dequantized(self, scale_dtype: torch.dtype, columns: torch.Tensor | None = None) -> torch.Tensor:
        """The base as compressed-tensors dequantizes it (scales in ``scale_dtype``), (out, in | len(columns))."""
        g = torch.arange(self.in_features) // self.group_size
        codes = self.codes
        if columns is not None:
            codes, g = codes[columns], g[columns]
        s = self.scales.to(scale_dtype)[g]
        return (s * (codes - self.zeros[g]).to(scale_dtype)).T.float().contiguous()


def _ct_grouping_error(lay: NativeLayer, nat: NativeCheckpoint, gs: int) -> GiftQuantError:
    why = []
    if nat.doc["quantize"].get("act_order"):
        why.append("act-order")
    if lay.n_salient:
        why.append(f"{lay.n_salient} salient columns that the groups skip")
    setting = f"group_size {gs}" + (f" with {' and '.join(why)}" if why else "")
    return GiftQuantError(
        f"{lay.name}: {setting} puts input columns in groups other than column // {gs} (a g_idx), which "
        "compressed-tensors pack-quantized cannot carry (its group strategy assumes contiguous groups; "
        "compressed-tensors >= 0.20 removed actorder='group' and weight_g_idx). Export with --format gptq-lora "
        "(GPTQ desc_act carries g_idx) or --format dense, or quantize with per-row grids (--group-size -1), "
        "which this format carries, or without salient columns and act-order")


def ct_layer(lay: NativeLayer, nat: NativeCheckpoint) -> CTLayer:
    """The compressed-tensors tensors of one layer: exact, or a GiftQuantError naming what does not fit.

    Compressed-tensors' group strategy puts column j in group ``j // group_size`` (channel: one group).
    A native layer fits when the non-salient columns of each such group share one native group; that
    group's scale and zero are copied. Salient columns are re-filed into the group their position
    gives and take its zero point as their code, so the base is exactly 0 there (the adapter adds them).
    """
    in_f, out_f = lay.in_features, lay.out_features
    grouped = nat.group_size > 0
    gs = nat.group_size if grouped else in_f
    if in_f % gs:
        raise GiftQuantError(
            f"{lay.name}: group_size {gs} does not divide in_features {in_f}; compressed-tensors (and vLLM) need "
            "whole groups. Export with --format gptq-lora or --format dense")
    n_ct = in_f // gs
    ct_group = torch.arange(in_f) // gs
    g_idx = lay.g_idx.long()
    keep = torch.ones(in_f, dtype=torch.bool)
    keep[lay.salient_idx.long()] = False
    native_of = torch.full((n_ct,), -1, dtype=torch.long)  # native group held by each ct group (-1: none)
    native_of[ct_group[keep]] = g_idx[keep]
    if not torch.equal(native_of[ct_group[keep]], g_idx[keep]):
        raise _ct_grouping_error(lay, nat, gs)
    used = native_of >= 0
    scales = torch.ones(n_ct, out_f)
    zeros = torch.full((n_ct, out_f), 2 ** (lay.bits - 1), dtype=torch.int64)
    scales[used] = lay.scales.float()[native_of[used]]
    zeros[used] = lay.zeros()[native_of[used]]
    codes = lay.codes()
    codes[~keep] = zeros[ct_group[~keep]]
    return CTLayer(bits=lay.bits, in_features=in_f, out_features=out_f, group_size=gs, codes=codes, zeros=zeros,
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


def export_compressed_tensors(ckpt: str | Path, out_dir: str | Path, dtype: str | torch.dtype | None = None,
                              overwrite: bool = False) -> dict:
    """compressed-tensors ``pack-quantized`` base (``out_dir``) + PEFT LoRA adapter (``out_dir/adapter``).

    Per quantized linear: ``weight_packed`` (int32, out x ceil(in*b/32)), ``weight_scale`` (out x groups,
    in ``dtype``), ``weight_shape`` ([out, in], int64) and, for asymmetric grids, ``weight_zero_point``
    (int32, ceil(out*b/32) x groups); per-row grids use the channel strategy, group size g the group
    strategy. The format has no g_idx, so grouped checkpoints whose groups skip salient columns (or
    follow act-order) are refused (see ``ct_layer``). ``dtype``: of the scales, the unquantized tensors
    and the config; default the checkpoint's compute dtype (vLLM wants float16 or bfloat16).
    """
    nat = NativeCheckpoint(ckpt)
    out_dir = Path(out_dir)
    dtype = _resolve_dtype(dtype, nat.dtype)
    if not nat.layers:
        raise GiftQuantError(f"{nat.path} has no quantized layers to export")
    r = lora_rank(nat.max_salient)
    _check_out(out_dir, nat.path, overwrite)
    warnings = []
    if dtype == torch.bfloat16:
        warnings.append(f"scales are stored in {_dtype_name(dtype)} (the model dtype, as compressed-tensors "
                        "dequantizes in the scale dtype), rounded from float16; use --dtype float16 or float32 "
                        "to keep them exact")
    if not nat.sym and nat.bits not in (4, 8):
        warnings.append(f"asymmetric {nat.bits}-bit: vLLM's compressed-tensors WNA16 scheme (as read from its "
                        "source) takes zero points at 4 and 8 bits only")

    tensors = dict(nat.other_tensors())
    adapter = SalientAdapter(nat, r)
    for name, lay in nat.layers.items():
        c = ct_layer(lay, nat)
        tensors[f"{name}.weight_packed"] = c.weight_packed()
        tensors[f"{name}.weight_scale"] = c.scales.T.contiguous().to(dtype)
        tensors[f"{name}.weight_shape"] = torch.tensor([lay.out_features, lay.in_features], dtype=torch.int64)
        if not nat.sym:
            tensors[f"{name}.weight_zero_point"] = c.weight_zero_point()
        if lay.bias is not None:
            tensors[f"{name}.bias"] = lay.bias
        adapter.add(lay, c.dequantized(dtype, lay.salient_idx.long()))
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous()
               for k, v in _tie_fixup(tensors, nat).items()}
    ignore = _ignored_linears(nat)
    qcfg = ct_quantization_config(nat, ignore)
    targets = _target_modules(nat)
    summary = {"out": str(out_dir), "format": "compressed-tensors", "ct_format": CT_FORMAT, "bits": nat.bits,
               "group_size": nat.group_size if nat.group_size > 0 else -1,
               "strategy": qcfg["config_groups"]["group_0"]["weights"]["strategy"], "sym": nat.sym,
               "lora_rank": r, "max_salient": nat.max_salient, "dtype": _dtype_name(dtype),
               "adapter_dtype": _dtype_name(adapter.dtype), "target_modules": targets, "ignore": ignore,
               "warnings": warnings}
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(_config_json(nat, dtype, qcfg))
        copy_tokenizer_files(nat.path, tmp)
        adapter.write(tmp / ADAPTER_DIR, targets)
        (tmp / EXPORT_INFO).write_text(_export_info(nat, "compressed-tensors", summary))
    return summary


def export(ckpt: str | Path, out_dir: str | Path, fmt: str = "gptq-lora", dtype: str | None = None,
           checkpoint_format: str = "auto", overwrite: bool = False) -> dict:
    """The CLI's entry point: ``fmt`` is one of FORMATS."""
    if fmt == "gptq-lora":
        return export_gptq_lora(ckpt, out_dir, dtype=dtype, checkpoint_format=checkpoint_format, overwrite=overwrite)
    if fmt == "compressed-tensors":
        return export_compressed_tensors(ckpt, out_dir, dtype=dtype, overwrite=overwrite)
    if fmt == "dense":
        return export_dense(ckpt, out_dir, dtype=dtype, overwrite=overwrite)
    raise GiftQuantError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
