"""Exports load in the real clients, without gift-quant, and compute what the native checkpoint computes.

GPTQ + LoRA: transformers (optimum + gptqmodel kernels on CPU) with peft, GPTQModel with its own LoRA
loader, and lm-eval's HFLM with ``peft=``; dense: plain transformers. The reference is always
``gift_quant.load(native checkpoint)``. Tiny random Llama models (tied embeddings, like SmolLM2) are
built in the test.

Tolerances: gptqmodel's exact torch kernel dequantizes in float16 (scale * (q - z) rounded to fp16,
~5e-4 relative per weight), so logits agree to ~3e-4 relative, well inside the 1e-3 asked for. Its
default 4-bit CPU kernel (TorchAtenLinear, aten int4 matmul) computes in bfloat16: ~1e-2.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny import ARCHS, QUIET_CPU, corpus, make_model_dir, make_tokenizer, tiny_config

from gift_quant.config.settings import NoiseSpec, QuantizeConfig
from gift_quant.export import (
    ADAPTER_DIR,
    EXPORT_INFO,
    NativeCheckpoint,
    export,
    export_dense,
    export_gptq_lora,
    gptq_layer,
    lora_rank,
)
from gift_quant.export.inspection import format_report, inspect_checkpoint
from gift_quant.packed.checkpoint import load
from gift_quant.util.errors import GiftQuantError
from gift_quant.workflows.commands import quantize_to_checkpoint

# gptqmodel on a 2-core CPU: see ASSETS.md. Compiling its dequant with inductor costs ~50 s per load.
GPTQ_ENV = {"GPTQMODEL_CPU_WORKERS": "2", "GPTQMODEL_DISABLE_PACK_EXT": "1"}
for _k, _v in GPTQ_ENV.items():
    os.environ.setdefault(_k, _v)

pytestmark = pytest.mark.usefixtures("torch_single_thread")

CASES = {
    # name: (quantize settings, what the export must look like)
    # compact groups skip salient columns -> desc_act
    "w4g32": dict(bits=4, group_size=32, salient=4, group_layout="compact"),
    "w4g32_natural": dict(bits=4, group_size=32, salient=4),  # natural groups j // 32 -> no desc_act
    "w2row": dict(bits=2, salient=4),  # per-row grid -> groups of 64 (in_features 64 / 128), the scale repeated
    # K 6 / 13 -> rank 16
    "w3act": dict(bits=3, group_size=32, act_order=True, salient_fraction=0.1, group_layout="compact"),
    "w8asym": dict(bits=8, group_size=32, sym=False, salient=4),  # asymmetric, GPTQ v1 zero - 1
    "w4asym": dict(bits=4, group_size=16, sym=False, act_order=True, static_groups=True, salient=4),
    "w3k0": dict(bits=3, group_size=32, salient=0),  # plain GPTQ: trivial g_idx, no desc_act
}


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref.float()).abs().max() / ref.float().abs().max())


def make_src(path, tied: bool):
    """A tiny Llama whose vocab equals its tokenizer's (lm-eval resizes the embeddings otherwise)."""
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer(path)
    cfg = tiny_config("llama", vocab_size=len(tok))
    cfg.tie_word_embeddings = tied
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_src(tmp_path_factory.mktemp("src"), tied=False)


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "calib.txt"
    p.write_text(corpus(2000, seed=1))
    return p


def quantized_checkpoints(root, src, calib, cases: dict):
    """name -> native checkpoint folder of ``src`` quantized with ``cases[name]``, made on first use."""
    made = {}

    def get(name):
        if name not in made:
            cfg = QuantizeConfig(calib_data=str(calib), calib_samples=4, seq_len=32, **cases[name])
            quantize_to_checkpoint(str(src), root / name, cfg, runtime=QUIET_CPU)
            made[name] = root / name
        return made[name]

    return get


