"""The noise step's full-precision reference read one linear at a time from the source's safetensors.

``prepare_recovery`` no longer loads the whole source model: the lazy reference must give exactly the
weights (and so exactly the noise steps) that loading the model gives, for a single file and for a
sharded folder with an index, and fall back to loading when tensors are not stored by module name.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import QUIET_CPU, corpus, make_model_dir

from gift_quant.config.settings import NoiseSpec, QuantizeConfig
from gift_quant.model.loading import load_model
from gift_quant.model.source_weights import source_weights
from gift_quant.packed.checkpoint import load
from gift_quant.recover.model import linear_weights, prepare_quantized
from gift_quant.workflows.stages import prepare_recovery, quantize_to_checkpoint

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_model_dir("llama", tmp_path_factory.mktemp("src"))


@pytest.fixture(scope="module")
def ckpt(src, tmp_path_factory):
    calib = tmp_path_factory.mktemp("data") / "calib.txt"
    calib.write_text(corpus(2000, seed=1))
    out = tmp_path_factory.mktemp("ckpt") / "q"
    quantize_to_checkpoint(str(src), out, QuantizeConfig(calib_data=str(calib), calib_samples=4, seq_len=32,
                                                         salient=4), runtime=QUIET_CPU)
    return out


def deltas(model) -> dict:
    return {n: m.delta for n, m in model.named_modules() if hasattr(m, "delta")}


def test_lazy_reference_equals_loading_the_model(src, ckpt, tmp_path):
    full = linear_weights(load_model(src))
    lazy = source_weights(src, list(full), "cpu")
    assert lazy is not None and list(lazy) == list(full)
    for name, w in full.items():
        assert torch.equal(lazy[name], w.float()), name
    # the noise steps of the recovery model are those of the old whole-model path
    old = deltas(prepare_quantized(load(ckpt), noise=NoiseSpec("normal", 4), seed=0, reference=full))
    new = deltas(prepare_recovery(ckpt, src, NoiseSpec("normal", 4), 0))
    assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)

    # a sharded folder with an index reads the same tensors
    sharded = tmp_path / "sharded"
    load_model(src).save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(set(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    lazy = source_weights(sharded, list(full))
    assert all(torch.equal(lazy[n], w.float()) for n, w in full.items())


def test_falls_back_when_tensors_are_not_stored_by_module_name(src, ckpt, tmp_path):
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (renamed / f.name).write_bytes(f.read_bytes())
    tensors = load_file(src / "model.safetensors")
    name = next(k for k in tensors if k.endswith("q_proj.weight"))
    tensors["old_prefix." + name] = tensors.pop(name)
    save_file(tensors, renamed / "model.safetensors")
    assert source_weights(renamed, [name.removesuffix(".weight")]) is None
    assert source_weights(tmp_path, ["x"]) is None  # no safetensors at all
