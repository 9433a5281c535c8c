"""A source whose config.json says tie_word_embeddings while its weights hold a distinct head (issue #22 req 4).

transformers loads such a folder with the two kept apart (it warns and does not tie them), so that is the
source's behaviour; gift-quant's outputs must have it too. Before, the checkpoint's own ``eval`` rejected it
and its dense export silently became a different model (the head replaced by the embeddings). Now the
outputs record ``tie_word_embeddings: false``: the checkpoint equals, byte for byte, the one quantized from
the same weights with an honest config, and the dense export computes what the native checkpoint does.
A truly tied source (no distinct head) stays tied. Other disagreements are refused (test_bad_inputs.py).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tiny import corpus, make_model_dir, tiny_config

from gift_quant.cli.app import main
from gift_quant.packed.checkpoint import WEIGHTS_NAME, load

pytestmark = pytest.mark.usefixtures("torch_single_thread")

SMALL = ["--calib-samples", "4", "--seq-len", "32", "--salient", "4", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("source-config")
    honest = make_model_dir("llama", root / "honest")  # tie_word_embeddings false, distinct head
    claims_tied = root / "claims-tied"
    shutil.copytree(honest, claims_tied)
    cfg = json.loads((claims_tied / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (claims_tied / "config.json").write_text(json.dumps(cfg))
    (root / "calib.txt").write_text(corpus(), encoding="utf-8")
    return {"root": root, "honest": honest, "claims_tied": claims_tied, "calib": root / "calib.txt"}


def quantize(world, src, out, capsys) -> str:
    rc = main(["quantize", str(src), "--out", str(out), "--calib-data", str(world["calib"]), *SMALL])
    err = capsys.readouterr().err
    assert rc == 0, err
    return err


def test_distinct_head_under_a_tied_config_is_kept(world, tmp_path, capsys):
    err = quantize(world, world["claims_tied"], tmp_path / "a", capsys)
    assert "says tie_word_embeddings true but the weights hold an output head" in err
    quantize(world, world["honest"], tmp_path / "b", capsys)
    assert (tmp_path / "a" / WEIGHTS_NAME).read_bytes() == (tmp_path / "b" / WEIGHTS_NAME).read_bytes()
    assert json.loads((tmp_path / "a" / "config.json").read_text())["tie_word_embeddings"] is False
    # its own eval accepts it, and the dense export is the native model, head included
    rc = main(["eval", str(tmp_path / "a"), "--ppl-data", str(world["calib"]), "--seq-len", "32", "--max-windows",
               "2", "--device", "cpu", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert main(["export", str(tmp_path / "a"), "--out", str(tmp_path / "dense"), "--format", "dense"]) == 0
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    native = load(tmp_path / "a")
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    with torch.no_grad():
        want, got = native(ids).logits, dense(ids).logits
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
        # the head matters: tying it to the embeddings (what the old export did) is another model
        dense.lm_head.weight.copy_(dense.model.embed_tokens.weight)
        assert not torch.allclose(dense(ids).logits, want, rtol=1e-2, atol=1e-2)


def test_a_truly_tied_source_stays_tied(world, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    src = tmp_path / "tied"
    shutil.copytree(world["honest"], src)
    for f in src.glob("*.safetensors"):
        f.unlink()
    cfg = tiny_config("llama")
    cfg.tie_word_embeddings = True
    AutoModelForCausalLM.from_config(cfg).save_pretrained(src)
    err = quantize(world, src, tmp_path / "q", capsys)
    assert "tie_word_embeddings" not in err
    assert json.loads((tmp_path / "q" / "config.json").read_text())["tie_word_embeddings"] is True
    model = load(tmp_path / "q")
    assert model.lm_head.weight is model.model.embed_tokens.weight
