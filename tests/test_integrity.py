"""A checkpoint that changed on disk, or whose tensors are non-finite or disagree with its config, is refused."""

import json

import pytest
from safetensors.torch import load_file, save_file
from tiny import corpus, make_model_dir

from gift_quant.config.settings import QuantizeConfig
from gift_quant.packed.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load
from gift_quant.util.errors import GiftQuantError
from gift_quant.util.files import sha256_file
from gift_quant.workflows.stages import quantize_to_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    src = make_model_dir("llama", root / "src")
    (root / "calib.txt").write_text(corpus(2000, seed=4))
    cfg = QuantizeConfig(bits=3, salient=4, calib_data=str(root / "calib.txt"), calib_samples=4, seq_len=32,
                         device="cpu")
    quantize_to_checkpoint(str(src), root / "q", cfg, progress=False)
    return root / "q"


def _copy(ckpt, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(ckpt, dst)
    return dst


def test_manifest_records_every_file(ckpt):
    doc = json.loads((ckpt / CONFIG_NAME).read_text())
    assert doc["files"] == {n: sha256_file(ckpt / n) for n in (WEIGHTS_NAME, "config.json")}
    load(ckpt)


def test_flipped_byte_is_refused_naming_the_file(ckpt, tmp_path):
    c = _copy(ckpt, tmp_path)
    data = bytearray((c / WEIGHTS_NAME).read_bytes())
    data[len(data) // 2] ^= 0x01
    (c / WEIGHTS_NAME).write_bytes(bytes(data))
    with pytest.raises(GiftQuantError, match=f"{WEIGHTS_NAME} does not match the sha256"):
        load(c)


def test_nan_scale_is_refused_naming_the_layer(ckpt, tmp_path):
    c = _copy(ckpt, tmp_path)
    tensors = load_file(str(c / WEIGHTS_NAME))
    name = next(k for k in tensors if k.endswith(".scales"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(c / WEIGHTS_NAME), metadata={"format": "pt"})
    doc = json.loads((c / CONFIG_NAME).read_text())
    doc["files"][WEIGHTS_NAME] = sha256_file(c / WEIGHTS_NAME)  # a consistent manifest: the tensor check must catch it
    (c / CONFIG_NAME).write_text(json.dumps(doc))
    with pytest.raises(GiftQuantError, match=f"layer {name.rsplit('.', 1)[0]} has non-finite scales"):
        load(c)


def test_config_bits_that_disagree_with_the_packed_data_are_refused(ckpt, tmp_path):
    c = _copy(ckpt, tmp_path)
    doc = json.loads((c / CONFIG_NAME).read_text())
    doc["spec"]["bits"] = 2  # 3-bit data read as 2-bit would be a silently wrong model
    (c / CONFIG_NAME).write_text(json.dumps(doc))
    with pytest.raises(GiftQuantError, match="does not match gift_quant_config.json for layer .*: bits 2 in the "
                                             "config, 3 in the tensors"):
        load(c)


def test_deleted_weights_are_refused(ckpt, tmp_path):
    c = _copy(ckpt, tmp_path)
    (c / WEIGHTS_NAME).unlink()
    with pytest.raises(GiftQuantError, match="is missing"):
        load(c)


def test_inspect_verifies_the_weights(ckpt, tmp_path, capsys):
    from gift_quant.cli.app import main

    assert main(["inspect", str(ckpt)]) == 0
    assert "health        verified" in capsys.readouterr().out
    c = _copy(ckpt, tmp_path)
    with open(c / WEIGHTS_NAME, "r+b") as f:  # truncated by a crash or a full disk
        f.truncate(1000)
    assert main(["inspect", str(c)]) == 2
    err = capsys.readouterr().err
    assert "is not healthy" in err and WEIGHTS_NAME in err and "Traceback" not in err


def test_inspect_measures_bits_from_the_tensors(ckpt, tmp_path):
    """#23 req 4: the bits inspect reports are the stored buffers', not the config's record (which its own
    sha256 does not cover); untouched, the two agree (the engine's formula vs the tensors' sizes)."""
    from gift_quant.export.inspection import format_report, inspect_checkpoint
    from gift_quant.packed.qlinear import QuantLinear

    model = load(ckpt)
    stored = weights = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            stored += sum(8 * t.numel() * t.element_size() for n, t in m.named_buffers()
                          if n in ("qweight", "scales", "qzeros", "g_idx", "salient_idx", "salient_weight"))
            weights += m.in_features * m.out_features
    info = inspect_checkpoint(ckpt)
    recorded = json.loads((ckpt / CONFIG_NAME).read_text())["effective_bits"]
    assert info["health"].startswith("verified")
    assert info["effective_bits"] == pytest.approx(stored / weights, rel=1e-12)
    assert info["effective_bits"] == pytest.approx(recorded, rel=1e-9)
    c = _copy(ckpt, tmp_path)
    doc = json.loads((c / CONFIG_NAME).read_text())
    doc["effective_bits"] = 1.0
    for layer in doc["layers"].values():
        layer["effective_bits"] = 1.0
    (c / CONFIG_NAME).write_text(json.dumps(doc))
    info = inspect_checkpoint(c)
    assert info["effective_bits"] == pytest.approx(stored / weights, rel=1e-12)
    assert all(row["effective_bits"] > 3 for row in info["layers"])
    assert "measured from the stored tensors" in format_report(info)


@pytest.mark.parametrize("key, value, held", [("bits", 2, "3 in the tensors"), ("groups", 2, "1 in the tensors")])
def test_inspect_is_broken_where_load_refuses(ckpt, tmp_path, capsys, key, value, held):
    """#23 req 4: recorded bits and groups are checked against the packed shapes."""
    from gift_quant.cli.app import main

    c = _copy(ckpt, tmp_path)
    doc = json.loads((c / CONFIG_NAME).read_text())
    if key == "bits":
        doc["spec"]["bits"] = value
    else:
        for layer in doc["layers"].values():
            layer["groups"] = value
    (c / CONFIG_NAME).write_text(json.dumps(doc))
    with pytest.raises(GiftQuantError, match=held) as refused:
        load(c)
    assert main(["inspect", str(c)]) == 2
    out, err = capsys.readouterr()
    assert "health        broken" in out and "verified" not in out.split("health", 1)[1].splitlines()[0]
    assert held in err and str(refused.value).split(": ", 1)[0] in err
