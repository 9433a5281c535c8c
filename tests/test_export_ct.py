"""The compressed-tensors ``pack-quantized`` export, checked with compressed-tensors' own decompressor.

* round trip: ``CompressedTensorsDequantizer`` (the library's model-free decompression, which runs the
  pack-quantized compressor's ``decompress`` per layer) turns the exported tensors back into dense
  weights that equal gift-quant's dequantized base bit for bit (float32 scales) or to float16 rounding
  (float16 scales), at 2, 3, 4 and 8 bits, per-row (channel strategy) and grouped (group strategy);
* the sign / zero-point convention: the library unpacks signed values ``code - 2^(b-1)`` (and zero
  points ``zero - 2^(b-1)``), i.e. the packed bits are gift-quant's unsigned codes;
* end to end: transformers (its compressed-tensors integration decompresses through the same
  compressor) + peft with ``EXPORT/adapter`` reproduce ``gift_quant.load(CKPT)``'s logits;
* what the format cannot carry (groups that skip salient columns or follow act-order: no g_idx) is
  refused with a message naming the layer, the setting and the formats that can carry it.

Tiny random Llama models (and qwen2 / phi3 / gemma3), built in the test (the same fixtures as
test_export.py).
"""

import json
import shutil
import warnings

import pytest
import torch
from test_export import make_src, quantized_checkpoints, rel_err
from tiny import corpus, make_model_dir

from gift_quant.cli.app import main
from gift_quant.config.settings import QuantizeConfig
from gift_quant.export import (
    ADAPTER_DIR,
    EXPORT_INFO,
    NativeCheckpoint,
    export,
    export_compressed_tensors,
    export_gptq_lora,
)
from gift_quant.export.inspection import format_report, inspect_checkpoint
from gift_quant.packed.checkpoint import load
from gift_quant.util.errors import GiftQuantError
from gift_quant.workflows.commands import quantize_to_checkpoint

pytestmark = pytest.mark.usefixtures("torch_single_thread")

CASES = {
    # name: quantize settings; every one of them is exactly representable in pack-quantized
    "w2row": dict(bits=2, salient=4),  # per-row grid -> channel strategy
    "w3row_asym_act": dict(bits=3, sym=False, act_order=True, salient=4),  # act-order is free with one group
    "w4row": dict(bits=4, salient_fraction=0.1),  # K 6 / 13 -> LoRA rank 16
    "w8row_asym": dict(bits=8, sym=False, salient=4),
    "w2g32": dict(bits=2, group_size=32, salient=0),  # contiguous groups -> group strategy
    "w3g32": dict(bits=3, group_size=32, salient=0),
    "w4g16_asym_static": dict(bits=4, group_size=16, sym=False, act_order=True, static_groups=True, salient=0),
    "w8g32": dict(bits=8, group_size=32, salient=0),
    # not representable: groups are runs of non-salient columns (g_idx), or follow act-order
    "w4g32_salient": dict(bits=4, group_size=32, salient=4, group_layout="compact"),
    "w4g32_act": dict(bits=4, group_size=32, act_order=True, salient=0, group_layout="compact"),
}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_src(tmp_path_factory.mktemp("src"), tied=False)


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "calib.txt"
    p.write_text(corpus(2000, seed=1))
    return p


@pytest.fixture(scope="module")
def ckpt(src, calib, tmp_path_factory):
    return quantized_checkpoints(tmp_path_factory.mktemp("ckpt"), src, calib, CASES)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))


