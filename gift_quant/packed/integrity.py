"""The one integrity check of a native checkpoint, used by every reader: load, eval, export, inspect, resume.

``checkpoint.verify_checkpoint(path)`` runs it (this module holds its tensor and model checks, and imports
nothing of checkpoint.py, which imports it); it refuses, in one line naming the file, layer, key and value:

1. a ``gift_quant_config.json`` that does not parse or lacks what readers use (checkpoint.read_gift_config);
2. a manifest (``files``) that is missing, empty or incomplete in a format version that records one
   (``MANIFEST_SINCE_VERSION``: whether a checkpoint is "legacy" or damaged rests on its recorded version,
   never on the manifest's presence), a name outside the folder, a file whose sha256 differs;
3. tensors that disagree with the config: the packed shapes of every quantized layer imply its bits,
   groups, salient count and in/out features, and those must be the recorded ones; ``g_idx`` and
   ``salient_idx`` in range; scales, salient columns and biases finite; every other tensor is one the model
   in ``config.json`` has, with its shape (the model is built on the meta device: nothing is allocated).

The config itself is not covered by its own sha256, so (3) is what catches a config edited by hand or a
manifest rewritten to match changed files. What it returns, the effective bits measured from the stored
tensors, is what ``inspect`` and ``eval`` report. Nothing is unpickled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config.settings import QuantSpec
from ..util.errors import GiftQuantError
from .bits import packed_length

__all__ = ["Verified", "layer_setting", "read_spec", "verify_model", "verify_tensors"]

CONFIG_NAME = "gift_quant_config.json"  # checkpoint.CONFIG_NAME / WEIGHTS_NAME (checkpoint.py imports this module)
WEIGHTS_NAME = "model.safetensors"

# safetensors dtype names -> bits per element
DTYPE_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U8": 8,
              "BOOL": 8, "F8_E4M3": 8, "F8_E5M2": 8, "U16": 16, "U32": 32, "U64": 64}
_INT = ("I32", "I64")
_FLOAT = ("F32", "F16", "BF16")
# what one stored layer costs on disk (qlinear.effective_bits counts the same buffers; the bias is not a weight)
_COUNTED = ("qweight", "scales", "qzeros", "g_idx", "salient_idx", "salient_weight")


@dataclass
class Verified:
    """A checkpoint that passed every check: its config and what its tensors hold, per quantized layer."""

    doc: dict
    layers: dict[str, dict] = field(default_factory=dict)  # name -> in/out features, bits, groups, salient, bits/w

    @property
    def effective_bits(self) -> float:
        """Stored bits per quantized weight (codes, scales, zeros, indices, salient columns), from the tensors."""
        n = sum(v["in_features"] * v["out_features"] for v in self.layers.values())
        return sum(v["effective_bits"] * v["in_features"] * v["out_features"] for v in self.layers.values()) / n \
            if n else float("nan")


def read_spec(doc: dict) -> QuantSpec:
    """The storage spec recorded in a (checked) gift_quant_config.json, format 1 or 2."""
    if doc["format_version"] >= 2:
        return QuantSpec(**doc["spec"])
    q = doc["quantize"]  # format 1: the spec's values lived among the quantize settings
    return QuantSpec(q["bits"], q["sym"], q.get("group_size", -1), q.get("group_layout", "compact"),
                     q["salient_dtype"])


def layer_setting(doc: dict, name: str, key: str):
    """A layer's ``bits``/``sym``: its own entry when it records one, else the checkpoint-wide setting."""
    info = doc["layers"][name]
    return info[key] if key in info else getattr(read_spec(doc), key)


def _damaged(f: Path, what: str) -> GiftQuantError:
    return GiftQuantError(f"{f} {what}; the checkpoint is damaged (edited or mixed with another): re-create it")


