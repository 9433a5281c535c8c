"""The whole quantize path on tiny random models of eight architectures, and the checkpoint round trip."""

import json

import pytest
import torch
from safetensors import safe_open
from tiny import ARCHS, corpus, make_model_dir

from gift_quant.config.settings import QuantizeConfig
from gift_quant.model import capture
from gift_quant.model.arch import block_linears, find_blocks
from gift_quant.model.loading import load_model
from gift_quant.packed.checkpoint import CONFIG_NAME, load
from gift_quant.packed.qlinear import QuantLinear
from gift_quant.quant import engine
from gift_quant.workflows.commands import quantize_to_checkpoint


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "calib.txt"
    p.write_text(corpus(3000, seed=1))
    return p


def _cfg(calib, **kw):
    base = dict(bits=3, salient=4, calib_data=str(calib), calib_samples=6, seq_len=32, device="cpu")
    base.update(kw)
    return QuantizeConfig(**base)


VARIANTS = {
    "llama": dict(), "mistral": dict(sym=False, group_size=32), "qwen2": dict(act_order=True),
    "qwen3": dict(bits=4, group_size=32, act_order=True, static_groups=True), "gemma2": dict(bits=2),
    "gemma3_text": dict(bits=8, salient=0), "phi3": dict(metric="owq"), "gpt_neox": dict(metric="wanda", sym=False),
}


@pytest.mark.parametrize("arch", ARCHS)
def test_quantize_roundtrip(arch, tmp_path, calib_file):
    src = make_model_dir(arch, tmp_path / "src")
    cfg = _cfg(calib_file, **VARIANTS[arch])
    model, _ = quantize_to_checkpoint(str(src), tmp_path / "out", cfg, progress=False)
    out = tmp_path / "out"
    # every linear inside the blocks is quantized; nothing else is
    _, blocks = find_blocks(model)
    for b in blocks:
        assert all(isinstance(m, QuantLinear) for m in block_linears(b).values()) or not block_linears(b)
        assert not any(isinstance(m, torch.nn.Linear) for m in b.modules())
    assert isinstance(model.lm_head, torch.nn.Linear)
    # the loaded checkpoint reproduces the in-memory quantized model exactly
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    loaded = load(out)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    # ... and is not the unquantized model
    fp = load_model(src)
    with torch.no_grad():
        assert not torch.allclose(fp(ids).logits, loaded(ids).logits)
    doc = json.loads((out / CONFIG_NAME).read_text())
    assert doc["spec"]["bits"] == cfg.bits and doc["format_version"] == 2
    assert all(v == cfg.salient for v in doc["salient_per_layer"].values())
    assert doc["effective_bits"] > cfg.bits
    assert {"tool", "version", "provenance", "spec", "quantize"} <= set(doc) and doc["quantize"]["metric"] == cfg.metric
    assert (out / "tokenizer.json").is_file()
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    qkeys = [k for k in keys if k.endswith(".qweight")]
    assert len(qkeys) == len(doc["layers"]) and all(k.rsplit(".", 1)[0] in doc["layers"] for k in qkeys)


def test_blocks_calibrated_sequentially_and_true_sequential(tmp_path, calib_file, monkeypatch):
    """Block 1 sees the quantized block 0's outputs; within a block, later groups see quantized earlier ones."""
    src = make_model_dir("llama", tmp_path / "src")
    seen = []
    real = capture.collect_inputs

    def spy(block, names, inputs, kwargs, on_input):
        kinds = {n: type(m).__name__ for n, m in block_linears(block).items()}
        seen.append((block, list(names), [x.clone() for x in inputs], kinds))
        return real(block, names, inputs, kwargs, on_input)

    monkeypatch.setattr(engine, "collect_inputs", spy)
    model, _ = quantize_to_checkpoint(str(src), tmp_path / "out", _cfg(calib_file), progress=False)
    groups = [names for _, names, _, _ in seen]
    assert groups[:4] == [["self_attn.q_proj"], ["self_attn.o_proj"], ["mlp.gate_proj"], ["mlp.down_proj"]]
    kinds_at_down = seen[3][3]
    assert kinds_at_down["self_attn.q_proj"] == "QuantLinear" and kinds_at_down["mlp.down_proj"] == "Linear"
    # block 1's inputs are block 0 (quantized) applied to block 0's inputs
    _, blocks = find_blocks(model)
    block0_inputs, block1_inputs = seen[0][2], seen[4][2]
    kwargs = capture.capture_block_inputs(model, blocks, torch.zeros(1, 32, dtype=torch.long), "cpu")[1][0]
    expect = capture.run_block(blocks[0], block0_inputs, kwargs)
    for a, b in zip(expect, block1_inputs):
        torch.testing.assert_close(a, b)
    fp_block0 = load_model(src).model.layers[0]
    fp_out = capture.run_block(fp_block0, block0_inputs, kwargs)
    assert not torch.allclose(fp_out[0], block1_inputs[0])


def test_hooks_and_stubs_removed_after_exception(tmp_path, calib_file, monkeypatch):
    src = make_model_dir("qwen2", tmp_path / "src")
    model = load_model(src)

    def boom(*a, **k):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(engine, "gptq_quantize", boom)
    windows = torch.randint(0, 300, (2, 16))
    with pytest.raises(RuntimeError, match="injected"):
        engine.quantize_model(model, windows, _cfg(calib_file), torch.device("cpu"), tmp_path / "run", progress=False)
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
        assert "forward" not in m.__dict__
