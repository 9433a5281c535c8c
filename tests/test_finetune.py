"""GIFT-SW as PEFT: the merged model is base + salient deltas, and peft reproduces it from the adapter."""

import json

import torch
from peft import PeftModel
from safetensors.torch import load_file
from tiny import corpus, make_model_dir, write_instruction_jsonl
from transformers import AutoModelForCausalLM

from gift_quant.cli.app import main


def test_finetune_merged_and_adapter(tmp_path):
    src = make_model_dir("qwen2", tmp_path / "src")
    text = tmp_path / "text.txt"
    text.write_text(corpus(3000, seed=4))
    train = write_instruction_jsonl(tmp_path / "train.jsonl")
    out = tmp_path / "ft"
    rc = main(["finetune", str(src), "--out", str(out), "--salient", "5", "--calib-data", str(text),
               "--calib-samples", "4", "--seq-len", "32", "--train-data", str(train), "--eval-data", str(text),
               "--steps", "6", "--batch-size", "2", "--lr", "1e-2", "--no-progress"])
    assert rc == 0
    base = AutoModelForCausalLM.from_pretrained(src)
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == base.dtype
    salient = load_file(str(out / "run" / "salient.safetensors"))
    base_sd, merged_sd = base.state_dict(), merged.state_dict()
    changed_layers = 0
    for key, w in base_sd.items():
        layer = key[: -len(".weight")]
        if layer in salient:
            diff_cols = torch.nonzero((merged_sd[key] != w).any(dim=0)).squeeze(1)
            assert set(diff_cols.tolist()) <= set(salient[layer].tolist()), key  # only salient columns move
            changed_layers += bool(diff_cols.numel())
        else:
            assert torch.equal(merged_sd[key], w), key  # embeddings, norms, head untouched
    assert changed_layers > 0
    # the adapter on the untouched base reproduces the merged model (peft's own loading code)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(src), out / "adapter")
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, merged(ids).logits, rtol=1e-4, atol=1e-4)
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 8
    # the merged folder is for inference: its configs ask for the KV cache (issue #23)
    assert json.loads((out / "config.json").read_text())["use_cache"] is True
    assert json.loads((out / "generation_config.json").read_text()).get("use_cache", True) is True
    assert merged.generation_config.use_cache is True
