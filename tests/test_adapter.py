"""The one-hot LoRA adapter writer shared by export and finetune: B @ A is the delta at the chosen columns."""

import json

import pytest
import torch
from safetensors.torch import load_file

from gift_quant.export.adapter import lora_rank, onehot_lora, write_adapter


def test_onehot_lora_puts_delta_at_its_columns():
    idx = torch.tensor([7, 2, 11])
    delta = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    a, b = onehot_lora(idx, delta, 16, 8)
    assert a.shape == (8, 16) and b.shape == (5, 8)
    want = torch.zeros(5, 16)
    want[:, idx] = delta
    assert torch.equal(b @ a, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_write_adapter(tmp_path, dtype):
    cols = {"model.layers.0.mlp.down_proj": (torch.tensor([1, 4]), torch.ones(3, 2), 6)}
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "stale.txt").write_text("an earlier adapter")
    write_adapter(folder, cols, lora_rank(2), ["down_proj"], dtype=dtype, base_model="/models/base")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # replaced whole, no temporary left
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 8 and cfg["target_modules"] == ["down_proj"]
    assert cfg["base_model_name_or_path"] == "/models/base" and cfg["peft_type"] == "LORA"
    t = load_file(folder / "adapter_model.safetensors")
    a = t["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"]
    b = t["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"]
    assert a.dtype == b.dtype == dtype and a.shape == (8, 6) and b.shape == (3, 8)
    assert torch.equal((b.float() @ a.float())[:, [1, 4]], torch.ones(3, 2))
