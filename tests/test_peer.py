"""compare's gptq-peer: GPTQModel quantizes the same model on the same windows; its checkpoint is decoded
exactly into a plain model, which must agree with GPTQModel's own loader on the saved checkpoint."""

import pytest
import torch
from test_export import make_src, rel_err
from tiny import corpus

from gift_quant.config.settings import QuantizeConfig


def test_peer_checkpoint_decodes_like_gptqmodel_loads_it(tmp_path, no_compile):
    gptqmodel = pytest.importorskip("gptqmodel")
    from gift_quant.compare.gptqmodel_peer import quantize_with_gptqmodel

    src = make_src(tmp_path / "src", tied=False)
    calib = tmp_path / "calib.txt"
    calib.write_text(corpus(2000, seed=1))
    cfg = QuantizeConfig(bits=4, group_size=-1, salient=0, calib_data=str(calib), calib_samples=4, seq_len=32)
    plain, bits = quantize_with_gptqmodel(src, tmp_path / "peer", cfg)
    # effective bits = every stored bit of the quantized layers (qweight, qzeros, scales, g_idx) / weights
    from safetensors.torch import load_file

    saved = {k: v for f in (tmp_path / "peer").glob("*.safetensors") for k, v in load_file(str(f)).items()}
    layers = [k[: -len(".qweight")] for k in saved if k.endswith(".qweight")]
    stored = sum(saved[f"{n}.{t}"].numel() * saved[f"{n}.{t}"].element_size() * 8
                 for n in layers for t in ("qweight", "qzeros", "scales", "g_idx"))
    weights = sum(plain.get_submodule(n).weight.numel() for n in layers)
    assert len(layers) == 7 * plain.config.num_hidden_layers
    assert bits == pytest.approx(stored / weights, rel=1e-9)
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    theirs = gptqmodel.GPTQModel.load(str(tmp_path / "peer"), device="cpu", backend=gptqmodel.BACKEND.TORCH,
                                      dtype=torch.float16)
    with torch.no_grad():
        ours = plain(ids).logits
        ref = theirs.model(ids).logits
    assert rel_err(ref, ours) < 3e-3  # GPTQModel's CPU kernel dequantizes in fp16
    # the weights really are on a 4-bit grid: 16 distinct values per (row, group) at most
    w = plain.model.layers[0].mlp.down_proj.weight
    assert all(w[r].unique().numel() <= 16 for r in range(4))  # per-row grid, as compare runs it