@pytest.fixture(scope="module")
def ckpt(src, calib, tmp_path_factory):
    """name -> native checkpoint folder, quantized once per module."""
    return quantized_checkpoints(tmp_path_factory.mktemp("ckpt"), src, calib, CASES)


@pytest.fixture(scope="module")
def ids(src):
    return torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))


def reference_logits(path, ids):
    with torch.no_grad():
        return load(path)(ids).logits


# ---------------------------------------------------------------------------- GPTQ + LoRA in transformers + peft

CLIENT = textwrap.dedent("""
    import json, sys
    import torch
    from peft import PeftModel
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, GPTQConfig

    export, out, ids = sys.argv[1], sys.argv[2], torch.tensor(json.loads(sys.argv[3]))
    bits = json.load(open(export + "/quantize_config.json"))["bits"]
    logits, kernels = {}, {}
    for backend in ("torch", "auto"):
        kw = {} if backend == "auto" else {"quantization_config": GPTQConfig(bits=bits, backend=backend)}
        base = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32, device_map="cpu", **kw)
        kernels[backend] = type(base.model.layers[0].self_attn.q_proj).__name__
        model = PeftModel.from_pretrained(base, export + "/adapter")
        with torch.no_grad():
            logits[backend] = model(ids).logits.contiguous()
            model.disable_adapter_layers()
            logits[backend + "_base_only"] = model(ids).logits.contiguous()
    save_file(logits, out)
    print(json.dumps({"kernels": kernels, "gift_quant_imported": any(m.startswith("gift_quant") for m in sys.modules)}))
""")


