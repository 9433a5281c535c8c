"""One linear's full-precision weight at a time, straight from a model folder's safetensors shards.

Fitting the noise step (recover/layer.py) needs every block linear's original weight once. Loading the
whole source model for that costs its full size in host memory (280 GB for a 70B model in float32);
reading one tensor at a time from the shards costs one layer, and the fit can then run on the GPU.
Folders whose tensors are not stored under the modules' names (weights renamed at load time,
``.bin`` files) return None from ``source_weights``, and the caller loads the model instead.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

__all__ = ["SourceWeights", "source_weights"]


class SourceWeights(Mapping):
    """name -> float32 weight (out, in) of ``name + ".weight"``, read on access onto ``device``."""

    def __init__(self, shard_of: dict[str, Path], names: list[str], device: torch.device | str = "cpu"):
        self._shard_of, self._names, self.device = shard_of, names, torch.device(device)

    def __getitem__(self, name: str) -> torch.Tensor:
        with safe_open(self._shard_of[f"{name}.weight"], "pt") as f:
            return f.get_tensor(f"{name}.weight").to(self.device, torch.float32)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _shards(folder: Path) -> dict[str, Path] | None:
    """tensor name -> shard file, from the index or the single file; None when there are no safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map") or {}
        return {k: folder / v for k, v in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        return None
    with safe_open(single, "pt") as f:
        return dict.fromkeys(f.keys(), single)


def source_weights(folder: Path, names: list[str], device: torch.device | str = "cpu") -> SourceWeights | None:
    """A lazy reference for the linears ``names`` of the model in ``folder``, or None if not stored by name."""
    shard_of = _shards(Path(folder))
    if shard_of is None or any(f"{n}.weight" not in shard_of for n in names):
        return None
    return SourceWeights(shard_of, names, device)
