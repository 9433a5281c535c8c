"""Checkpoints of format 1 (written by gift-quant before the spec was stored once) still load, inspect and export,
and today's quantize writes byte-identical weights for the same model, data and settings.

Byte identity holds on CPUs whose torch kernels are the fixture writer's (AVX-512). Elsewhere (an AVX2 CPU) the
Cholesky and GPTQ updates round differently in the last bit: the codes and scales are still identical, and
the float16 salient columns, which absorb GPTQ's error compensation, drift by a few float16 steps in a few
elements (measured: <= 17 of 512 elements per layer); the tests then assert identical codes and scales and a
salient-column difference below float16's own precision, and nothing looser."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import QUIET_CPU, cli_world

from gift_quant.config.settings import QuantizeConfig, QuantSpec
from gift_quant.packed.checkpoint import CONFIG_NAME, FORMAT_VERSION, load, read_gift_config, read_spec
from gift_quant.util.files import sha256_file

V1 = Path(__file__).parent / "data" / "checkpoint-v1-tiny"  # gift-quant 9ddd4b3 (format 1), tiny-debug recipe
V1_CPU = "AVX512"  # torch.backends.cpu.get_cpu_capability() of the machine that wrote V1
SAME_KERNELS = torch.backends.cpu.get_cpu_capability() == V1_CPU
FP16_STEP = 2.0 ** -10  # one float16 rounding step, relative (10 mantissa bits)


def _assert_same_weights(new: Path, old: Path) -> None:
    """Byte-identical where the kernels are the fixture's; elsewhere identical codes and scales, and salient
    columns whose relative (Frobenius) difference is below one float16 step: rounding, not a changed number."""
    if SAME_KERNELS:
        assert sha256_file(new / "model.safetensors") == sha256_file(old / "model.safetensors")
        return
    a, b = load_file(new / "model.safetensors"), load_file(old / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        if name.endswith("salient_weight"):
            got, want = a[name].double(), b[name].double()
            relative = float((got - want).norm() / want.norm())
            assert relative < FP16_STEP, (name, relative)
        else:
            assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def today(tmp_path_factory):
    """The same tiny model, calibration text and settings quantized by this gift-quant (format 2)."""
    from gift_quant.workflows.stages import quantize_to_checkpoint

    root = tmp_path_factory.mktemp("versions")
    world = cli_world(root)
    q = read_gift_config(V1)["quantize"]
    cfg = QuantizeConfig(**{**q, "calib_data": str(world["calib"])})
    quantize_to_checkpoint(str(world["src"]), root / "q", cfg, runtime=QUIET_CPU)
    return root / "q"


def test_v1_spec_is_read_from_its_quantize_settings():
    doc = read_gift_config(V1)
    assert doc["format_version"] == 1 < FORMAT_VERSION and "spec" not in doc
    assert read_spec(doc) == QuantSpec(bits=3, sym=True, group_size=-1, group_layout="natural", salient_dtype="float16")


def test_today_writes_the_spec_once_and_the_same_weights(today):
    doc = json.loads((today / CONFIG_NAME).read_text())
    assert doc["format_version"] == FORMAT_VERSION == 2
    assert read_spec(doc) == read_spec(read_gift_config(V1))
    assert not {"bits", "group_size", "sym", "salient_dtype", "group_layout"} & (set(doc) | set(doc["quantize"]))
    # the reorganisation changed no number: the packed weights are the bytes the format-1 release wrote
    _assert_same_weights(today, V1)


def test_v1_loads_and_computes_what_today_computes(today):
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    old, new = load(V1), load(today)
    with torch.no_grad():
        want, got = old(ids).logits, new(ids).logits
    if SAME_KERNELS:
        assert torch.equal(want, got)
    else:  # salient columns apart by less than float16's precision (above): the logits move by no more
        torch.testing.assert_close(got, want, rtol=FP16_STEP, atol=FP16_STEP * float(want.abs().max()))


def test_v1_inspects_and_exports(tmp_path):
    from gift_quant.export import export
    from gift_quant.export.inspection import inspect_checkpoint

    info = inspect_checkpoint(V1)
    assert info["bits"] == 3 and info["format_version"] == 1 and info["health"].startswith("verified")
    ckpt = tmp_path / "v1"
    shutil.copytree(V1, ckpt)
    summary = export(ckpt, tmp_path / "dense", fmt="dense")
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(summary["out"])
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(dense(ids).logits, load(V1)(ids).logits, rtol=1e-4, atol=1e-4)
