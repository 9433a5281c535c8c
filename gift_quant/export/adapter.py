"""The one-hot PEFT LoRA adapter: full-precision columns added back on top of a base model, by peft alone.

Per module, for K input columns ``idx`` and values ``delta`` (out x K): ``lora_A`` (r x in) holds one-hot
rows selecting the inputs ``idx``, ``lora_B`` (out x r) holds ``delta`` zero-padded to rank r, and
``lora_alpha = r`` makes peft's scaling 1, so ``base + B A`` is the base with ``delta`` added at exactly
those columns. One rank r for every module (what servers such as vLLM expect).

Two writers share it: the exports (``delta`` = the salient columns minus what the exported quantized base
holds there) and ``finetune`` (``delta`` = the trained minus the original salient columns of the
untouched full-precision base).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from ..packed.qlinear import QuantLinear
from ..util.errors import GiftQuantError
from ..util.files import atomic_dir

__all__ = ["ADAPTER_DIR", "LORA_RANKS", "SalientAdapter", "lora_rank", "onehot_lora", "write_adapter"]

LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # ranks vLLM's --max-lora-rank accepts (beside 1)
ADAPTER_DIR = "adapter"


def lora_rank(k: int) -> int:
    """The smallest rank of LORA_RANKS that holds ``k`` salient columns."""
    for r in LORA_RANKS:
        if k <= r:
            return r
    raise GiftQuantError(
        f"a layer has {k} salient columns, more than the largest LoRA rank servers accept ({LORA_RANKS[-1]}, "
        "vLLM's --max-lora-rank limit); export the merged model with --format dense instead")


def onehot_lora(idx: torch.Tensor, delta: torch.Tensor, in_features: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A (r, in), lora_B (out, r)) in float32 with ``B @ A`` = ``delta`` at columns ``idx``, 0 elsewhere."""
    a = torch.zeros(r, in_features)
    a[torch.arange(idx.numel()), idx.long()] = 1.0
    b = torch.zeros(delta.shape[0], r)
    b[:, : idx.numel()] = delta.float()
    return a, b


def write_adapter(folder: Path, columns: dict[str, tuple[torch.Tensor, torch.Tensor, int]], r: int,
                  targets: list[str], dtype: torch.dtype = torch.float32, base_model: str | None = None) -> None:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` into ``folder``, atomically.

    ``columns``: module name -> (idx (K,), delta (out, K), in_features); ``targets``: peft's
    ``target_modules``; ``dtype``: of the stored A and B; ``base_model``: recorded as
    ``base_model_name_or_path``. The folder appears complete or not at all (an earlier one is replaced).
    """
    from peft import LoraConfig

    tensors = {}
    for name, (idx, delta, in_features) in columns.items():
        a, b = onehot_lora(idx, delta, in_features, r)
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.to(dtype).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.to(dtype).contiguous()
    config = LoraConfig(r=r, lora_alpha=r, target_modules=targets, lora_dropout=0.0, bias="none",
                        task_type="CAUSAL_LM", inference_mode=True, init_lora_weights=True,
                        base_model_name_or_path=base_model)
    with atomic_dir(folder) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(str(tmp))


class SalientAdapter:
    """The adapter of an export, gathered one layer at a time while the base's tensors are written.

    ``lora_B`` is the salient columns minus what the exported base holds there (0 by construction; the
    caller passes the base's values at those columns, dequantized from the very tensors it writes). It is
    stored in the checkpoint's salient dtype unless some difference is not exact there: then in float32.
    """

    def __init__(self, r: int, salient_dtype: torch.dtype):
        self.r = r
        self.salient_dtype = salient_dtype
        self.dtype = salient_dtype
        self.columns: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}

    def add(self, name: str, q: QuantLinear, base_at_salient: torch.Tensor) -> None:
        """``base_at_salient``: (out, K) float32, the base as its loaders dequantize it at ``q.salient_idx``."""
        delta = q.salient_weight.float() - base_at_salient.float()
        if not torch.equal(delta.to(self.salient_dtype).float(), delta):
            self.dtype = torch.float32  # the base is not 0 at some salient column: keep B exact
        self.columns[name] = (q.salient_idx.long(), delta, q.in_features)

    def write(self, folder: Path, targets: list[str]) -> None:
        write_adapter(folder, self.columns, self.r, targets, self.dtype)