def test_gptq_lora_in_transformers_peft_without_gift_quant(ckpt, ids, tmp_path):
    """The core promise at 4 bits: a process that never imports gift_quant reproduces the native logits."""
    from safetensors.torch import load_file

    pytest.importorskip("optimum")
    pytest.importorskip("gptqmodel")
    native = ckpt("w4g32")
    out = tmp_path / "export"
    summary = export_gptq_lora(native, out)
    assert summary["desc_act"] and summary["checkpoint_format"] == "gptq" and summary["lora_rank"] == 8
    env = {**os.environ, **GPTQ_ENV, "TORCH_COMPILE_DISABLE": "1", "TORCHDYNAMO_DISABLE": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    res = subprocess.run([sys.executable, "-c", CLIENT, str(out), str(tmp_path / "logits.safetensors"),
                          json.dumps(ids.tolist())], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["gift_quant_imported"] is False
    assert report["kernels"]["torch"] == "TorchLinear"
    got = load_file(tmp_path / "logits.safetensors")
    ref = reference_logits(native, ids)
    assert rel_err(got["torch"], ref) < 1e-3
    # without the adapter the salient columns are missing: the adapter is what closes the gap
    assert rel_err(got["torch_base_only"], ref) > 1e-2
    # the kernel transformers picks by default on CPU (bfloat16 int4 matmul for 4-bit) agrees loosely
    assert rel_err(got["auto"], ref) < 3e-2


@pytest.mark.parametrize("name", ["w2row", "w3act", "w4g32_natural", "w8asym", "w4asym", "w3k0"])
def test_gptq_lora_matches_native(name, ckpt, ids, tmp_path, no_compile):
    pytest.importorskip("optimum")
    pytest.importorskip("gptqmodel")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, GPTQConfig

    native = ckpt(name)
    nat = NativeCheckpoint(native)
    summary = export_gptq_lora(native, tmp_path / "export")
    qcfg = json.loads((tmp_path / "export" / "quantize_config.json").read_text())
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["quantization_config"] == qcfg
    assert qcfg["quant_method"] == "gptq" and qcfg["bits"] == CASES[name]["bits"]
    assert qcfg["sym"] == CASES[name].get("sym", True)
    # per-row grids are written as the largest kernel group size dividing every in_features (64 here)
    assert qcfg["group_size"] == CASES[name].get("group_size", 64)
    assert summary["per_row_written_as_groups"] == ("group_size" not in CASES[name])
    # per-row grids have one group, so any g_idx is trivial; grouped ones need act-order with salient columns
    grouped = CASES[name].get("group_size", -1) > 0
    compact = CASES[name].get("group_layout") == "compact"
    assert qcfg["desc_act"] == (grouped and compact and (nat.max_salient > 0 or CASES[name].get("act_order", False)))
    assert summary["lora_rank"] == lora_rank(nat.max_salient)
    if name == "w8asym":  # no group of these weights lacks negative values: v1 can store zero - 1
        assert qcfg["checkpoint_format"] == "gptq"
    if name == "w4asym":  # groups of 16 without negative weights: zero point 0 needs v2
        assert qcfg["checkpoint_format"] == "gptq_v2"
        with pytest.raises(GiftQuantError, match="gptq_v2"):
            export_gptq_lora(native, tmp_path / "v1", checkpoint_format="gptq")

    adapter = json.loads((tmp_path / "export" / ADAPTER_DIR / "adapter_config.json").read_text())
    assert adapter["r"] == adapter["lora_alpha"] == summary["lora_rank"]
    assert sorted(adapter["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                                 "up_proj", "v_proj"]

    base = AutoModelForCausalLM.from_pretrained(
        tmp_path / "export", dtype=torch.float32, device_map="cpu",
        quantization_config=GPTQConfig(bits=qcfg["bits"], backend="torch"))
    # layer by layer: the kernel's dequantized weight is the native base (to fp16 rounding)
    for lname, lay in nat.layers.items():
        w = base.get_submodule(lname).dequantize_weight().T.float()
        assert torch.allclose(w, lay.dequantized_base(), rtol=2e-3, atol=1e-6), lname
    model = PeftModel.from_pretrained(base, str(tmp_path / "export" / ADAPTER_DIR))
    with torch.no_grad():
        got = model(ids).logits
    assert rel_err(got, reference_logits(native, ids)) < 1e-3


@pytest.fixture(scope="module")
def real_shapes(calib, tmp_path_factory):
    """A one-block Llama with the default model's linear shapes (hidden 576, intermediate 1536), so the
    per-row grid's one group is 576 or 1536 columns wide, as on SmolLM2."""
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("real_shapes")
    tok = make_tokenizer(path)
    cfg = tiny_config("llama", vocab_size=len(tok))
    cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers = 576, 1536, 1
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 9, 3, 64
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    return path


def test_per_row_4bit_gptq_runs_in_the_default_cpu_kernel_at_real_shapes(real_shapes, calib, ids, tmp_path, no_compile):
    """Issue #23: a per-row grid on 576 / 1536 columns was written as group_size -1, which gptqmodel's CPU int4
    kernel (torch's _weight_int4pack_mm_for_cpu: groups of 32, 64, 128, 256) fails at the first forward pass.
    It is now written as groups of 64 with the row's scale repeated: transformers' default CPU kernel runs it,
    and the exact kernel reproduces the native logits."""
    pytest.importorskip("optimum")
    pytest.importorskip("gptqmodel")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, GPTQConfig

    cfg = QuantizeConfig(calib_data=str(calib), calib_samples=2, seq_len=32, bits=4)
    quantize_to_checkpoint(str(real_shapes), tmp_path / "q", cfg, runtime=QUIET_CPU)
    summary = export_gptq_lora(tmp_path / "q", tmp_path / "g")
    qcfg = json.loads((tmp_path / "g" / "quantize_config.json").read_text())
    assert qcfg["group_size"] == 64 and not qcfg["desc_act"] and summary["per_row_written_as_groups"]
    ref = reference_logits(tmp_path / "q", ids)
    got = {}
    for backend in ("auto", "torch"):
        kw = {} if backend == "auto" else {"quantization_config": GPTQConfig(bits=4, backend="torch")}
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "g", dtype=torch.float32, device_map="cpu", **kw)
        kernel = type(base.model.layers[0].mlp.down_proj).__name__
        model = PeftModel.from_pretrained(base, str(tmp_path / "g" / ADAPTER_DIR))
        with torch.no_grad():
            got[backend] = (kernel, model(ids).logits)
    assert got["auto"][0] == "TorchAtenLinear" and got["torch"][0] == "TorchLinear"
    assert rel_err(got["torch"][1], ref) < 1e-3
    assert rel_err(got["auto"][1], ref) < 3e-2  # bfloat16 int4 matmul (module docstring)


def test_per_row_group_size_choice_and_refusal():
    """Per-row grids take the largest of 128 / 64 / 32 dividing every layer; a 4-bit layer that none divides has no
    exact GPTQ form a CPU int4 kernel runs: refused in one line naming the layer and the formats that carry it."""
    from types import SimpleNamespace

    from gift_quant.export.gptq import row_group_size

    def nat(bits, *widths):
        return SimpleNamespace(bits=bits, layers={f"layer{i}": SimpleNamespace(in_features=w)
                                                  for i, w in enumerate(widths)})

    assert row_group_size(nat(4, 576, 1536)) == 64  # SmolLM2-135M
    assert row_group_size(nat(4, 4096, 11008)) == 128  # Llama-2-7B
    assert row_group_size(nat(3, 2560, 96)) == 32
    with pytest.raises(GiftQuantError, match=r"layer1: in_features 72 is not a multiple of 32.*compressed-tensors"
                       ) as exc:
        row_group_size(nat(4, 576, 72))
    assert "\n" not in str(exc.value)
    assert row_group_size(nat(2, 576, 72)) == -1  # gptqmodel's exact kernel and Marlin take group -1


def test_gptq_groups_have_the_act_order_shape(ckpt):
    """Every group of the exported layers holds group_size columns but the last; salient columns are 0."""
    nat = NativeCheckpoint(ckpt("w4g32"))
    for name, lay in nat.layers.items():
        g = gptq_layer(name, lay, 32)
        counts = torch.bincount(g.g_idx.long(), minlength=-(-lay.in_features // 32))
        assert (counts[:-1] == 32).all() and 0 < counts[-1] <= 32
        assert not g.trivial_g_idx
        base = g.dequantized()
        assert torch.equal(base[:, lay.salient_idx.long()], torch.zeros(lay.out_features, lay.n_salient))
        assert torch.equal(g.dequantized(lay.salient_idx.long()), base[:, lay.salient_idx.long()])
        keep = torch.ones(lay.in_features, dtype=torch.bool)
        keep[lay.salient_idx.long()] = False
        assert torch.equal(base[:, keep], lay.dequantized_base()[:, keep])


def test_gptqmodel_loads_base_and_adapter(ckpt, ids, tmp_path, no_compile):
    gptqmodel = pytest.importorskip("gptqmodel")
    from gptqmodel.adapter.adapter import Lora

    native = ckpt("w4g32")
    summary = export_gptq_lora(native, tmp_path / "export", dtype="float16")  # as served
    assert json.loads((tmp_path / "export" / "config.json").read_text())["dtype"] == "float16"
    # GPTQModel's kernels take float16 / bfloat16 activations only
    model = gptqmodel.GPTQModel.load(str(tmp_path / "export"), device="cpu", backend=gptqmodel.BACKEND.TORCH,
                                     dtype=torch.float16,
                                     adapter=Lora(path=str(tmp_path / "export" / ADAPTER_DIR),
                                                  rank=summary["lora_rank"]))
    with torch.no_grad():
        got = model.model(ids).logits
    assert rel_err(got, reference_logits(native, ids)) < 3e-3


def test_lm_eval_hflm_with_peft(ckpt, tmp_path, no_compile):
    """lm-eval scores the export + adapter like the native model (3-bit: gptqmodel's exact kernel)."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("gptqmodel")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    native = ckpt("w3act")
    export_gptq_lora(native, tmp_path / "export")
    pairs = [("the model is", " a weight"), ("salient columns of the", " layer are kept"),
             ("quantize the", " matrix")]

    def requests():
        return [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]

    lm = HFLM(pretrained=str(tmp_path / "export"), peft=str(tmp_path / "export" / ADAPTER_DIR), device="cpu",
              dtype="float32", batch_size=1)
    got = [ll for ll, _ in lm.loglikelihood(requests(), disable_tqdm=True)]
    ref_lm = HFLM(pretrained=load(native), tokenizer=AutoTokenizer.from_pretrained(native), batch_size=1)
    ref = [ll for ll, _ in ref_lm.loglikelihood(requests(), disable_tqdm=True)]
    # observed: ~2e-5 apart; leaving the adapter out moves them by ~0.2
    for a, b in zip(got, ref):
        assert abs(a - b) < 2e-3


def test_recovered_checkpoint_exports(src, calib, ids, tmp_path, no_compile):
    """After recovery the salient columns hold trained values (here: perturbed, in float32): the adapter
    carries them, and the recovery settings show up in ``inspect``."""
    pytest.importorskip("optimum")
    pytest.importorskip("gptqmodel")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, GPTQConfig

    from gift_quant.packed.checkpoint import read_gift_config, save_checkpoint
    from gift_quant.recover.model import convert_to_quant, prepare_quantized, salient_layers

    cfg = QuantizeConfig(calib_data=str(calib), calib_samples=4, seq_len=32, bits=3, group_size=32,
                         salient=5, salient_dtype="float32")
    quantize_to_checkpoint(str(src), tmp_path / "q", cfg, runtime=QUIET_CPU)
    model = prepare_quantized(load(tmp_path / "q"), noise=NoiseSpec("none"))
    with torch.no_grad():
        for layer in salient_layers(model).values():
            layer.gift_salient.add_(0.05 * torch.randn_like(layer.gift_salient))
    convert_to_quant(model)  # back to the spec it carries (3 bits, g32, float32 salient columns)
    doc = read_gift_config(tmp_path / "q")
    doc.pop("format"), doc.pop("format_version")
    save_checkpoint(model, tmp_path / "rec", src, {**doc, "variant": "post",
                                                     "recover": {"steps": 3, "lr": 1e-4, "noise": "none"}})
    summary = export_gptq_lora(tmp_path / "rec", tmp_path / "export")
    assert summary["adapter_dtype"] == "float32"  # float32 salient columns stay float32
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32, device_map="cpu",
                                                quantization_config=GPTQConfig(bits=3, backend="torch"))
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "export" / ADAPTER_DIR))
    with torch.no_grad():
        ref = reference_logits(tmp_path / "rec", ids)
        assert rel_err(peft_model(ids).logits, ref) < 1e-3
        assert rel_err(reference_logits(tmp_path / "q", ids), ref) > 1e-3  # recovery did change the model
    text = format_report(inspect_checkpoint(tmp_path / "rec"))
    assert "recovered     GIFT-SW post, 3 steps" in text


@pytest.mark.parametrize("arch", [a if a in ("qwen2", "phi3", "gemma3_text") else
                                  pytest.param(a, marks=pytest.mark.slow) for a in ARCHS if a != "llama"])
def test_gptq_lora_and_dense_other_archs(arch, calib, ids, tmp_path, no_compile):
    """Fused projections (phi3), biases (qwen2, gpt_neox: stored float16), gemma's scaled embeddings."""
    pytest.importorskip("optimum")
    pytest.importorskip("gptqmodel")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, GPTQConfig

    src = make_model_dir(arch, tmp_path / "src")
    cfg = QuantizeConfig(calib_data=str(calib), calib_samples=4, seq_len=32, bits=4, group_size=32,
                         salient=4)
    quantize_to_checkpoint(str(src), tmp_path / "q", cfg, runtime=QUIET_CPU)
    ref = reference_logits(tmp_path / "q", ids)
    export_gptq_lora(tmp_path / "q", tmp_path / "g")
    export_dense(tmp_path / "q", tmp_path / "d")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "g", dtype=torch.float32, device_map="cpu",
                                                quantization_config=GPTQConfig(bits=4, backend="torch"))
    model = PeftModel.from_pretrained(base, str(tmp_path / "g" / ADAPTER_DIR))
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "d", dtype=torch.float32)
    with torch.no_grad():
        assert rel_err(model(ids).logits, ref) < 1e-3
        assert rel_err(dense(ids).logits, ref) < 1e-5


# ---------------------------------------------------------------------------- dense


def test_dense_export_loads_in_plain_transformers(ckpt, ids, tmp_path):
    from transformers import AutoModelForCausalLM

    native = ckpt("w4g32")
    summary = export_dense(native, tmp_path / "dense")
    assert summary["format"] == "dense" and summary["dtype"] == "float32"
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "quantization_config" not in config and config["use_cache"] is True
    assert (tmp_path / "dense" / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    with torch.no_grad():
        got = model(ids).logits
    assert rel_err(got, reference_logits(native, ids)) < 1e-5
    half = export_dense(native, tmp_path / "dense16", dtype="bfloat16")
    assert half["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "dense16").dtype == torch.bfloat16


# ---------------------------------------------------------------------------- inspect


def test_inspect_native_and_exports(ckpt, src, tmp_path):
    native = ckpt("w3act")
    doc = json.loads((native / "gift_quant_config.json").read_text())
    info = inspect_checkpoint(native)
    assert info["kind"] == "gift-quant" and info["bits"] == 3 and info["group_size"] == 32 and info["act_order"]
    ks = list(doc["salient_per_layer"].values())
    assert info["salient"]["min"] == min(ks) == 6 and info["salient"]["max"] == max(ks) == 13
    assert info["salient"]["mean"] == pytest.approx(sum(ks) / len(ks))
    assert info["effective_bits"] == pytest.approx(doc["effective_bits"]) and info["effective_bits"] > 3
    assert info["size_on_disk"] > 0 and info["provenance"]["source_model"]
    assert len(info["layers"]) == len(doc["layers"])
    text = format_report(info)
    assert "bits          3" in text and "min 6 / mean" in text and "model.layers.1.mlp.down_proj" in text
    json.dumps(info)  # JSON-able for --json

    export_gptq_lora(native, tmp_path / "g")
    g = inspect_checkpoint(tmp_path / "g")
    assert g["kind"] == "gptq-lora" and g["bits"] == 3 and g["desc_act"] and g["checkpoint_format"] == "gptq"
    assert g["adapter"]["rank"] == 16 and g["adapter"]["modules"] == len(doc["layers"])
    assert {r["name"]: r["salient"] for r in g["layers"]} == doc["salient_per_layer"]
    assert g["native_effective_bits"] == pytest.approx(doc["effective_bits"])
    assert g["effective_bits"] > g["native_effective_bits"]  # padded rank and one-hot A cost bits
    assert g["provenance"] == doc["provenance"]
    assert "LoRA rank 16" in format_report(g)

    export_dense(native, tmp_path / "d")
    d = inspect_checkpoint(tmp_path / "d")
    assert d["kind"] == "dense" and d["dtype"] == "float32" and d["bits_per_weight"] == 32
    from transformers import AutoModelForCausalLM

    source = AutoModelForCausalLM.from_pretrained(src)
    assert d["parameters"] == sum(p.numel() for p in source.parameters())  # tied embeddings stored once
    assert "parameters, float32" in format_report(d)

    with pytest.raises(GiftQuantError, match="not a folder"):
        inspect_checkpoint(tmp_path / "missing")


# ---------------------------------------------------------------------------- what the formats cannot carry


def test_lora_rank_choice():
    assert [lora_rank(k) for k in (0, 1, 8, 9, 128, 129, 300, 320, 321, 512)] == [
        8, 8, 8, 16, 128, 256, 320, 320, 512, 512]
    with pytest.raises(GiftQuantError, match="dense"):
        lora_rank(513)


def test_refusals(ckpt, tmp_path):
    native = ckpt("w4g32")
    # a group size no GPTQ kernel loads
    odd = tmp_path / "odd"
    shutil.copytree(native, odd, ignore=shutil.ignore_patterns("run"))
    doc = json.loads((odd / "gift_quant_config.json").read_text())
    doc["spec"]["group_size"] = 48
    (odd / "gift_quant_config.json").write_text(json.dumps(doc))
    with pytest.raises(GiftQuantError, match="group_size 48.*dense"):
        export_gptq_lora(odd, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    # output folders: not inside the checkpoint, not over foreign files, replace an export only when asked
    with pytest.raises(GiftQuantError, match="inside the checkpoint"):
        export_dense(native, native / "dense")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(GiftQuantError, match="not a gift-quant export"):
        export_dense(native, tmp_path / "busy")
    export(native, tmp_path / "e", fmt="dense")
    with pytest.raises(GiftQuantError, match="--overwrite"):
        export(native, tmp_path / "e", fmt="dense")
    export(native, tmp_path / "e", fmt="gptq-lora", overwrite=True)
    assert json.loads((tmp_path / "e" / EXPORT_INFO).read_text())["format"] == "gptq-lora"
    with pytest.raises(GiftQuantError, match="unknown export format"):
        export(native, tmp_path / "f", fmt="awq")
    with pytest.raises(GiftQuantError, match="checkpoint_format"):
        export_gptq_lora(native, tmp_path / "f", checkpoint_format="v3")


# ---------------------------------------------------------------------------- tied embeddings (SmolLM2's layout)


@pytest.fixture(scope="module")
def tied(calib, ids, tmp_path_factory):
    """(native checkpoint of a tied-embedding model, logits of the in-memory quantized model)."""
    root = tmp_path_factory.mktemp("tied")
    src = make_src(root / "src", tied=True)
    cfg = QuantizeConfig(calib_data=str(calib), calib_samples=4, seq_len=32, **CASES["w4g32"])
    qmodel, _ = quantize_to_checkpoint(str(src), root / "q", cfg, runtime=QUIET_CPU)
    with torch.no_grad():
        return root / "q", qmodel(ids).logits


def test_tied_embeddings_dense_export(tied, ids, tmp_path):
    """The native file keeps only ``lm_head.weight`` of a tied pair; the export writes the input embedding
    as transformers expects. Reference: the in-memory quantized model."""
    from transformers import AutoModelForCausalLM

    native, ref = tied
    export_dense(native, tmp_path / "dense")
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    assert dense.lm_head.weight.data_ptr() == dense.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert rel_err(dense(ids).logits, ref) < 1e-5


def test_tied_embeddings_gptq_lora_export(tied, ids, tmp_path, no_compile):
    pytest.importorskip("optimum")
    pytest.importorskip("gptqmodel")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, GPTQConfig

    native, ref = tied
    export_gptq_lora(native, tmp_path / "gptq")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "gptq", dtype=torch.float32, device_map="cpu",
                                                quantization_config=GPTQConfig(bits=4, backend="torch"))
    assert base.lm_head.weight.data_ptr() == base.model.embed_tokens.weight.data_ptr()
    model = PeftModel.from_pretrained(base, str(tmp_path / "gptq" / ADAPTER_DIR))
    with torch.no_grad():
        assert rel_err(model(ids).logits, ref) < 1e-3


def test_native_load_of_tied_model(tied, ids):
    """``load`` ties lm_head to the embedding the file stores once and computes what was quantized in memory."""
    native, ref = tied
    model = load(native)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
