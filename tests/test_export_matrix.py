"""Every combination the default export claims, loaded by real clients (issue #12, requirement 3).

``gift-quant export CKPT --out DIR`` (format ``auto``) writes compressed-tensors ``pack-quantized`` for
every native checkpoint in the default (natural) group layout: 2/3/4/8 bits x per-row / g=32 / g=128 x
sym / asym x act-order, all with salient columns. For each combination:

* compressed-tensors' own model-free decompressor turns the export back into dense weights that equal
  gift-quant's dequantized base bit for bit (float32 scales);
* transformers (its compressed-tensors integration) + peft with ``DIR/adapter`` reproduce
  ``gift_quant.load(CKPT)``'s logits within 1e-3 (relative; float32 everywhere, observed ~1e-7).

The model is a one-block Llama with 256-wide linears, so g=128 makes two natural groups and the
salient columns land inside groups. A sample of the matrix (every value of every axis at least once)
runs in the quick suite; the whole matrix is ``slow`` (CI runs it).
"""

import itertools
import json
import warnings

import pytest
import torch
from tiny import QUIET_CPU, corpus, make_tokenizer, tiny_config

from gift_quant.config.settings import QuantizeConfig
from gift_quant.export import ADAPTER_DIR, NativeCheckpoint, export
from gift_quant.packed.checkpoint import load
from gift_quant.workflows.commands import quantize_to_checkpoint

pytestmark = [pytest.mark.usefixtures("torch_single_thread"), pytest.mark.peers]

BITS, GROUPS, SYMS, ACT = (2, 3, 4, 8), (-1, 32, 128), (True, False), (False, True)
MATRIX = list(itertools.product(BITS, GROUPS, SYMS, ACT))
# each bit width, grouping, symmetry and act-order value at least once, and every grouping at 3 bits
SAMPLE = {(2, 32, False, True), (3, -1, True, False), (3, 32, True, True), (3, 128, False, False),
          (4, 128, True, True), (8, -1, False, True), (8, 32, True, False)}


def case_id(case) -> str:
    bits, gs, sym, act = case
    return f"w{bits}-{'row' if gs < 0 else f'g{gs}'}-{'sym' if sym else 'asym'}{'-act' if act else ''}"


PARAMS = [pytest.param(c, id=case_id(c), marks=() if c in SAMPLE else pytest.mark.slow) for c in MATRIX]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("src")
    tok = make_tokenizer(path)
    cfg = tiny_config("llama", vocab_size=len(tok))
    cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers = 256, 256, 1
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 4, 2, 64
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "calib.txt"
    p.write_text(corpus(2000, seed=1))
    return p


def rel_err(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("case", PARAMS)
def test_default_export_is_exact_in_compressed_tensors_and_transformers(case, src, calib, tmp_path):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    bits, gs, sym, act = case
    cfg = QuantizeConfig(bits=bits, group_size=gs, sym=sym, act_order=act, salient=12, calib_data=str(calib),
                         calib_samples=4, seq_len=32)
    native = tmp_path / "native"
    quantize_to_checkpoint(str(src), native, cfg, runtime=QUIET_CPU)
    nat = NativeCheckpoint(native)
    summary = export(native, tmp_path / "ct")  # the default format choice
    assert summary["format"] == "compressed-tensors", summary.get("chosen_because")
    assert summary["strategy"] == ("group" if gs > 0 else "channel") and summary["sym"] == sym

    tensors = load_file(tmp_path / "ct" / "model.safetensors")
    dense = CompressedTensorsDequantizer(tmp_path / "ct", dtype=torch.float32).validate(dict(tensors))
    for name, lay in nat.layers.items():
        assert lay.n_salient == 12
        assert torch.equal(dense[f"{name}.weight"], lay.dequantized_base()), name

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32,
                                                    quantization_config=CompressedTensorsConfig(dequantize=True))
    model = PeftModel.from_pretrained(base, str(tmp_path / "ct" / ADAPTER_DIR))
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(model(ids).logits, load(native)(ids).logits) < 1e-3
    adapter = json.loads((tmp_path / "ct" / ADAPTER_DIR / "adapter_config.json").read_text())
    assert adapter["r"] == summary["lora_rank"] >= 12
