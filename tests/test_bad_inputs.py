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


# ---- issue #22: manifests edited to hide tampering, and tensors that disagree with a consistent manifest


def _retensor(edit):
    """Change the weights with ``edit(tensors, doc)`` and rewrite the manifest to match: only the tensor and
    model checks (packed/integrity.py) can catch it, as they must for a manifest edited by hand."""
    def apply(c: Path) -> None:
        from safetensors.torch import load_file, save_file

        from gift_quant.util.files import sha256_file

        tensors = load_file(str(c / WEIGHTS_NAME))
        doc = json.loads((c / CONFIG_NAME).read_text())
        edit(tensors, doc)
        save_file(tensors, str(c / WEIGHTS_NAME), metadata={"format": "pt"})
        doc["files"][WEIGHTS_NAME] = sha256_file(c / WEIGHTS_NAME)
        (c / CONFIG_NAME).write_text(json.dumps(doc))
    return apply


def _reconfig(edit):
    """Edit config.json with ``edit(cfg)`` and rewrite its sha256 in the manifest to match."""
    def apply(c: Path) -> None:
        from gift_quant.util.files import sha256_file

        cfg = json.loads((c / "config.json").read_text())
        edit(cfg)
        (c / "config.json").write_text(json.dumps(cfg))
        doc = json.loads((c / CONFIG_NAME).read_text())
        doc["files"]["config.json"] = sha256_file(c / "config.json")
        (c / CONFIG_NAME).write_text(json.dumps(doc))
    return apply


def _first_name(doc: dict) -> str:
    return next(iter(doc["layers"]))


def _spec_bits(bits: int):
    def edit(d: dict) -> None:
        d["spec"]["bits"] = bits
    return edit


