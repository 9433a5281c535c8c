"""Reading a native gift-quant checkpoint for export: its tensors, its packed layers, its model skeleton.

Nothing is unpickled and no model is loaded: the safetensors file is read as is, and every quantized
linear becomes a ``QuantLinear`` holding its stored buffers, so every format dequantizes a layer exactly
as ``gift_quant.load`` computes with it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from ..model.loading import parse_dtype
from ..packed.checkpoint import WEIGHTS_NAME, read_spec, verify_checkpoint
from ..packed.qlinear import QuantLinear
from ..util.errors import GiftQuantError

__all__ = ["NativeCheckpoint", "layer_codes", "layer_zeros"]

_REQUIRED = ("qweight", "scales", "g_idx", "salient_idx", "salient_weight")
_QUANT_SUFFIXES = (*_REQUIRED, "qzeros", "bias")  # every buffer a QuantLinear stores


def layer_codes(q: QuantLinear) -> torch.Tensor:
    """The codes (in, out) int64 in the GPTQ layout; a fresh tensor the caller may change."""
    return q.codes().T.contiguous().long()


def layer_zeros(q: QuantLinear) -> torch.Tensor:
    """The zero points (G, out) int64 (2^(b-1) for symmetric grids)."""
    return q.zero_points().long()


class NativeCheckpoint:
    """A native checkpoint read straight from its files: no model is built, nothing is unpickled.

    ``layers``: name -> ``QuantLinear`` holding the stored tensors themselves (nothing copied).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.verified = verify_checkpoint(self.path)  # the one integrity check every reader runs
        self.doc = self.verified.doc
        try:
            self.config = json.loads((self.path / "config.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise GiftQuantError(f"{self.path / 'config.json'} is missing or not valid JSON ({exc}); "
                                 "the checkpoint is damaged: quantize again") from None
        self.spec = read_spec(self.doc)
        self.bits, self.sym, self.group_size = self.spec.bits, self.spec.sym, self.spec.group_size
        self.dtype = parse_dtype(self.doc.get("dtype", "float32"))
        try:
            with safe_open(self.path / WEIGHTS_NAME, "pt") as f:
                self.tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # SafetensorError, OSError: truncated, missing or not a safetensors file
            raise GiftQuantError(f"{self.path / WEIGHTS_NAME} cannot be read ({str(exc).splitlines()[0][:160]}); "
                                 "the checkpoint is damaged: quantize again") from None
        self.layers: dict[str, QuantLinear] = {name: self._layer(name) for name in self.doc["layers"]}
        for name, layer in self.layers.items():  # a NaN scale exports a silently broken model
            info = self.doc["layers"][name]
            stored = {"in_features": layer.in_features, "out_features": layer.out_features,
                      "groups": layer.n_groups, "salient": layer.n_salient}
            differ = [f"{k} {info[k]} in the config, {v} in the tensors" for k, v in stored.items() if info[k] != v]
            if differ:
                raise GiftQuantError(f"{self.path / WEIGHTS_NAME} does not match gift_quant_config.json for layer "
                                     f"{name}: {', '.join(differ)}; the checkpoint is damaged: quantize again")
            for buf in ("scales", "salient_weight"):
                t = getattr(layer, buf)
                if t.is_floating_point() and not torch.isfinite(t).all():
                    raise GiftQuantError(f"{self.path / WEIGHTS_NAME}: layer {name} has non-finite {buf}; "
                                         "the checkpoint is corrupt: re-create it")
        self._skeleton = None

    def _layer(self, name: str) -> QuantLinear:
        t = self.tensors
        missing = [s for s in _REQUIRED if f"{name}.{s}" not in t] + (
            [] if self.sym or f"{name}.qzeros" in t else ["qzeros"])
        if missing:
            raise GiftQuantError(f"{self.path / WEIGHTS_NAME} lacks {name}.{missing[0]} named in its config; "
                                 "the checkpoint is damaged: quantize again")
        buffers = {s: t[f"{name}.{s}"] for s in _QUANT_SUFFIXES if f"{name}.{s}" in t}
        try:
            return QuantLinear.from_buffers(buffers, self.spec)
        except RuntimeError as exc:  # load_state_dict: shapes that do not fit together
            raise GiftQuantError(f"{self.path / WEIGHTS_NAME}: the tensors of {name} do not fit together ({exc}); "
                                 "the checkpoint is damaged: quantize again") from exc

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
        return max((q.n_salient for q in self.layers.values()), default=0)

    @property
    def salient_dtype(self) -> torch.dtype:
        """The dtype the salient columns are stored in (one for the whole checkpoint)."""
        return next(iter(self.layers.values())).salient_weight.dtype
