"""Acceptance on the default model's real shapes: what a user touches, in the clients they use (issue #23, req 1).

* README's "Use it from Python" block runs verbatim (no argument added, nothing replaced) in a folder where
  ``runs/smollm2-w3`` is a 3-bit per-row checkpoint of the real SmolLM2-135M-Instruct, and its ``generate``
  uses the KV cache: the model's forward passes are counted (the prompt once, then one token per step).
* Every export format x grid (per-row, groups of 32, groups of 64) x bit width the format allows, loaded by
  its real client and run forward, logits compared with ``gift_quant.load``'s:
  compressed-tensors (2/3/4/8 bits) in transformers + compressed-tensors + peft; gptq-lora (2/3/4/8) in
  transformers + optimum + gptqmodel + peft with the kernel transformers picks by default on a CPU (4-bit:
  gptqmodel's int4 kernel, torch's ``_weight_int4pack_mm_for_cpu``); dense (every bit width) in plain
  transformers; gguf (symmetric 4 and 8 bits) read by transformers' GGUF loader (gguf-py's dequantization)
  with the salient LoRA GGUF added as llama.cpp adds it (W + B A; llama.cpp itself runs in
  test_export_gguf_llama.py where the [cpu-serve] extra is installed).

Cost: one GPTQ of the whole default model (2 calibration windows of 32 tokens) for the README block, and the
format matrix on the default model cut to its first two decoder blocks (the real weights, embedding and tied
head; every linear at its real shape, 576 and 1536 input columns), quantized at 2 windows of 32 tokens: the
shapes are what the kernels care about, the other 28 blocks would only repeat them.

Tolerances (relative max |logit diff| / max |logit|): float32 paths compute what gift_quant.load computes up to
float rounding (1e-4; gptqmodel's exact kernel rounds scale * (q - z) to float16: 1e-3); gptqmodel's default
4-bit CPU kernel multiplies in bfloat16 (3e-2, as in test_export.py).
"""

import re
from pathlib import Path

import pytest
import torch
from tiny import QUIET_CPU

from gift_quant.config.settings import QuantizeConfig
from gift_quant.workflows.stages import quantize_to_checkpoint

pytestmark = [pytest.mark.usefixtures("torch_single_thread"), pytest.mark.slow]

README = Path(__file__).resolve().parents[1] / "README.md"
BITS, GRIDS = (2, 3, 4, 8), (-1, 32, 64)