NEW_CHECKPOINT_CASES = {
    "manifest removed": (_edit_config(lambda d: d.pop("files")), ["records no file manifest", "None"]),
    "manifest empty": (_edit_config(lambda d: d.update(files={})), ["records no file manifest", "{}"]),
    "manifest lacks the weights": (_edit_config(lambda d: d["files"].pop(WEIGHTS_NAME)),
                                   ["manifest does not name", WEIGHTS_NAME]),
    "manifest lacks config.json": (_edit_config(lambda d: d["files"].pop("config.json")),
                                   ["manifest does not name", "config.json"]),
    "manifest names ./model.safetensors": (_edit_config(lambda d: d["files"].update(
        {"./" + WEIGHTS_NAME: d["files"][WEIGHTS_NAME]})), ["outside the checkpoint folder"]),
    "manifest names an absolute path": (_edit_config(lambda d: d["files"].update({"/etc/hostname": "0" * 64})),
                                        ["'/etc/hostname'", "outside the checkpoint folder"]),
    "format_version 0": (_edit_config(lambda d: d.update(format_version=0)), ["format_version 0"]),
    "a second copy of bits at the top": (_edit_config(lambda d: d.update(bits=2)), ["bits = 2", "outside spec"]),
    "a second copy of bits in quantize": (_edit_config(lambda d: d["quantize"].update(bits=2)),
                                          ["quantize.bits = 2", "outside spec"]),
    "spec bits edited to 2": (_edit_config(_spec_bits(2)), ["bits 2 in the config, 3 in the tensors"]),
    "spec bits edited to 4": (_edit_config(_spec_bits(4)), ["bits 4 in the config, 3 in the tensors"]),
    "layer out_features edited": (_edit_config(lambda d: _first_layer(d).update(out_features=32)),
                                  ["out_features 32 in the config"]),
    "tensors from a 2-bit checkpoint, manifest rewritten": (
        _retensor(lambda t, d: t.update({f"{_first_name(d)}.qweight": t[f"{_first_name(d)}.qweight"][:4]})),
        ["bits 3 in the config, 2 in the tensors"]),
    "g_idx out of range, manifest rewritten": (
        _retensor(lambda t, d: t[f"{_first_name(d)}.g_idx"].fill_(99)), ["g_idx values outside"]),
    "salient_idx repeated, manifest rewritten": (
        _retensor(lambda t, d: t[f"{_first_name(d)}.salient_idx"].fill_(1)), ["salient_idx values", "repeated"]),
    "salient_idx negative, manifest rewritten": (
        _retensor(lambda t, d: t[f"{_first_name(d)}.salient_idx"].fill_(-1)), ["salient_idx values outside"]),
    "scales stored as integers, manifest rewritten": (
        _retensor(lambda t, d: t.update({f"{_first_name(d)}.scales": t[f"{_first_name(d)}.scales"].to(torch.int32)})),
        ["scales as I32"]),
    "infinite salient column, manifest rewritten": (
        _retensor(lambda t, d: t[f"{_first_name(d)}.salient_weight"].view(-1)[0:1].fill_(float("inf"))),
        ["non-finite salient_weight"]),
    "zero points stored for a symmetric layer, manifest rewritten": (
        _retensor(lambda t, d: t.update({f"{_first_name(d)}.qzeros": torch.zeros(1, 24, dtype=torch.int32)})),
        ["qzeros", "symmetric"]),
    "a packed layer the config does not name": (
        _retensor(lambda t, d: t.update({"model.extra.qweight": torch.zeros(2, 2, dtype=torch.int32)})),
        ["packed layer model.extra"]),
    "embedding tensor removed, manifest rewritten": (
        _retensor(lambda t, d: t.pop("model.embed_tokens.weight")), ["missing ['model.embed_tokens.weight']"]),
    "config.json vocab_size edited, manifest rewritten": (_reconfig(lambda c: c.update(vocab_size=400)),
                                                         ["[400, 64]", "vocab_size 400"]),
    "config.json num_hidden_layers edited, manifest rewritten": (_reconfig(lambda c: c.update(num_hidden_layers=1)),
                                                                ["model.layers.1"]),
    "config.json intermediate_size edited, manifest rewritten": (_reconfig(lambda c: c.update(intermediate_size=96)),
                                                                ["mlp", "64 -> 96"]),
}
CHECKPOINT_CASES.update(NEW_CHECKPOINT_CASES)


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
    """Flip 1-3 random bytes of one checkpoint file: `load` refuses it, or gives the very same tensors; and
    `inspect` says "verified" exactly when `load` accepts (#22 req 2: one check for every reader)."""
    c = tmp_path_factory.mktemp("flip") / "ckpt"
    shutil.copytree(world["ckpt"], c, ignore=shutil.ignore_patterns("run"))
    name = data.draw(st.sampled_from([WEIGHTS_NAME, "config.json", CONFIG_NAME]))
    blob = bytearray((c / name).read_bytes())
    for _ in range(data.draw(st.integers(1, 3))):
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob[pos] ^= data.draw(st.integers(1, 255))
    (c / name).write_bytes(bytes(blob))
    from gift_quant.export.inspection import inspect_checkpoint

    try:
        verified = inspect_checkpoint(c)["health"].startswith("verified")
    except GiftQuantError:
        verified = False
    try:
        model = load(c)
    except GiftQuantError as exc:
        assert "\n" not in str(exc)
        assert not verified, f"inspect says verified where load refuses: {exc}"
        return
    assert verified, "load accepts what inspect does not verify"
    state = model.state_dict()
    assert state.keys() == reference_state.keys()
    assert all(torch.equal(state[k], reference_state[k]) for k in state), f"a flip in {name} loaded a different model"


# ================================================================ issue #22: every command, every setting
#
# Each case: exit 2, one line naming the flag / file / field and value (the needles), no traceback, every
# input byte-identical afterwards, no run folder, and no expensive stage reached (quantization, training).


