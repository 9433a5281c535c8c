"""Recovery on a tiny model: the loss goes down, and the packed checkpoint reproduces the trained model."""

import dataclasses
import json

import pytest
import torch
from tiny import QUIET_CPU, corpus, make_model_dir

from gift_quant.config.settings import NoiseSpec, QuantizeConfig, RecoverConfig, read_recipe
from gift_quant.packed.checkpoint import load, read_gift_config, read_spec, save_checkpoint
from gift_quant.recover.loop import eval_loss, train
from gift_quant.recover.model import convert_to_quant, prepare_quantized, salient_layers
from gift_quant.workflows.commands import quantize_to_checkpoint


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    root = tmp_path_factory.mktemp("rec")
    src = make_model_dir("llama", root / "src")
    calib = root / "calib.txt"
    calib.write_text(corpus(3000, seed=1))
    cfg = QuantizeConfig(bits=3, salient=8, calib_data=str(calib), calib_samples=6, seq_len=32,
                         salient_dtype="float32")
    quantize_to_checkpoint(str(src), root / "q", cfg, runtime=QUIET_CPU)
    return root, src


def _windows(tok_seed, n=32, L=32, vocab=300):
    # a learnable stream: a short repeated pattern the random model does not know yet
    g = torch.Generator().manual_seed(tok_seed)
    pattern = torch.randint(0, vocab, (7,), generator=g)
    ids = pattern.repeat(n * L // 7 + 1)[: n * L].view(n, L)
    return ids, ids.clone()


@pytest.mark.parametrize("noise", ["normal", "none"])
def test_loss_decreases_and_checkpoint_reproduces_trained_model(quantized, tmp_path, noise):
    root, src = quantized
    model = prepare_quantized(load(root / "q"), noise=NoiseSpec(noise, 4), seed=0)
    ids, labels = _windows(0)
    before = eval_loss(model, ids[:4], labels[:4], "cpu")
    start = {n: s.gift_salient.detach().clone() for n, s in salient_layers(model).items()}
    summary = train(model, ids, labels, RecoverConfig(loss="ce", steps=15, lr=2e-2, batch_size=4, save_every=100),
                    tmp_path / "run", progress=False)
    after = eval_loss(model, ids[:4], labels[:4], "cpu")
    losses = [h["loss"] for h in summary["history"]]
    assert after < 0.9 * before, (before, after)
    assert sum(losses[-3:]) < sum(losses[:3])
    assert any(not torch.equal(start[n], s.gift_salient) for n, s in salient_layers(model).items())
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 16)) and all("tokens_per_s" in r for r in lines)
    # pack: the checkpoint's logits equal the trained (eval-mode) model's
    model.eval()
    x = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        trained_logits = model(x).logits
    # float32 salient columns: the stored model computes exactly what was trained
    convert_to_quant(model, dataclasses.replace(read_spec(read_gift_config(root / "q")), salient_dtype="float32"))
    save_checkpoint(model, tmp_path / "ckpt", src, read_gift_config(root / "q"))
    with torch.no_grad():
        loaded_logits = load(tmp_path / "ckpt")(x).logits
    torch.testing.assert_close(loaded_logits, trained_logits, rtol=1e-4, atol=1e-4)


def test_every_shipped_recipe_parses():
    from pathlib import Path

    recipes = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
    assert len(recipes) >= 4
    for r in recipes:
        sections = read_recipe(r)
        assert "quantize" in sections, r


def test_fsdp_launch_is_refused_with_advice(quantized, tmp_path, monkeypatch):
    """accelerate on CPU never builds FSDP, so the launch is simulated: the loop must refuse, not half-work."""
    from accelerate import Accelerator, DistributedType

    from gift_quant.util.errors import GiftQuantError

    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType.FSDP))
    root, _ = quantized
    model = prepare_quantized(load(root / "q"), noise=NoiseSpec("normal", 4), seed=0)
    ids, labels = _windows(0, n=4)
    with pytest.raises(GiftQuantError, match="does not support FSDP.*torchrun"):
        train(model, ids, labels, RecoverConfig(loss="ce", steps=1, batch_size=2), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