def load_export(path, compressed: bool = False):
    """transformers + compressed-tensors. ``dequantize=True`` decompresses at load (peft needs a ``weight``);
    ``compressed``: transformers' default, the modules stay packed until the first forward pass."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kw = {} if compressed else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    with warnings.catch_warnings():  # "you passed quantization_config ... loading attributes will be overwritten"
        warnings.simplefilter("ignore", UserWarning)
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)


# every bit width per-row and grouped with float32 scales (exact), and a few with float16 scales
ROUND_TRIP = [(name, "float32") for name in ("w2row", "w3row_asym_act", "w4row", "w8row_asym", "w2g32", "w3g32",
                                             "w4g16_asym_static", "w8g32")]
ROUND_TRIP += [("w3row_asym_act", "float16"), ("w8row_asym", "float16"), ("w3g32", "float16")]


@pytest.mark.parametrize("name,dtype", ROUND_TRIP)
def test_round_trip_through_compressed_tensors_decompressor(name, dtype, ckpt, tmp_path):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    native = ckpt(name)
    nat = NativeCheckpoint(native)
    settings = CASES[name]
    grouped = settings.get("group_size", -1) > 0
    summary = export_compressed_tensors(native, tmp_path / "ct", dtype=dtype)
    assert summary["strategy"] == ("group" if grouped else "channel") and summary["bits"] == settings["bits"]

    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)  # the library accepts the config as written
    assert parsed.quant_method == "compressed-tensors" and parsed.format == "pack-quantized"
    assert parsed.quantization_status == "compressed" and parsed.ignore == ["lm_head"]
    w = parsed.config_groups["group_0"].weights
    assert (w.num_bits, w.type, w.symmetric, w.strategy) == (
        settings["bits"], "int", settings.get("sym", True), "group" if grouped else "channel")
    assert w.group_size == (settings["group_size"] if grouped else None) and w.actorder is None

    tensors = load_file(tmp_path / "ct" / "model.safetensors")
    scale_dtype = getattr(torch, dtype)
    for lname, lay in nat.layers.items():
        n_groups = lay.in_features // settings["group_size"] if grouped else 1
        assert tensors[f"{lname}.weight_packed"].dtype == torch.int32
        assert tensors[f"{lname}.weight_packed"].shape == (lay.out_features, -(-lay.in_features * lay.bits // 32))
        assert tensors[f"{lname}.weight_scale"].dtype == scale_dtype
        assert tensors[f"{lname}.weight_scale"].shape == (lay.out_features, n_groups)
        assert tensors[f"{lname}.weight_shape"].tolist() == [lay.out_features, lay.in_features]
        assert (f"{lname}.weight_zero_point" in tensors) == (not settings.get("sym", True))
        assert f"{lname}.weight_g_idx" not in tensors and f"{lname}.weight" not in tensors

    dense = CompressedTensorsDequantizer(tmp_path / "ct", dtype=torch.float32).validate(dict(tensors))
    for lname, lay in nat.layers.items():
        got = dense[f"{lname}.weight"]
        ref = lay.dequantized_base()  # float32, exactly 0 at the salient columns
        if dtype == "float32":
            assert torch.equal(got, ref), lname
        else:  # the library dequantizes in the scale dtype: scale * (q - z) rounded once to float16
            assert torch.equal(got, ref.to(scale_dtype).float()), lname
        assert torch.equal(got[:, lay.salient_idx.long()], torch.zeros(lay.out_features, lay.n_salient))
    # everything else passes through unchanged
    assert torch.equal(dense["model.embed_tokens.weight"], nat.tensors["model.embed_tokens.weight"].to(scale_dtype))


@pytest.mark.parametrize("name", ["w2row", "w8row_asym", "w4g16_asym_static"])
def test_sign_and_zero_point_convention(name, ckpt, tmp_path):
    """compressed-tensors unpacks signed ints: code - 2^(b-1) and zero - 2^(b-1); symmetric has no zero
    point (it is 0 in the signed domain, 2^(b-1) in gift-quant's unsigned one)."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors.torch import load_file

    nat = NativeCheckpoint(ckpt(name))
    export_compressed_tensors(nat.path, tmp_path / "ct")
    tensors = load_file(tmp_path / "ct" / "model.safetensors")
    off = 2 ** (nat.bits - 1)
    for lname, lay in nat.layers.items():
        shape = tensors[f"{lname}.weight_shape"]
        signed = unpack_from_int32(tensors[f"{lname}.weight_packed"], nat.bits, shape).long()
        assert int(signed.min()) >= -off and int(signed.max()) < off
        keep = torch.ones(lay.in_features, dtype=torch.bool)
        keep[lay.salient_idx.long()] = False
        assert torch.equal((signed + off).T[keep], lay.codes().T[keep].long()), lname
        if not nat.sym:
            n_groups = tensors[f"{lname}.weight_scale"].shape[1]
            zp = unpack_from_int32(tensors[f"{lname}.weight_zero_point"], nat.bits,
                                   (lay.out_features, n_groups), packed_dim=0).long()
            assert torch.equal((zp + off).T[: lay.n_groups], lay.zero_points().long()), lname


@pytest.mark.parametrize("name", ["w2row", "w3row_asym_act", "w4row", "w8row_asym", "w3g32"])
def test_base_plus_adapter_matches_native(name, ckpt, ids, tmp_path):
    """transformers decompresses with compressed-tensors; peft adds the salient columns back."""
    pytest.importorskip("compressed_tensors")
    from peft import PeftModel

    native = ckpt(name)
    nat = NativeCheckpoint(native)
    summary = export_compressed_tensors(native, tmp_path / "ct")
    adapter_cfg = json.loads((tmp_path / "ct" / ADAPTER_DIR / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == adapter_cfg["lora_alpha"] == summary["lora_rank"]
    assert summary["lora_rank"] == (16 if name == "w4row" else 8)
    base = load_export(tmp_path / "ct")
    for lname, lay in nat.layers.items():  # the dense weights transformers ends up with
        assert torch.equal(base.get_submodule(lname).weight, lay.dequantized_base()), lname
    model = PeftModel.from_pretrained(base, str(tmp_path / "ct" / ADAPTER_DIR))
    with torch.no_grad():
        ref = load(native)(ids).logits
        got = model(ids).logits
        assert rel_err(got, ref) < 1e-3  # observed ~3e-7 (float32)
        with model.disable_adapter():
            base_only = model(ids).logits
        if nat.max_salient:
            assert rel_err(base_only, ref) > 1e-2  # the adapter is what restores the salient columns
        if name == "w2row":  # transformers' default: modules stay packed, decompressed at the first forward
            packed = load_export(tmp_path / "ct", compressed=True)
            assert hasattr(packed.model.layers[0].self_attn.q_proj, "weight_packed")
            assert rel_err(packed(ids).logits, base_only) < 1e-6


def test_tied_embeddings(calib, ids, tmp_path):
    """SmolLM2's layout: the export writes the input embedding, transformers ties lm_head to it."""
    pytest.importorskip("compressed_tensors")
    from peft import PeftModel

    src = make_src(tmp_path / "src", tied=True)
    cfg = QuantizeConfig(calib_data=str(calib), calib_samples=4, seq_len=32, device="cpu", bits=3, salient=4)
    quantize_to_checkpoint(str(src), tmp_path / "q", cfg, progress=False)
    export_compressed_tensors(tmp_path / "q", tmp_path / "ct")
    base = load_export(tmp_path / "ct")
    assert base.lm_head.weight.data_ptr() == base.model.embed_tokens.weight.data_ptr()
    model = PeftModel.from_pretrained(base, str(tmp_path / "ct" / ADAPTER_DIR))
    with torch.no_grad():
        assert rel_err(model(ids).logits, load(tmp_path / "q")(ids).logits) < 1e-3


@pytest.mark.parametrize("arch", ["qwen2", "phi3", "gemma3_text"])
def test_other_archs(arch, calib, ids, tmp_path):
    """Linear biases (qwen2), fused qkv_proj / gate_up_proj (phi3), gemma's scaled embeddings."""
    pytest.importorskip("compressed_tensors")
    from peft import PeftModel

    src = make_model_dir(arch, tmp_path / "src")
    if arch == "qwen2":  # random init leaves the biases 0; make them matter
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        with torch.no_grad():
            for n, prm in m.named_parameters():
                if n.endswith(".bias"):
                    prm.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
        m.save_pretrained(src)
    cfg = QuantizeConfig(calib_data=str(calib), calib_samples=4, seq_len=32, device="cpu", bits=4, salient=4)
    quantize_to_checkpoint(str(src), tmp_path / "q", cfg, progress=False)
    export_compressed_tensors(tmp_path / "q", tmp_path / "ct")
    base = load_export(tmp_path / "ct")
    if arch == "qwen2":
        assert float(base.model.layers[0].self_attn.q_proj.bias.detach().abs().max()) > 0.1
    model = PeftModel.from_pretrained(base, str(tmp_path / "ct" / ADAPTER_DIR))
    with torch.no_grad():
        assert rel_err(model(ids).logits, load(tmp_path / "q")(ids).logits) < 1e-3


def test_refuses_what_the_format_cannot_carry(ckpt, tmp_path):
    native = ckpt("w4g32_salient")
    with pytest.raises(GiftQuantError, match=r"model\.layers\.0\.\S+: group_size 32 with 4 salient columns.*"
                                             r"--format gptq-lora") as exc:
        export_compressed_tensors(native, tmp_path / "x")
    assert "g_idx" in str(exc.value) and "--group-layout natural" in str(exc.value)
    assert not (tmp_path / "x").exists()
    export_gptq_lora(native, tmp_path / "g")  # the format the message names does carry it

    with pytest.raises(GiftQuantError, match=r"group_size 32 with act-order.*gptq-lora"):
        export_compressed_tensors(ckpt("w4g32_act"), tmp_path / "x")

    odd = tmp_path / "odd"  # a group size that does not divide the layers: no whole groups
    shutil.copytree(ckpt("w3g32"), odd, ignore=shutil.ignore_patterns("run"))
    doc = json.loads((odd / "gift_quant_config.json").read_text())
    doc["spec"]["group_size"] = 48
    (odd / "gift_quant_config.json").write_text(json.dumps(doc))
    with pytest.raises(GiftQuantError, match="group_size 48 does not divide in_features 64"):
        export_compressed_tensors(odd, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_cli_inspect_and_warnings(ckpt, tmp_path, capsys):
    native = ckpt("w4row")
    doc = json.loads((native / "gift_quant_config.json").read_text())
    assert main(["export", str(native), "--format", "compressed-tensors", "--out", str(tmp_path / "ct")]) == 0
    assert "compressed-tensors pack-quantized, 4-bit, channel strategy" in capsys.readouterr().out
    assert json.loads((tmp_path / "ct" / EXPORT_INFO).read_text())["format"] == "compressed-tensors"
    assert (tmp_path / "ct" / "tokenizer.json").is_file()
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert config["use_cache"] is True and config["dtype"] == "float32"

    info = inspect_checkpoint(tmp_path / "ct")
    assert info["kind"] == "compressed-tensors-lora" and info["bits"] == 4 and info["strategy"] == "channel"
    assert info["group_size"] == -1 and info["sym"] is True and info["checkpoint_format"] == "pack-quantized"
    assert {r["name"]: r["salient"] for r in info["layers"]} == doc["salient_per_layer"]
    assert all(r["groups"] == 1 for r in info["layers"])
    assert info["adapter"]["rank"] == 16 and info["native_effective_bits"] == pytest.approx(doc["effective_bits"])
    assert info["effective_bits"] > info["native_effective_bits"]  # padded rank and one-hot A cost bits
    text = format_report(info)
    assert "channel strategy" in text and "LoRA rank 16" in text and "as stored" in text
    json.dumps(info)

    # bfloat16 rounds the float16 scales: said so; an existing export is replaced only when asked
    with pytest.raises(GiftQuantError, match="--overwrite"):
        export(native, tmp_path / "ct", fmt="compressed-tensors", dtype="bfloat16")
    summary = export(native, tmp_path / "ct", fmt="compressed-tensors", dtype="bfloat16", overwrite=True)
    assert any("bfloat16" in w for w in summary["warnings"])
    asym = export(ckpt("w3row_asym_act"), tmp_path / "asym", fmt="compressed-tensors")
    assert any("zero points at 4 and 8 bits" in w for w in asym["warnings"])