@pytest.fixture(scope="module")
def more(world):
    """Training and perplexity text, a recipe folder, and source-model variants whose config.json or
    tokenizer files disagree with their weights or do not parse (built once, never modified by a case)."""
    from tiny import make_tokenizer, tiny_config
    from transformers import AutoModelForCausalLM

    root = world["root"]
    m = {"train": root / "train.jsonl", "ppl": root / "ppl.txt", "empty": root / "empty.txt",
         "short": root / "short.txt", "variants": root / "variants"}
    m["train"].write_text("".join(json.dumps({"prompt": corpus(12, seed=i), "response": corpus(12, seed=50 + i)}) + "\n"
                                  for i in range(40)), encoding="utf-8")
    m["ppl"].write_text(corpus(2000, seed=3), encoding="utf-8")
    m["empty"].write_text("", encoding="utf-8")
    m["short"].write_text("the model", encoding="utf-8")
    data = root / "bad-data"
    data.mkdir()
    for name, text in {"list.jsonl": "[1, 2]\n", "text-number.jsonl": '{"text": 5}\n',
                       "messages-string.jsonl": '{"messages": "hello"}\n',
                       "prompt-null.jsonl": '{"prompt": null, "response": "x"}\n'}.items():
        (data / name).write_text(text, encoding="utf-8")
    (data / "binary.txt").write_bytes(bytes(range(256)) * 40)
    m["data"] = data

    def variant(name: str, edit) -> Path:
        d = m["variants"] / name
        shutil.copytree(world["src"], d)
        edit(d)
        return d

    def config_edit(**changes):
        def edit(d: Path) -> None:
            cfg = json.loads((d / "config.json").read_text())
            cfg.update(changes)
            for k, v in list(changes.items()):
                if v is None:
                    cfg.pop(k)
            (d / "config.json").write_text(json.dumps(cfg))
        return edit

    def tokenizer_config_edit(**changes):
        def edit(d: Path) -> None:
            cfg = json.loads((d / "tokenizer_config.json").read_text())
            cfg.update(changes)
            (d / "tokenizer_config.json").write_text(json.dumps(cfg))
        return edit

    def small_vocab(d: Path) -> None:  # a model of 256 rows with a tokenizer of 300 tokens
        for f in d.iterdir():
            f.unlink()
        make_tokenizer(d)
        AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=256)).save_pretrained(d)

    m["sources"] = {name: variant(name, edit) for name, edit in {
        "vocab_size 400": config_edit(vocab_size=400),
        "vocab_size 300": config_edit(vocab_size=300),
        "num_hidden_layers 1": config_edit(num_hidden_layers=1),
        "num_hidden_layers 3": config_edit(num_hidden_layers=3),
        "intermediate_size 96": config_edit(intermediate_size=96),
        "hidden_size a string": config_edit(hidden_size="64"),
        "num_attention_heads 3": config_edit(num_attention_heads=3, head_dim=None),
        "torch_dtype float8": config_edit(torch_dtype="float8", dtype="float8"),
        "max_position_embeddings 16": config_edit(max_position_embeddings=16),
        "config.json a list": lambda d: (d / "config.json").write_text("[1, 2]"),
        "tokenizer larger than vocab_size": small_vocab,
        "tokenizer.json not JSON": lambda d: (d / "tokenizer.json").write_text("{garbage"),
        "tokenizer.json of another shape": lambda d: (d / "tokenizer.json").write_text('{"version": "1.0"}'),
        "tokenizer_config.json not JSON": lambda d: (d / "tokenizer_config.json").write_text("{x"),
        "generation_config.json not JSON": lambda d: (d / "generation_config.json").write_text("{x"),
        "chat_template that does not parse": tokenizer_config_edit(chat_template="{% if %}"),
    }.items()}
    return m


def _inputs_of(world, more) -> list[Path]:
    return [world["src"], world["calib"], world["ckpt"], more["train"], more["ppl"], more["data"], more["variants"]]


def _snapshot_all(paths: list[Path]) -> dict[str, bytes]:
    snap = {}
    for p in paths:
        if p.is_dir():
            snap.update({f"{p}/{k}": v for k, v in _snapshot(p).items()})
        elif p.exists():
            snap[str(p)] = p.read_bytes()
    return snap


@pytest.fixture
def no_expensive_stage(monkeypatch):
    """Quantization or training reached by a refused case is a failure of that case."""
    def reached(*a, **k):
        raise AssertionError("an expensive stage started before the bad input was refused")
    monkeypatch.setattr("gift_quant.workflows.stages.quantize_model", reached)  # finetune selects through it too
    monkeypatch.setattr("gift_quant.recover.training.train", reached)


def _recover(world, more, out: Path, *extra) -> list[str]:
    return ["recover", world["src"], "--out", out, "--calib-data", world["calib"], "--train-data", more["train"],
            "--ppl-data", more["ppl"], *SMALL, "--steps", "2", "--batch-size", "2", "--max-windows", "2",
            "--ppl-seq-len", "32", *extra]