def verify_tensors(path: Path, doc: dict) -> tuple[dict[str, dict], dict[str, tuple]]:
    """Per-layer facts from the packed tensors, and the headers of every other tensor."""
    from safetensors import safe_open

    f = path / WEIGHTS_NAME
    try:
        with safe_open(f, "pt") as h:
            headers = {k: (h.get_slice(k).get_dtype(), tuple(h.get_slice(k).get_shape())) for k in h.keys()}
            layers = {name: _check_layer(f, h, headers, doc, name) for name in doc["layers"]}
    except GiftQuantError:
        raise
    except Exception as exc:  # SafetensorError, OSError: truncated, empty, a folder, not safetensors
        why = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise GiftQuantError(f"{f} cannot be read ({why}); the checkpoint is damaged: re-create it") from None
    owned = {f"{n}.{s}" for n in layers for s in _COUNTED}  # a quantized layer's bias is the model's: checked there
    stray = sorted(k.removesuffix(".qweight") for k in headers if k.endswith(".qweight") and k not in owned)
    if stray:
        raise _damaged(f, f"holds packed layer {stray[0]}, which {CONFIG_NAME} does not name")
    return layers, {k: v for k, v in headers.items() if k not in owned}


def _check_layer(f: Path, h, headers: dict, doc: dict, name: str) -> dict:
    info = doc["layers"][name]
    bits, sym = layer_setting(doc, name, "bits"), layer_setting(doc, name, "sym")
    need = ["qweight", "scales", "g_idx", "salient_idx", "salient_weight"] + ([] if sym else ["qzeros"])
    for s in need:
        if f"{name}.{s}" not in headers:
            raise _damaged(f, f"lacks {name}.{s}, which {CONFIG_NAME} implies (layer {name})")
    if sym and f"{name}.qzeros" in headers:  # load would refuse it as unexpected: so must every reader
        raise _damaged(f, f"stores {name}.qzeros, which a symmetric layer ({CONFIG_NAME}: sym true) does not have")
    kinds = {"qweight": _INT, "g_idx": _INT, "salient_idx": _INT, "qzeros": _INT, "scales": _FLOAT,
             "salient_weight": _FLOAT, "bias": _FLOAT}
    for s, allowed in kinds.items():
        if f"{name}.{s}" in headers and headers[f"{name}.{s}"][0] not in allowed:
            raise _damaged(f, f"stores {name}.{s} as {headers[f'{name}.{s}'][0]}, not {' or '.join(allowed)}")
    shape = {s: headers[f"{name}.{s}"][1] for s in (*need, "bias") if f"{name}.{s}" in headers}
    if len(shape["qweight"]) != 2 or len(shape["scales"]) != 2 or len(shape["g_idx"]) != 1 \
            or len(shape["salient_idx"]) != 1 or len(shape["salient_weight"]) != 2:
        raise _damaged(f, f"holds tensors of layer {name} with the wrong number of dimensions")
    # what the tensors hold, each quantity from the tensor that defines it
    in_t, (groups_t, out_t), k_t = shape["g_idx"][0], shape["scales"], shape["salient_idx"][0]
    words = -(-in_t // 32)
    rows = shape["qweight"][0]
    bits_t = rows // words if words and rows % words == 0 else f"{rows} rows of packed codes for {in_t} inputs"
    held = {"in_features": in_t, "out_features": out_t, "groups": groups_t, "salient": k_t, "bits": bits_t}
    recorded = {"in_features": info["in_features"], "out_features": info["out_features"], "groups": info["groups"],
                "salient": info["salient"], "bits": bits}
    for key in recorded:
        if recorded[key] != held[key]:
            raise GiftQuantError(f"{f} does not match {CONFIG_NAME} for layer {name}: {key} {recorded[key]!r} in the "
                                 f"config, {held[key]} in the tensors; the checkpoint is damaged (config edited or "
                                 "files mixed): re-create it")
    expect = {"qweight": (packed_length(in_t, bits), out_t), "salient_weight": (out_t, k_t),
              "qzeros": (groups_t, packed_length(out_t, bits)), "bias": (out_t,)}
    for s, want in expect.items():
        if s in shape and shape[s] != want:
            raise _damaged(f, f"stores {name}.{s} with shape {list(shape[s])} where layer {name} needs {list(want)}")
    g_idx = h.get_tensor(f"{name}.g_idx")
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups_t):
        raise _damaged(f, f"has {name}.g_idx values outside 0..{groups_t - 1} (the layer's groups)")
    sal = h.get_tensor(f"{name}.salient_idx")
    if sal.numel() and (int(sal.min()) < 0 or int(sal.max()) >= in_t or sal.unique().numel() != sal.numel()):
        raise _damaged(f, f"has {name}.salient_idx values outside 0..{in_t - 1} or repeated")
    for s in ("scales", "salient_weight", "bias"):
        if s in shape and not torch.isfinite(h.get_tensor(f"{name}.{s}")).all():
            raise GiftQuantError(f"{f}: layer {name} has non-finite {s}; the checkpoint is corrupt: re-create it")
    stored = sum(DTYPE_BITS[headers[f"{name}.{s}"][0]] * _numel(shape[s]) for s in _COUNTED if s in shape)
    return {**held, "effective_bits": stored / (in_t * out_t) if in_t * out_t else float("nan")}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def verify_model(path: Path, doc: dict, other: dict[str, tuple], trust_remote_code: bool) -> None:
    """The model ``config.json`` describes (built on the meta device) has exactly the stored tensors."""
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_file = path / "config.json"
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as exc:  # ValueError, OSError, KeyError, TypeError from a config transformers cannot build
        raise GiftQuantError(f"{cfg_file} does not describe a model transformers can build "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}); "
                             "the checkpoint is damaged: re-create it") from None
    f = path / WEIGHTS_NAME
    for name, info in doc["layers"].items():
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            lin = None
        if not isinstance(lin, nn.Linear):
            raise GiftQuantError(f"{CONFIG_NAME} names layer {name!r}, which is not a linear layer of the model in "
                                 f"{cfg_file}: the checkpoint is damaged; re-create it")
        if (lin.in_features, lin.out_features) != (info["in_features"], info["out_features"]):
            raise GiftQuantError(f"{cfg_file} makes layer {name} {lin.in_features} -> {lin.out_features}, the tensors "
                                 f"{info['in_features']} -> {info['out_features']}: the checkpoint is damaged; "
                                 "re-create it")
    quantized = {f"{n}.weight" for n in doc["layers"]}
    groups: dict[int, list[str]] = {}  # tied parameters share one tensor; the file stores one of its names
    for k, t in model.state_dict(keep_vars=True).items():
        if k not in quantized and not k.endswith("inv_freq"):  # rotary tables are rebuilt, not stored
            groups.setdefault(id(t), []).append(k)
    expected = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    missing = [names[0] for names in groups.values() if not any(n in other for n in names)]
    known = {n for names in groups.values() for n in names}
    unexpected = sorted(k for k in other if k not in known)
    if missing or unexpected:
        raise GiftQuantError(f"{f} does not match the model in {cfg_file}: missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]}; the checkpoint is damaged: re-create it")
    for k, (_, shape) in other.items():
        if shape != expected[k]:
            dims = [w for s, w in zip(shape, expected[k]) if s != w]
            text = config.get_text_config().to_dict()
            fields = [f"{n} {v}" for n, v in sorted(text.items()) if dims and v == dims[0]
                      and isinstance(v, int) and not isinstance(v, bool) and not n.endswith("_id")][:2]
            named = f" ({', '.join(fields)})" if fields else ""
            raise GiftQuantError(f"{f} stores {k} with shape {list(shape)}, the model in {cfg_file} needs "
                                 f"{list(expected[k])}{named}: the checkpoint is damaged (config.json edited?); "
                                 "re-create it")
