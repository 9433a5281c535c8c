"""prepare -> train -> convert: swap SalientLinear layers in, and the packed or merged form back.

* ``prepare_quantized``: QuantLinear (post-training quantized) -> SalientLinear with a codes base.
* ``prepare_dense``: nn.Linear + chosen salient indices -> SalientLinear with a dense base
  (pre-GIFT-SW and PEFT fine-tuning of full-precision models).
* ``convert_to_quant`` / ``convert_to_dense``: back to QuantLinear (trained salient columns stored)
  or to nn.Linear with the trained columns merged in.
Everything but the ``gift_`` parameters is frozen.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config.settings import NoiseSpec, QuantSpec
from ..model.arch import model_linears, set_module
from ..packed.qlinear import QuantLinear
from ..util.seeds import derive_seed
from .layer import PAPER_NOISE, SalientLinear

__all__ = ["TRAINABLE_PREFIX", "convert_to_dense", "convert_to_quant", "freeze_all_but_gift", "linear_weights",
           "prepare_dense", "prepare_quantized", "quant_from_salient", "salient_from_quant", "salient_layers",
           "set_noise_key", "trainable_state"]

TRAINABLE_PREFIX = "gift_"


def freeze_all_but_gift(model: nn.Module) -> list[nn.Parameter]:
    params = []
    for name, p in model.named_parameters():
        trainable = name.rsplit(".", 1)[-1].startswith(TRAINABLE_PREFIX)
        p.requires_grad_(trainable)
        if trainable:
            params.append(p)
    return params


def salient_from_quant(q: QuantLinear, noise: NoiseSpec, seed: int,
                       noise_reference: torch.Tensor | None = None) -> SalientLinear:
    """A packed layer as a SalientLinear (codes base, trainable salient columns)."""
    layer = SalientLinear(
        q.in_features, q.out_features, q.salient_idx.long(),
        codes=q.codes(), scales=q.scales.T.float(), zeros=q.zero_points().T, g_idx=q.g_idx,
        salient_weight=q.salient_weight.float(), bias=q.bias, noise=noise, seed=seed,
        noise_reference=noise_reference).to(q.qweight.device)
    layer.spec = q.spec
    return layer


def quant_from_salient(s: SalientLinear, spec: QuantSpec | None = None) -> QuantLinear:
    """A trained SalientLinear back as a packed layer holding the trained salient columns.

    The storage spec defaults to the one the layer carries from the packed layer it was built from.
    """
    if hasattr(s, "sync_scales"):  # scaled_layer.ScaledSalientLinear: its scales trained since the last forward
        s.sync_scales()
    spec = spec or s.spec
    if spec is None:
        raise TypeError("this SalientLinear was not built from a packed layer: give its QuantSpec")
    q = QuantLinear.from_parts(s.codes.long(), s.scales, s.zeros, s.g_idx, s.salient_idx,
                               s.gift_salient.detach().float(), spec, s.bias)
    return q.to(s.delta.device).eval()


def linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Qualified name -> weight of every block linear (the full-precision reference of the noise step)."""
    return {n: m.weight.detach() for n, m in model_linears(model).items()}


def prepare_quantized(model: nn.Module, noise: NoiseSpec = PAPER_NOISE, seed: int = 0,
                      reference: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Swap every QuantLinear for a SalientLinear; ``reference``: full-precision weights to fit the noise step on.

    ``noise``: the run's one NoiseSpec (RecoverConfig.noise_spec), carried by every layer.
    """
    for i, (name, q) in enumerate(model_linears(model).items()):
        if not isinstance(q, QuantLinear):
            raise TypeError(f"{name} is {type(q).__name__}, expected a QuantLinear (quantize first)")
        ref = None if reference is None else reference[name]
        set_module(model, name, salient_from_quant(q, noise, derive_seed(seed, "layer-noise", i), ref))
    freeze_all_but_gift(model)
    return model


def prepare_dense(model: nn.Module, salient: dict[str, torch.Tensor], noise: NoiseSpec = PAPER_NOISE,
                  seed: int = 0) -> nn.Module:
    for i, (name, lin) in enumerate(model_linears(model).items()):
        idx = salient[name].long()
        w = lin.weight.detach()
        layer = SalientLinear(lin.in_features, lin.out_features, idx, dense=w.float(),
                              salient_weight=w[:, idx].float(), bias=lin.bias, noise=noise,
                              seed=derive_seed(seed, "layer-noise", i))
        layer.source_dtype = w.dtype
        set_module(model, name, layer.to(w.device))
    freeze_all_but_gift(model)
    return model


def salient_layers(model: nn.Module) -> dict[str, SalientLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SalientLinear)}


def convert_to_quant(model: nn.Module, spec: QuantSpec | None = None) -> nn.Module:
    """Every SalientLinear back to a QuantLinear (storage settings: each layer's own unless given)."""
    for name, s in salient_layers(model).items():
        if s.codes is None:
            raise TypeError(f"{name} has a dense base; use convert_to_dense")
        set_module(model, name, quant_from_salient(s, spec))
    return model


def convert_to_dense(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    for name, s in salient_layers(model).items():
        out_dtype = dtype or getattr(s, "source_dtype", torch.float32)
        lin = nn.Linear(s.in_features, s.out_features, bias=s.bias is not None, device=s.delta.device,
                        dtype=out_dtype)
        with torch.no_grad():
            lin.weight.copy_(s.merged_weight().to(out_dtype))
            if s.bias is not None:
                lin.bias.copy_(s.bias.to(out_dtype))
        lin.requires_grad_(False)
        set_module(model, name, lin)
    return model


def set_noise_key(model: nn.Module, key: int | None) -> None:
    for s in salient_layers(model).values():
        s.noise_key = key


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor (gift_ columns; or LoRA / all weights when the loop trains a baseline)."""
    return {n: p.detach().cpu().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}