def _finetune(world, more, out: Path, *extra) -> list[str]:
    return ["finetune", world["src"], "--out", out, "--calib-data", world["calib"], "--train-data", more["train"],
            *SMALL, "--steps", "2", "--batch-size", "2", *extra]


def _compare(world, more, out: Path, *extra) -> list[str]:
    return ["compare", world["src"], "--out", out, "--calib-data", world["calib"], "--train-data", more["train"],
            "--ppl-data", more["ppl"], *SMALL, "--methods", "gptq,gift-post", "--steps", "2", "--batch-size", "2",
            "--max-windows", "2", "--ppl-seq-len", "32", *extra]


def _eval(world, more, *extra) -> list[str]:
    return ["eval", world["ckpt"], "--ppl-data", more["ppl"], "--seq-len", "32", "--max-windows", "2", "--device",
            "cpu", "--no-progress", *extra]


# (command builder (world, more, out) -> argv, needles); every flag and recipe key of #22's kinds
SETTINGS_CASES = {
    "recover --lr nan": (lambda w, m, o: _recover(w, m, o, "--lr", "nan"), ["--lr nan", "finite"]),
    "recover --lr inf": (lambda w, m, o: _recover(w, m, o, "--lr", "inf"), ["--lr inf", "finite"]),
    "recover --lr 0": (lambda w, m, o: _recover(w, m, o, "--lr", "0"), ["--lr 0.0"]),
    "recover --lr negative": (lambda w, m, o: _recover(w, m, o, "--lr=-1e-4"), ["--lr -0.0001"]),
    "recover --ce-weight nan": (lambda w, m, o: _recover(w, m, o, "--loss", "kd+ce", "--ce-weight", "nan"),
                                ["--ce-weight nan"]),
    "recover --ce-weight -1": (lambda w, m, o: _recover(w, m, o, "--ce-weight", "-1"), ["--ce-weight -1"]),
    "recover --kd-temperature inf": (lambda w, m, o: _recover(w, m, o, "--kd-temperature", "inf"),
                                     ["--kd-temperature inf"]),
    "recover --kd-temperature 0": (lambda w, m, o: _recover(w, m, o, "--kd-temperature", "0"),
                                   ["--kd-temperature 0"]),
    "recover --blockwise-lr nan": (lambda w, m, o: _recover(w, m, o, "--blockwise-steps", "2", "--blockwise-lr",
                                                            "nan"), ["--blockwise-lr nan"]),
    "recover --warmup-ratio 1": (lambda w, m, o: _recover(w, m, o, "--warmup-ratio", "1"), ["--warmup-ratio 1"]),
    "recover --warmup-ratio nan": (lambda w, m, o: _recover(w, m, o, "--warmup-ratio", "nan"),
                                   ["--warmup-ratio nan"]),
    "recover --max-windows 0": (lambda w, m, o: _recover(w, m, o, "--max-windows", "0"), ["--max-windows 0"]),
    "recover --max-windows -3": (lambda w, m, o: _recover(w, m, o, "--max-windows", "-3"), ["--max-windows -3"]),
    "recover --ppl-seq-len 1": (lambda w, m, o: _recover(w, m, o, "--ppl-seq-len", "1"),
                                ["--ppl-seq-len", " 1 must be", "nothing to predict"]),
    "recover --ppl-seq-len 0": (lambda w, m, o: _recover(w, m, o, "--ppl-seq-len", "0"), ["--ppl-seq-len"]),
    "recover --seq-len 1": (lambda w, m, o: _recover(w, m, o, "--seq-len", "1"), ["--seq-len 1"]),
    "recover --seq-len past the positions": (lambda w, m, o: _recover(w, m, o, "--seq-len", "512"),
                                             ["--seq-len 512", "256 positions", "use --seq-len 256 or less"]),
    "recover --ppl-seq-len past the positions": (lambda w, m, o: _recover(w, m, o, "--ppl-seq-len", "1024"),
                                                 ["--ppl-seq-len 1024", "256 positions"]),
    "recover --batch-size 0": (lambda w, m, o: _recover(w, m, o, "--batch-size", "0"), ["--batch-size 0"]),
    "recover --grad-accum 0": (lambda w, m, o: _recover(w, m, o, "--grad-accum", "0"), ["--grad-accum 0"]),
    "recover --save-every 0": (lambda w, m, o: _recover(w, m, o, "--save-every", "0"), ["--save-every 0"]),
    "recover --steps -1": (lambda w, m, o: _recover(w, m, o, "--steps", "-1"), ["--steps -1"]),
    "recover --noise-bits 1": (lambda w, m, o: _recover(w, m, o, "--noise-bits", "1"), ["--noise-bits", "1"]),
    "recover --noise-bits 17": (lambda w, m, o: _recover(w, m, o, "--noise-bits", "17"), ["--noise-bits", "17"]),
    "recover --seed -1": (lambda w, m, o: _recover(w, m, o, "--seed", "-1"), ["--seed -1"]),
    "recover --metric bogus": (lambda w, m, o: _recover(w, m, o, "--metric", "bogus"), ["--metric", "bogus"]),
    "recover --device tpu": (lambda w, m, o: _recover(w, m, o, "--device", "tpu"), ["--device 'tpu'"]),
    "recover --dtype float64": (lambda w, m, o: _recover(w, m, o, "--dtype", "float64"), ["--dtype 'float64'"]),
    "recover --damp nan": (lambda w, m, o: _recover(w, m, o, "--damp", "nan"), ["--damp nan"]),
    "recover --train-data empty string": (lambda w, m, o: _recover(w, m, o, "--train-data", ""),
                                          ["--train-data ''", "empty"]),
    "recover --train-data missing": (lambda w, m, o: _recover(w, m, o, "--train-data", o.parent / "nope.jsonl"),
                                     ["nope.jsonl", "does not exist"]),
    "recover --train-data empty file": (lambda w, m, o: _recover(w, m, o, "--train-data", m["empty"]),
                                        ["empty.txt"]),
    "recover --train-data binary": (lambda w, m, o: _recover(w, m, o, "--train-data", m["data"] / "binary.txt"),
                                    ["binary.txt", "not text"]),
    "recover --train-data a JSON list": (lambda w, m, o: _recover(w, m, o, "--train-data", m["data"] / "list.jsonl"),
                                         ["list.jsonl:1", "got list"]),
    "recover --train-data messages a string": (
        lambda w, m, o: _recover(w, m, o, "--train-data", m["data"] / "messages-string.jsonl"),
        ["messages-string.jsonl:1", "'messages'"]),
    "recover --train-data prompt null": (
        lambda w, m, o: _recover(w, m, o, "--train-data", m["data"] / "prompt-null.jsonl"),
        ["prompt-null.jsonl:1", "'prompt' must be a string"]),
    "recover --eval-data missing": (lambda w, m, o: _recover(w, m, o, "--eval-data", o.parent / "held.jsonl"),
                                    ["held.jsonl", "does not exist"]),
    "recover --ppl-data missing": (lambda w, m, o: _recover(w, m, o, "--ppl-data", o.parent / "ppl.txt"),
                                   ["ppl.txt", "does not exist"]),
    "recover --ppl-data empty": (lambda w, m, o: _recover(w, m, o, "--ppl-data", m["empty"]), ["empty.txt", "no text"]),
    "recover --ppl-data too short": (lambda w, m, o: _recover(w, m, o, "--ppl-data", m["short"]),
                                     ["short.txt", "too short"]),
    "recover with a chat template that does not parse": (
        lambda w, m, o: ["recover", m["sources"]["chat_template that does not parse"], *_recover(w, m, o)[2:]],
        ["chat_template", "TemplateSyntaxError"]),
    "eval --seq-len 1": (lambda w, m, o: _eval(w, m, "--seq-len", "1"), ["--seq-len", " 1 must be"]),
    "eval --seq-len 0": (lambda w, m, o: _eval(w, m, "--seq-len", "0"), ["--seq-len", " 0 must be"]),
    "eval --max-windows 0": (lambda w, m, o: _eval(w, m, "--max-windows", "0"), ["--max-windows 0"]),
    "eval --seq-len past the positions": (lambda w, m, o: _eval(w, m, "--seq-len", "1024"),
                                          ["--seq-len 1024", "256 positions"]),
    "eval --ppl-data empty string": (lambda w, m, o: _eval(w, m, "--ppl-data", ""), ["--ppl-data ''"]),
    "eval --ppl-data a binary file": (lambda w, m, o: _eval(w, m, "--ppl-data", m["data"] / "binary.txt"),
                                      ["binary.txt", "not text"]),
    "eval --json over the checkpoint's config.json": (lambda w, m, o: _eval(w, m, "--json", w["ckpt"] / "config.json"),
                                                      ["--json", "would replace config.json"]),
    "eval --json over the checkpoint's weights": (
        lambda w, m, o: _eval(w, m, "--json", w["ckpt"] / WEIGHTS_NAME), ["would replace model.safetensors"]),
    "eval --json over the perplexity text": (lambda w, m, o: _eval(w, m, "--json", m["ppl"]),
                                             ["--json", "is the perplexity data"]),
    "quantize --seed -1": (lambda w, m, o: _quantize(w, o, "--seed", "-1"), ["--seed -1"]),
    "quantize --seq-len 1": (lambda w, m, o: _quantize(w, o, "--seq-len", "1"), ["--seq-len 1"]),
    "quantize --seq-len past the positions": (lambda w, m, o: _quantize(w, o, "--seq-len", "512"),
                                              ["--seq-len 512", "256 positions"]),
    "quantize --calib-samples -1": (lambda w, m, o: _quantize(w, o, "--calib-samples", "-1"), ["--calib-samples -1"]),
    "quantize --damp inf": (lambda w, m, o: _quantize(w, o, "--damp", "inf"), ["--damp inf"]),
    "quantize --device tpu": (lambda w, m, o: _quantize(w, o, "--device", "tpu"), ["--device 'tpu'"]),
    "quantize --calib-data a record of the wrong type": (
        lambda w, m, o: _quantize(w, o, "--calib-data", m["data"] / "text-number.jsonl"),
        ["text-number.jsonl:1", "'text' must be a string"]),
    "compare --train-data missing": (lambda w, m, o: _compare(w, m, o, "--train-data", o.parent / "nope.jsonl"),
                                     ["nope.jsonl", "does not exist"]),
    "compare --ppl-seq-len past the positions": (lambda w, m, o: _compare(w, m, o, "--ppl-seq-len", "4096"),
                                                 ["--ppl-seq-len 4096", "256 positions"]),
    "compare --limit 0": (lambda w, m, o: _compare(w, m, o, "--limit", "0"), ["--limit 0"]),
    "compare --out holding the training data": (
        lambda w, m, o: _compare(w, m, m["data"], "--train-data", m["data"] / "list.jsonl"),
        ["contains the training data"]),
    "eval --tasks with --limit 0": (lambda w, m, o: _eval(w, m, "--tasks", "arc_easy", "--limit", "0"),
                                    ["--limit 0"]),
    "finetune --lr nan": (lambda w, m, o: _finetune(w, m, o, "--lr", "nan"), ["--lr nan"]),
    "finetune --steps -1": (lambda w, m, o: _finetune(w, m, o, "--steps", "-1"), ["--steps -1"]),
    "finetune --seq-len past the positions": (lambda w, m, o: _finetune(w, m, o, "--seq-len", "300"),
                                              ["--seq-len 300", "256 positions"]),
    "finetune --train-data missing": (lambda w, m, o: _finetune(w, m, o, "--train-data", o.parent / "nope.jsonl"),
                                      ["nope.jsonl", "does not exist"]),
    "finetune --train-data empty file": (lambda w, m, o: _finetune(w, m, o, "--train-data", m["empty"]),
                                         ["empty.txt"]),
}

