"""``eval`` of an export scores what a server would serve and reports its stored bits (issue #22 req 3).

The user's path: ``gift-quant export CKPT --out X`` then ``gift-quant eval X``. For compressed-tensors and
gptq-lora exports the base is loaded by its real client (transformers with compressed-tensors / gptqmodel)
with the salient LoRA adapter applied by peft, so the perplexity equals the native checkpoint's (the
export is exact; GPTQ's kernels compute in float16 scales the native layer also stores); the bits are
counted here independently, from the files' tensor sizes. What eval cannot score faithfully is refused
with the reason: a GGUF export (llama.cpp is not a Python dependency), an export whose adapter is gone,
a quantization method gift-quant does not write.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open
from tiny import corpus, make_model_dir

from gift_quant.cli.app import main
from gift_quant.export import NativeCheckpoint

pytestmark = pytest.mark.usefixtures("torch_single_thread", "no_compile")

BITS = {"F32": 32, "F16": 16, "BF16": 16, "I32": 32, "I64": 64, "I8": 8, "U8": 8}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-exports")
    src = make_model_dir("llama", root / "src")
    (root / "calib.txt").write_text(corpus(), encoding="utf-8")
    (root / "ppl.txt").write_text(corpus(3000, seed=7), encoding="utf-8")
    ckpt = root / "q"
    assert main(["quantize", str(src), "--out", str(ckpt), "--calib-data", str(root / "calib.txt"), "--bits", "4",
                 "--group-size", "32", "--calib-samples", "4", "--seq-len", "32", "--salient", "4", "--device",
                 "cpu", "--no-progress"]) == 0
    exports = {}
    for fmt in ("compressed-tensors", "gptq-lora", "dense", "gguf"):
        exports[fmt] = root / fmt
        assert main(["export", str(ckpt), "--out", str(exports[fmt]), "--format", fmt]) == 0
    return {"root": root, "ckpt": ckpt, "ppl": root / "ppl.txt", **exports}


def evaluate(world, path: Path, tmp_path: Path, capsys) -> dict:
    out = tmp_path / f"{path.name}.json"
    rc = main(["eval", str(path), "--ppl-data", str(world["ppl"]), "--seq-len", "32", "--max-windows", "4",
               "--device", "cpu", "--no-progress", "--json", str(out)])
    _, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out.read_text())


def stored_bits(folder: Path, nat: NativeCheckpoint) -> float:
    """Bits per quantized weight from the files' tensor sizes: every tensor of the base that is not one of the
    model's unquantized tensors (embeddings, norms, head), plus the whole adapter."""
    dense = set(nat.other_tensors())
    total = 0
    for f in [*folder.glob("*.safetensors"), *(folder / "adapter").glob("*.safetensors")]:
        with safe_open(f, "pt") as h:
            for k in h.keys():
                if f.parent.name == "adapter" or k not in dense:
                    s = h.get_slice(k)
                    n = 1
                    for d in s.get_shape():
                        n *= d
                    total += n * BITS[s.get_dtype()]
    weights = sum(q.in_features * q.out_features for q in nat.layers.values())
    return total / weights


@pytest.mark.parametrize("fmt, tol", [("compressed-tensors", 1e-5), ("gptq-lora", 1e-3), ("dense", 1e-5)])
def test_eval_of_an_export_is_the_served_model(world, tmp_path, capsys, fmt, tol):
    native = evaluate(world, world["ckpt"], tmp_path, capsys)
    got = evaluate(world, world[fmt], tmp_path, capsys)
    assert got["perplexity"] == pytest.approx(native["perplexity"], rel=tol), (got, native)
    nat = NativeCheckpoint(world["ckpt"])
    if fmt == "dense":
        assert got["kind"] == "dense export (merged)" and got["effective_bits"] == 32
    else:
        assert "salient LoRA adapter" in got["kind"], got["kind"]
        assert got["effective_bits"] == pytest.approx(stored_bits(world[fmt], nat), rel=1e-12)
        assert got["effective_bits"] > 4  # codes, scales and the padded adapter (large against these tiny layers)


def test_native_bits_are_measured_from_the_tensors(world, tmp_path, capsys):
    nat = NativeCheckpoint(world["ckpt"])
    native = evaluate(world, world["ckpt"], tmp_path, capsys)
    assert native["effective_bits"] == pytest.approx(stored_bits(world["ckpt"], nat), rel=1e-12)


def one_error(capsys, rc: int) -> str:
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("gift-quant: error:")]
    assert len(lines) == 1, err
    return lines[0]


def eval_args(world, path) -> list[str]:
    return ["eval", str(path), "--ppl-data", str(world["ppl"]), "--seq-len", "32", "--device", "cpu", "--no-progress"]


def test_gguf_export_is_refused_with_the_reason(world, capsys):
    line = one_error(capsys, main(eval_args(world, world["gguf"])))
    assert "GGUF export" in line and "llama-perplexity" in line and str(world["ckpt"].resolve()) in line


def test_export_without_its_adapter_is_refused(world, tmp_path, capsys):
    x = tmp_path / "x"
    shutil.copytree(world["compressed-tensors"], x)
    shutil.rmtree(x / "adapter")
    line = one_error(capsys, main(eval_args(world, x)))
    assert "adapter/adapter_config.json is missing" in line and "salient columns" in line


def test_foreign_quantization_method_is_refused(world, tmp_path, capsys):
    x = tmp_path / "awq"
    shutil.copytree(world["dense"], x)
    cfg = json.loads((x / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (x / "config.json").write_text(json.dumps(cfg))
    line = one_error(capsys, main(eval_args(world, x)))
    assert "quant_method 'awq'" in line


def test_the_adapter_is_what_makes_the_export_equal_the_checkpoint(world, tmp_path, capsys):
    """Negative control: the same base scored without its adapter (the record edited so eval lets it through)
    is a different model, so the equality above is the adapter's doing."""
    x = tmp_path / "base-only"
    shutil.copytree(world["compressed-tensors"], x)
    shutil.rmtree(x / "adapter")
    info = json.loads((x / "gift_quant_export.json").read_text())
    info["salient_per_layer"] = {}
    (x / "gift_quant_export.json").write_text(json.dumps(info))
    native = evaluate(world, world["ckpt"], tmp_path, capsys)
    base_only = evaluate(world, x, tmp_path, capsys)
    assert base_only["kind"] == "compressed-tensors export"
    assert abs(base_only["perplexity"] / native["perplexity"] - 1) > 1e-3