def readme_python_block() -> str:
    text = README.read_text()
    section = text[text.index("## Use it from Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref.float()).abs().max() / ref.float().abs().max())


def grid_id(gs: int) -> str:
    return "row" if gs < 0 else f"g{gs}"


# ---------------------------------------------------------------------------- README's block on the real model


@pytest.fixture(scope="module")
def readme_world(tmp_path_factory):
    """A folder whose runs/smollm2-w3 is a 3-bit per-row checkpoint of the default model (as README's main
    command writes, with far less calibration: this checks the user's code path, not the quality)."""
    root = tmp_path_factory.mktemp("readme")
    quantize_to_checkpoint(None, root / "runs" / "smollm2-w3",
                           QuantizeConfig(bits=3, calib_samples=2, seq_len=32, clip="minmax"),
                           runtime=QUIET_CPU)
    return root


def test_readme_python_block_verbatim_generates_with_the_kv_cache(readme_world, monkeypatch, capsys):
    import gift_quant

    lengths: list[int] = []
    real_load = gift_quant.load

    def observed_load(*args, **kwargs):  # the block's own model, with its forward passes counted
        model = real_load(*args, **kwargs)
        model.register_forward_pre_hook(
            lambda _m, a, kw: lengths.append(int(kw.get("input_ids", a[0] if a else None).shape[-1])),
            with_kwargs=True)
        return model

    monkeypatch.chdir(readme_world)
    monkeypatch.setattr(gift_quant, "load", observed_load)
    scope: dict = {}
    exec(compile(readme_python_block(), "README.md", "exec"), scope)
    printed = capsys.readouterr().out.strip().splitlines()
    prompt = scope["inputs"]["input_ids"].shape[1]
    new = scope["output"].shape[1] - prompt
    assert new >= 1 and printed[0].strip()  # an answer was decoded
    # with the cache: the prompt once, then one token per step (without it every step re-runs the prefix)
    assert lengths == [prompt] + [1] * (new - 1), lengths[:8]
    assert scope["model"].generation_config.use_cache is True
    assert 1 < float(printed[-1]) < 1e6  # the block's perplexity line


# ---------------------------------------------------------------------------- the format matrix at real shapes


@pytest.fixture(scope="module")
def src2(tmp_path_factory):
    """The default model cut to its first two decoder blocks (real weights and shapes), as a model folder."""
    from transformers import AutoModelForCausalLM

    from gift_quant.model.loading import default_model_dir
    from gift_quant.packed.checkpoint import copy_tokenizer_files

    full = default_model_dir()
    model = AutoModelForCausalLM.from_pretrained(full, dtype=torch.float32)
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:2]
    out = tmp_path_factory.mktemp("smollm2-2blocks")
    model.save_pretrained(out)
    copy_tokenizer_files(full, out)
    assert (model.config.hidden_size, model.config.intermediate_size) == (576, 1536)
    return out


@pytest.fixture(scope="module")
def ckpt(src2, tmp_path_factory):
    """(bits, group size) -> native checkpoint of ``src2``, quantized on first use (default salient fraction:
    18 of 576 and 48 of 1536 columns, symmetric, natural groups)."""
    root = tmp_path_factory.mktemp("ckpts")
    made = {}

    def get(bits: int, gs: int) -> Path:
        if (bits, gs) not in made:
            out = root / f"w{bits}-{grid_id(gs)}"
            quantize_to_checkpoint(str(src2), out, QuantizeConfig(bits=bits, group_size=gs, calib_samples=2, seq_len=32,
                                                                  clip="minmax"), runtime=QUIET_CPU)
            made[bits, gs] = out
        return made[bits, gs]

    return get


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def reference(ckpt, ids):
    """(bits, group size) -> gift_quant.load(CKPT)'s logits, computed once."""
    import gift_quant

    done = {}

    def get(bits, gs):
        if (bits, gs) not in done:
            with torch.no_grad():
                done[bits, gs] = gift_quant.load(ckpt(bits, gs))(ids).logits
        return done[bits, gs]

    return get


def cases(bits_allowed):
    return [pytest.param(b, g, id=f"w{b}-{grid_id(g)}") for b in bits_allowed for g in GRIDS]


@pytest.mark.peers
@pytest.mark.parametrize("bits,gs", cases(BITS))
def test_compressed_tensors_in_transformers(bits, gs, ckpt, reference, ids, tmp_path):
    pytest.importorskip("compressed_tensors")
    from peft import PeftModel
    from test_export_ct import load_export

    from gift_quant.export import ADAPTER_DIR, export

    summary = export(ckpt(bits, gs), tmp_path / "ct", fmt="compressed-tensors")
    assert summary["strategy"] == ("channel" if gs < 0 else "group")
    model = PeftModel.from_pretrained(load_export(tmp_path / "ct"), str(tmp_path / "ct" / ADAPTER_DIR))
    with torch.no_grad():
        assert rel_err(model(ids).logits, reference(bits, gs)) < 1e-4


@pytest.mark.peers
@pytest.mark.parametrize("bits,gs", cases(BITS))
def test_gptq_lora_in_transformers_gptqmodel(bits, gs, ckpt, reference, ids, tmp_path, no_compile):
    pytest.importorskip("optimum")
    pytest.importorskip("gptqmodel")
    import json

    from peft import PeftModel
    from test_export import GPTQ_ENV  # noqa: F401  (sets gptqmodel's CPU settings on import)
    from transformers import AutoModelForCausalLM

    from gift_quant.export import ADAPTER_DIR, export

    export(ckpt(bits, gs), tmp_path / "g", fmt="gptq-lora")
    qcfg = json.loads((tmp_path / "g" / "quantize_config.json").read_text())
    assert qcfg["group_size"] == (64 if gs < 0 else gs)  # per-row: the row's scale repeated in groups of 64
    # the kernel transformers picks by default on a CPU (4-bit: the int4 kernel that failed on per-row grids)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "g", dtype=torch.float32, device_map="cpu")
    kernel = type(base.model.layers[0].mlp.down_proj).__name__
    assert kernel == ("TorchAtenLinear" if bits == 4 else "TorchLinear")
    model = PeftModel.from_pretrained(base, str(tmp_path / "g" / ADAPTER_DIR))
    with torch.no_grad():
        assert rel_err(model(ids).logits, reference(bits, gs)) < (3e-2 if bits == 4 else 1e-3)


@pytest.mark.parametrize("bits,gs", cases(BITS))
def test_dense_in_transformers(bits, gs, ckpt, reference, ids, tmp_path):
    from transformers import AutoModelForCausalLM

    from gift_quant.export import export

    export(ckpt(bits, gs), tmp_path / "d", fmt="dense")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "d", dtype=torch.float32)
    with torch.no_grad():
        assert rel_err(model(ids).logits, reference(bits, gs)) < 1e-4


@pytest.mark.parametrize("bits,gs", cases((4, 8)))
def test_gguf_read_by_transformers_and_gguf_py(bits, gs, ckpt, reference, ids, tmp_path):
    from gguf import GGUFReader
    from test_export_gguf import dequant, hf_rows
    from transformers import AutoModelForCausalLM

    from gift_quant.export import NativeCheckpoint, export
    from gift_quant.export.gguf import LORA_FILE, MODEL_FILE, gguf_name, llama_hparams

    summary = export(ckpt(bits, gs), tmp_path / "gguf", fmt="gguf")
    assert summary["ggml_type"] == ("Q4_0" if bits == 4 else "Q8_0")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "gguf", gguf_file=MODEL_FILE, dtype=torch.float32)
    nat = NativeCheckpoint(ckpt(bits, gs))
    hp = llama_hparams(nat)
    lora = {t.name: t for t in GGUFReader(tmp_path / "gguf" / LORA_FILE).tensors}
    with torch.no_grad():  # llama.cpp's LoRA: W x + (alpha / r) B (A x), alpha = r
        for name in nat.layers:
            g = gguf_name(f"{name}.weight")
            a, b = dequant(lora[f"{g}.lora_a"]), hf_rows(g, dequant(lora[f"{g}.lora_b"]), hp)
            model.get_submodule(name).weight += b @ a
        assert rel_err(model(ids).logits, reference(bits, gs)) < 1e-4