# recipe keys (recover/eval/quantize sections) of the same kinds: YAML's .nan and .inf included
RECIPE_SETTING_CASES = {
    "recover.lr .nan": ("recover:\n  lr: .nan\n", ["--lr nan"]),
    "recover.kd_temperature .inf": ("recover:\n  kd_temperature: .inf\n", ["--kd-temperature inf"]),
    "recover.max_grad_norm .inf": ("recover:\n  max_grad_norm: .inf\n", ["recover.max_grad_norm inf"]),
    "recover.weight_decay -1": ("recover:\n  weight_decay: -1\n", ["recover.weight_decay -1"]),
    "recover.eval_windows 0": ("recover:\n  eval_windows: 0\n", ["recover.eval_windows 0"]),
    "recover.train_data blank": ("recover:\n  train_data: '  '\n", ["--train-data", "empty"]),
    "eval.max_windows 0": ("eval:\n  max_windows: 0\n", ["--max-windows 0"]),
    "eval.seq_len 1": ("eval:\n  seq_len: 1\n", ["--ppl-seq-len", " 1 must be"]),
    "quantize.metric_bits 99": ("quantize:\n  metric_bits: 99\n", ["quantize.metric_bits 99"]),
    "quantize.block_size 0": ("quantize:\n  block_size: 0\n", ["quantize.block_size 0"]),
    "quantize.salient_dtype int8": ("quantize:\n  salient_dtype: int8\n", ["quantize.salient_dtype 'int8'"]),
    "quantize.damp .nan": ("quantize:\n  damp: .nan\n", ["--damp nan"]),
    "quantize.salient_fraction .inf": ("quantize:\n  salient: null\n  salient_fraction: .inf\n",
                                       ["--salient-fraction inf"]),
}
def _without(argv: list, *flags: str) -> list:
    """``argv`` less the given flags and their values (so that a recipe's value is the one used)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in flags:
            skip = True
        else:
            out.append(a)
    return out


for _name, (_text, _needles) in RECIPE_SETTING_CASES.items():
    def _with_recipe(w, m, o, text=_text):
        recipe = o.parent / "recipe.yaml"
        recipe.write_text(text)
        return _without(_recover(w, m, o, "--recipe", recipe), "--ppl-seq-len", "--max-windows", "--train-data")
    SETTINGS_CASES[f"recipe {_name}"] = (_with_recipe, _needles)

# source models whose config.json or tokenizer disagree with their weights, or do not parse (req 4, req 7)
SOURCE_CASES = {
    "vocab_size 400": ["lm_head.weight", "[320, 64] in the weights", "vocab_size 400"],
    "vocab_size 300": ["lm_head.weight", "vocab_size 300"],
    "num_hidden_layers 1": ["model.layers.1.", "num_hidden_layers 1"],
    "num_hidden_layers 3": ["lack 9 tensors", "model.layers.2."],
    "intermediate_size 96": ["mlp", "intermediate_size 96"],
    "hidden_size a string": ["config.json", "hidden_size"],
    "num_attention_heads 3": ["config.json", "attention heads (3)"],
    "torch_dtype float8": ["config.json", "float8"],
    "max_position_embeddings 16": ["--seq-len 32", "16 positions"],
    "config.json a list": ["config.json", "model_type"],
    "tokenizer larger than vocab_size": ["tokenizer has 300 tokens", "vocab_size is 256"],
    "tokenizer.json not JSON": ["tokenizer.json is not valid JSON"],
    "tokenizer.json of another shape": ["no usable tokenizer files", "KeyError"],
    "tokenizer_config.json not JSON": ["tokenizer_config.json is not valid JSON"],
    "generation_config.json not JSON": ["generation_config.json is not valid JSON"],
}
for _name, _needles in SOURCE_CASES.items():
    SETTINGS_CASES[f"source with {_name}"] = (
        lambda w, m, o, name=_name: ["quantize", m["sources"][name], *_quantize(w, o)[2:]], _needles)


@pytest.mark.parametrize("case", sorted(SETTINGS_CASES))
def test_bad_setting_or_input_of_any_command(world, more, tmp_path, capsys, no_expensive_stage, case):
    build_args, needles = SETTINGS_CASES[case]
    out = tmp_path / "out"
    args = [str(a) for a in build_args(world, more, out)]
    before = _snapshot_all(_inputs_of(world, more))
    rc = main(args)
    line = _one_error_line(rc, capsys.readouterr().err)
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    assert _snapshot_all(_inputs_of(world, more)) == before, "a refused command changed an input"
    assert not (out / "run").exists(), "a refused command started a run folder"
