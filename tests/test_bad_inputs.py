"""The bad-input matrix of issue #13: each case gives exit 2, one line naming the file, key or value, no
traceback, and leaves every existing file as it was. Cases already covered elsewhere (test_cli_errors.py,
test_integrity.py) are not repeated. A property test flips random bytes of a checkpoint's files: the
load is refused or (a byte that changes nothing) identical, never a silently different model.

All in process through ``cli.main`` (its return value is the console script's exit status).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny import corpus, make_model_dir

from gift_quant.cli.app import main
from gift_quant.packed.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load
from gift_quant.util.errors import GiftQuantError

pytestmark = pytest.mark.usefixtures("torch_single_thread")

SMALL = ["--calib-samples", "4", "--seq-len", "32", "--salient", "4", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-inputs")
    src = make_model_dir("llama", root / "src")
    calib = root / "calib.txt"
    calib.write_text(corpus(), encoding="utf-8")
    assert main(["quantize", str(src), "--out", str(root / "q"), "--calib-data", str(calib), *SMALL]) == 0
    return {"root": root, "src": src, "calib": calib, "ckpt": root / "q"}


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error_line(rc: int, err: str) -> str:
    assert "Traceback" not in err, err
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("gift-quant: error:")]
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------- a damaged checkpoint


def _edit_config(edit):
    def apply(c: Path) -> None:
        doc = json.loads((c / CONFIG_NAME).read_text())
        edit(doc)
        (c / CONFIG_NAME).write_text(json.dumps(doc))
    return apply


def _truncate(name: str, size: int):
    def apply(c: Path) -> None:
        with open(c / name, "r+b") as f:
            f.truncate(size)
    return apply


def _first_layer(doc: dict) -> dict:
    return doc["layers"][next(iter(doc["layers"]))]


CHECKPOINT_CASES = {
    "config truncated": (lambda c: (c / CONFIG_NAME).write_text((c / CONFIG_NAME).read_text()[:120]),
                         [CONFIG_NAME, "not valid JSON"]),
    "config empty": (lambda c: (c / CONFIG_NAME).write_text(""), [CONFIG_NAME, "not valid JSON"]),
    "config binary": (lambda c: (c / CONFIG_NAME).write_bytes(b"\xff\xfe\x00garbage"), [CONFIG_NAME]),
    "config is a list": (lambda c: (c / CONFIG_NAME).write_text("[1, 2]"), [CONFIG_NAME, "list"]),
    "format_version string": (_edit_config(lambda d: d.update(format_version="1")), ["format_version", "'1'"]),
    "format_version list": (_edit_config(lambda d: d.update(format_version=[1])), ["format_version", "[1]"]),
    "format_version float": (_edit_config(lambda d: d.update(format_version=1.0)), ["format_version", "1.0"]),
    "format_version missing": (_edit_config(lambda d: d.pop("format_version")), ["format_version", "None"]),
    "format_version too new": (_edit_config(lambda d: d.update(format_version=99)), ["v99", "upgrade"]),
    "format missing": (_edit_config(lambda d: d.pop("format")), ["format None"]),
    "quantize missing": (_edit_config(lambda d: d.pop("quantize")), ["key quantize is missing"]),
    "quantize a string": (_edit_config(lambda d: d.update(quantize="3bit")), ["quantize", "'3bit'"]),
    "spec missing": (_edit_config(lambda d: d.pop("spec")), ["key spec is missing"]),
    "bits missing": (_edit_config(lambda d: d["spec"].pop("bits")), ["spec.bits is missing"]),
    "bits a string": (_edit_config(lambda d: d["spec"].update(bits="3")), ["spec.bits", "'3'"]),
    "bits 5": (_edit_config(lambda d: d["spec"].update(bits=5)), ["spec.bits = 5"]),
    "bits a bool": (_edit_config(lambda d: d["spec"].update(bits=True)), ["spec.bits = True"]),
    "sym a string": (_edit_config(lambda d: d["spec"].update(sym="no")), ["spec.sym", "'no'"]),
    "salient_dtype missing": (_edit_config(lambda d: d["spec"].pop("salient_dtype")), ["salient_dtype"]),
    "salient_dtype unknown": (_edit_config(lambda d: d["spec"].update(salient_dtype="float8")), ["'float8'"]),
    "group_size zero": (_edit_config(lambda d: d["spec"].update(group_size=0)), ["spec.group_size = 0"]),
    "group_layout unknown": (_edit_config(lambda d: d["spec"].update(group_layout="zigzag")), ["'zigzag'"]),
    "spec unknown key": (_edit_config(lambda d: d["spec"].update(bitz=3)), ["unknown key", "bitz"]),
    "layers missing": (_edit_config(lambda d: d.pop("layers")), ["key layers is missing"]),
    "layers a list": (_edit_config(lambda d: d.update(layers=[])), ["layers", "[]"]),
    "layer groups a string": (_edit_config(lambda d: _first_layer(d).update(groups="x")), [".groups = 'x'"]),
    "layer groups missing": (_edit_config(lambda d: _first_layer(d).pop("groups")), ["groups is missing"]),
    "layer salient negative": (_edit_config(lambda d: _first_layer(d).update(salient=-1)), [".salient = -1"]),
    "layer salient too large": (_edit_config(lambda d: _first_layer(d).update(salient=10_000)), [".salient = 10000"]),
    "layer in_features zero": (_edit_config(lambda d: _first_layer(d).update(in_features=0)), ["in_features = 0"]),
    "layer salient count differs": (_edit_config(lambda d: _first_layer(d).update(salient=3)),
                                    [WEIGHTS_NAME, "does not match"]),
    "layer groups differ": (_edit_config(lambda d: _first_layer(d).update(groups=2)), [WEIGHTS_NAME]),
    "unknown layer name": (_edit_config(lambda d: d["layers"].update({"model.nope": _first_layer(d)})),
                           ["model.nope"]),
    "effective_bits a string": (_edit_config(lambda d: d.update(effective_bits="4.5")), ["effective_bits"]),
    "files not a mapping": (_edit_config(lambda d: d.update(files=["model.safetensors"])), ["files"]),
    "files names a path outside": (_edit_config(lambda d: d["files"].update({"../x": "0" * 64})), ["'../x'"]),
    "recorded sha256 differs": (_edit_config(lambda d: d["files"].update({WEIGHTS_NAME: "0" * 64})),
                                [WEIGHTS_NAME, "sha256"]),
    "weights truncated": (_truncate(WEIGHTS_NAME, 1000), [WEIGHTS_NAME]),
    "weights empty": (_truncate(WEIGHTS_NAME, 0), [WEIGHTS_NAME]),
    "weights deleted": (lambda c: (c / WEIGHTS_NAME).unlink(), [WEIGHTS_NAME, "missing"]),
    "weights replaced by a folder": (lambda c: ((c / WEIGHTS_NAME).unlink(), (c / WEIGHTS_NAME).mkdir()),
                                     [WEIGHTS_NAME]),
    "config.json deleted": (lambda c: (c / "config.json").unlink(), ["config.json", "missing"]),
    "config.json truncated": (_truncate("config.json", 20), ["config.json"]),
}


# edits of gift_quant/config.json that keep every recorded sha256 valid: load and export refuse them
INSPECT_GAPS: set[str] = set()  # inspect cross-checks the per-layer settings with the tensor headers too


@pytest.mark.parametrize("command", ["eval", "export", "inspect"])
@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_damaged_checkpoint_is_refused_in_one_line(world, tmp_path, capsys, case, command):
    damage, needles = CHECKPOINT_CASES[case]
    if command == "inspect" and case in INSPECT_GAPS:
        pytest.xfail("inspect checks the sha256 of the files but does not cross-check the config's per-layer "
                     "metadata with the tensors (inspect_ckpt.py)")
    c = tmp_path / "ckpt"
    shutil.copytree(world["ckpt"], c, ignore=shutil.ignore_patterns("run"))
    damage(c)
    before = _snapshot(c)
    args = {"eval": ["eval", c, "--ppl-data", world["calib"], "--seq-len", "32", "--max-windows", "2",
                     "--device", "cpu", "--no-progress"],
            "export": ["export", c, "--out", tmp_path / "exported"],
            "inspect": ["inspect", c]}[command]
    rc = main([str(a) for a in args])
    line = _one_error_line(rc, capsys.readouterr().err)
    if command != "inspect":  # inspect words its health line its own way; it names the file or key too
        for needle in needles:
            assert needle in line, f"{needle!r} not in {line!r}"
    assert str(c) in line or any(n in line for n in needles), line
    assert _snapshot(c) == before, "a refused command must not change the checkpoint"
    assert not (tmp_path / "exported").exists()


# ---------------------------------------------------------------- settings, devices, data files


def _quantize(world, out: Path, *extra) -> list[str]:
    return ["quantize", str(world["src"]), "--out", str(out), "--calib-data", str(world["calib"]), *SMALL,
            *[str(e) for e in extra]]


def _data_case(name: str, root: Path, calib: Path) -> tuple[list[str], list[str]]:
    """(extra flags, needles) of a data-file case, its files written under ``root``."""
    if name == "symlink loop in a calibration folder":
        d = root / "calib-loop"
        d.mkdir()
        shutil.copy(calib, d / "a.txt")
        os.symlink("y.txt", d / "x.txt")
        os.symlink("x.txt", d / "y.txt")
        (d / "self").symlink_to(d)  # a folder loop as well
        return ["--calib-data", d], ["symlink loop", "x.txt"]
    if name == "fake parquet":
        (root / "fake.parquet").write_text("this is not parquet")
        return ["--calib-data", root / "fake.parquet"], ["fake.parquet", "parquet"]
    if name == "binary .txt":
        (root / "bin.txt").write_bytes(bytes(range(256)) * 40)
        return ["--calib-data", root / "bin.txt"], ["bin.txt", "not text"]
    if name == "non-UTF-8 .txt":
        (root / "latin.txt").write_bytes("caf\xe9 ".encode("latin-1") * 2000)
        return ["--calib-data", root / "latin.txt"], ["latin.txt", "not text"]
    if name == "binary .jsonl":
        (root / "bin.jsonl").write_bytes(b"\xff\xfe" * 500)
        return ["--calib-data", root / "bin.jsonl"], ["bin.jsonl", "UTF-8"]
    if name == "calibration folder is unreadable file type":
        (root / "calib.csv").write_text("a,b\n1,2\n")
        return ["--calib-data", root / "calib.csv"], ["calib.csv", "unsupported file type"]
    raise KeyError(name)


DATA_CASES = ["symlink loop in a calibration folder", "fake parquet", "binary .txt", "non-UTF-8 .txt",
              "binary .jsonl", "calibration folder is unreadable file type"]


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_calibration_data_is_refused(world, tmp_path, capsys, case):
    extra, needles = _data_case(case, tmp_path, world["calib"])
    rc = main(_quantize(world, tmp_path / "out", *extra))
    line = _one_error_line(rc, capsys.readouterr().err)
    assert all(n in line for n in needles), line


SETTING_CASES = {
    "--device bogus": (["--device", "bogus"], ["--device", "'bogus'"]),
    "--device tpu": (["--device", "meta"], ["--device", "'meta'"]),
    "--device cuda:99": (["--device", "cuda:99"], ["--device", "cuda:99"]),
    "--calib-batch-size 0": (["--calib-batch-size", "0"], ["--calib-batch-size", "0"]),
    "--calib-batch-size -2": (["--calib-batch-size", "-2"], ["--calib-batch-size", "-2"]),
    "--group-size 48 (divides no layer)": (["--group-size", "48"], ["--group-size 48"]),
    "--group-size 0": (["--group-size", "0"], ["--group-size", "0"]),
}


@pytest.mark.parametrize("case", sorted(SETTING_CASES))
def test_bad_setting_is_refused_before_the_output_is_touched(world, tmp_path, capsys, case):
    extra, needles = SETTING_CASES[case]
    rc = main(_quantize(world, tmp_path / "out", *extra))
    line = _one_error_line(rc, capsys.readouterr().err)
    assert all(n in line for n in needles), line
    assert not (tmp_path / "out" / "run").exists(), "refused settings must not start a run folder"


RECIPE_CASES = {
    "bits a word": ("quantize:\n  bits: three\n", ["quantize.bits", "'three'"]),
    "act_order a string": ("quantize:\n  act_order: 'false'\n", ["quantize.act_order", "'false'"]),
    "sym a string": ("quantize:\n  sym: 'no'\n", ["quantize.sym", "'no'"]),
    "damp a list": ("quantize:\n  damp: [0.1]\n", ["quantize.damp", "[0.1]"]),
    "block_size a float": ("quantize:\n  block_size: 12.5\n", ["quantize.block_size", "12.5"]),
    "section a list": ("quantize: [1, 2]\n", ["'quantize'"]),
    "recipe a list": ("- 1\n- 2\n", ["recipe"]),
    "not YAML": ("quantize:\n  bits: 3\n   x: : :\n", ["not valid YAML"]),
}


@pytest.mark.parametrize("case", sorted(RECIPE_CASES))
def test_bad_recipe_value_names_the_key_and_value(world, tmp_path, capsys, case):
    text, needles = RECIPE_CASES[case]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    rc = main(_quantize(world, tmp_path / "out", "--recipe", recipe))
    line = _one_error_line(rc, capsys.readouterr().err)
    assert all(n in line for n in needles), line


def test_truncated_source_shard_is_refused_naming_the_folder(world, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(world["src"], src)
    size = (src / "model.safetensors").stat().st_size
    with open(src / "model.safetensors", "r+b") as f:
        f.truncate(size // 2)
    for args in (_quantize(world, tmp_path / "out"), ["eval", src, "--ppl-data", world["calib"], "--seq-len", "32",
                                                     "--device", "cpu", "--no-progress"]):
        if args[0] == "quantize":
            args[1] = str(src)
        rc = main([str(a) for a in args])
        line = _one_error_line(rc, capsys.readouterr().err)
        assert str(src) in line and "truncated" in line, line


def test_unpicklable_bin_shard_is_refused(world, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(world["src"], src)
    (src / "model.safetensors").unlink()
    (src / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not a torch archive" * 10)
    rc = main(["eval", str(src), "--ppl-data", str(world["calib"]), "--seq-len", "32", "--device", "cpu",
               "--no-progress"])
    line = _one_error_line(rc, capsys.readouterr().err)
    assert str(src) in line, line


def test_inspect_json_into_a_folder_is_refused(world, tmp_path, capsys):
    target = tmp_path / "a-folder"
    target.mkdir()
    rc = main(["inspect", "--json", str(target), str(world["ckpt"])])
    line = _one_error_line(rc, capsys.readouterr().err)
    assert str(target) in line and "folder" in line, line


# ---------------------------------------------------------------- property: random byte flips


@pytest.fixture(scope="module")
def reference_state(world):
    return {k: v.clone() for k, v in load(world["ckpt"]).state_dict().items()}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_byte_flips_are_refused_or_harmless(world, reference_state, tmp_path_factory, data):
    """Flip 1-3 random bytes of one checkpoint file: `load` refuses it, or gives the very same tensors."""
    c = tmp_path_factory.mktemp("flip") / "ckpt"
    shutil.copytree(world["ckpt"], c, ignore=shutil.ignore_patterns("run"))
    name = data.draw(st.sampled_from([WEIGHTS_NAME, "config.json", CONFIG_NAME]))
    blob = bytearray((c / name).read_bytes())
    for _ in range(data.draw(st.integers(1, 3))):
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob[pos] ^= data.draw(st.integers(1, 255))
    (c / name).write_bytes(bytes(blob))
    try:
        model = load(c)
    except GiftQuantError as exc:
        assert "\n" not in str(exc)
        return
    state = model.state_dict()
    assert state.keys() == reference_state.keys()
    assert all(torch.equal(state[k], reference_state[k]) for k in state), f"a flip in {name} loaded a different model"
