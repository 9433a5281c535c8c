"""--overwrite removes what gift-quant wrote and nothing else (issue #22 req 1).

* An ``--out`` that is, contains or lies inside an input (model folder, checkpoint, data, recipe) is refused
  before anything is created, with or without --overwrite; so is a folder holding files gift-quant did not
  write (named in the refusal), and nothing in it is removed.
* A property test over generated layouts (inputs inside outputs, outputs inside inputs, symlinks, user files
  anywhere in an earlier output or export) runs the real commands and checks that no input and no user file
  is ever removed or changed, and that a refusal removes nothing at all.

In process through ``cli.main``. ``quantize`` runs are stopped right after the output folder is prepared
(where --overwrite removes), which is all these tests are about; ``export`` runs whole.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny import corpus, make_model_dir

from gift_quant.cli.app import main
from gift_quant.packed.ownership import owned_files
from gift_quant.packed.run_folder import remove_intermediate

pytestmark = pytest.mark.usefixtures("torch_single_thread")

SMALL = ["--calib-samples", "4", "--seq-len", "32", "--salient", "4", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("overwrite")
    src = make_model_dir("llama", root / "src")
    calib = root / "calib.txt"
    calib.write_text(corpus(), encoding="utf-8")
    q, x = root / "q", root / "x"
    assert main(["quantize", str(src), "--out", str(q), "--calib-data", str(calib), *SMALL]) == 0
    assert main(["export", str(q), "--out", str(x)]) == 0
    return {"root": root, "src": src, "calib": calib, "q": q, "x": x}


def tree(folder: Path) -> dict[str, object]:
    """Every entry under ``folder`` (symlinks not followed): file bytes, link targets, folders."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(root) / name
            rel = str(p.relative_to(folder))
            out[rel] = ("link", os.readlink(p)) if p.is_symlink() else (p.read_bytes() if p.is_file() else "<dir>")
    return out




@pytest.fixture
def stop_after_prepare(monkeypatch):
    """quantize stops right after its --out is prepared (locked, checked, and cleared by --overwrite)."""
    def stop(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr("gift_quant.workflows.stages.load_source", stop)


def quantize(model, out, calib, *extra) -> list[str]:
    return ["quantize", str(model), "--out", str(out), "--calib-data", str(calib), *SMALL, *[str(e) for e in extra]]


def one_error(capsys, rc: int) -> str:
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("gift-quant: error:")]
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------- the cases of the issue


def test_checkpoint_as_model_and_out_is_refused(base, tmp_path, capsys):
    """`quantize CKPT --out CKPT --overwrite` deleted CKPT, then blamed the network."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(base["q"], ckpt)
    before = tree(ckpt)
    line = one_error(capsys, main(quantize(ckpt, ckpt, base["calib"], "--overwrite")))
    assert f"--out {ckpt} is the model folder {ckpt}" in line
    assert tree(ckpt) == before


def test_source_model_inside_out_is_refused(base, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(base["q"], out)
    shutil.copytree(base["src"], out / "models" / "src")
    before = tree(out)
    line = one_error(capsys, main(quantize(out / "models" / "src", out, base["calib"], "--overwrite")))
    assert f"--out {out} contains the model folder" in line
    assert tree(out) == before


@pytest.mark.parametrize("where", ["is", "lies inside"])
def test_out_in_the_model_folder_is_refused(base, tmp_path, capsys, where):
    src = tmp_path / "src"
    shutil.copytree(base["src"], src)
    before = tree(src)
    out = src if where == "is" else src / "q"
    line = one_error(capsys, main(quantize(src, out, base["calib"])))
    assert f"{where} the model folder" in line
    assert tree(src) == before


def test_out_symlinked_to_the_model_folder_is_refused(base, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(base["src"], src)
    (tmp_path / "out").symlink_to(src)
    before = tree(src)
    line = one_error(capsys, main(quantize(src, tmp_path / "out", base["calib"], "--overwrite")))
    assert "is the model folder" in line
    assert tree(src) == before


@pytest.mark.parametrize("what", ["calibration data folder", "recipe"])
def test_out_holding_another_input_is_refused(base, tmp_path, capsys, what):
    out = tmp_path / "out"
    shutil.copytree(base["q"], out)
    extra = []
    if what == "recipe":
        (out / "recipe.yaml").write_text("quantize:\n  bits: 4\n")
        extra, calib, label = ["--recipe", out / "recipe.yaml"], base["calib"], "contains the recipe"
    else:
        calib, label = out, "is the calibration data"
        (out / "more.txt").write_text(corpus(), encoding="utf-8")
    before = tree(out)
    line = one_error(capsys, main(quantize(base["src"], out, calib, "--overwrite", *extra)))
    assert label in line
    assert tree(out) == before


def test_export_into_a_folder_holding_the_checkpoint_is_refused(base, tmp_path, capsys):
    """`gift-quant export XOUT/ck --out XOUT --overwrite` deleted the checkpoint being exported."""
    xout = tmp_path / "xout"
    shutil.copytree(base["x"], xout)
    shutil.copytree(base["q"], xout / "ck")
    before = tree(xout)
    line = one_error(capsys, main(["export", str(xout / "ck"), "--out", str(xout), "--overwrite"]))
    assert f"export folder {xout} contains the checkpoint" in line
    assert tree(xout) == before


def test_export_inside_the_checkpoint_is_refused(base, tmp_path, capsys):
    ck = tmp_path / "ck"
    shutil.copytree(base["q"], ck)
    before = tree(ck)
    line = one_error(capsys, main(["export", str(ck), "--out", str(ck / "exported")]))
    assert "lies inside the checkpoint" in line
    assert tree(ck) == before


@pytest.mark.parametrize("kind", ["output", "export"])
def test_overwrite_refuses_a_folder_with_user_files_and_removes_nothing(base, tmp_path, capsys, stop_after_prepare,
                                                                       kind):
    out = tmp_path / kind
    shutil.copytree(base["q"] if kind == "output" else base["x"], out)
    (out / "notes.txt").write_text("my notes")
    (out / "results").mkdir()
    (out / "results" / "eval.json").write_text("{}")
    before = tree(out)
    argv = (quantize(base["src"], out, base["calib"], "--overwrite") if kind == "output"
            else ["export", str(base["q"]), "--out", str(out), "--overwrite"])
    line = one_error(capsys, main(argv))
    assert "2 file(s) gift-quant did not write (notes.txt, results/eval.json)" in line and "move those away" in line
    assert tree(out) == before


@pytest.mark.parametrize("name", ["tokenizer_backup.json", "vocab.old", "chat_template.mine.jinja"])
def test_a_user_file_named_like_a_tokenizer_file_is_not_taken_for_one(base, tmp_path, capsys, stop_after_prepare,
                                                                     name):
    """The checkpoint names the tokenizer files it copied, so a look-alike the user added is theirs."""
    out = tmp_path / "out"
    shutil.copytree(base["q"], out)
    (out / name).write_text("mine")
    before = tree(out)
    line = one_error(capsys, main(quantize(base["src"], out, base["calib"], "--overwrite")))
    assert f"1 file(s) gift-quant did not write ({name})" in line
    assert tree(out) == before


def test_overwrite_of_a_clean_earlier_output_replaces_it(base, tmp_path, capsys):
    """The positive control: an earlier output of gift-quant's alone is replaced by the new run (bits 4)."""
    out = tmp_path / "out"
    shutil.copytree(base["q"], out)
    assert main(quantize(base["src"], out, base["calib"], "--bits", "4", "--overwrite")) == 0
    assert json.loads((out / "gift_quant_config.json").read_text())["spec"]["bits"] == 4
    assert owned_files(out)[1] == []
    assert main(["export", str(out), "--out", str(tmp_path / "x")]) == 0
    assert main(["export", str(out), "--out", str(tmp_path / "x"), "--overwrite"]) == 0
    record = json.loads((tmp_path / "x" / "gift_quant_export.json").read_text())["files_written"]
    assert sorted(str(p.relative_to(tmp_path / "x")) for p in (tmp_path / "x").rglob("*") if p.is_file()) == record


def test_cleaning_run_keeps_files_gift_quant_did_not_write(base, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(base["q"], out)
    (out / "run" / "blocks" / "my-notes.txt").write_text("mine")
    assert remove_intermediate(out / "run") > 0
    assert (out / "run" / "blocks" / "my-notes.txt").read_text() == "mine"
    assert not list((out / "run" / "blocks").glob("block_*"))


# ---------------------------------------------------------------- property: generated layouts

SPOTS = ["", "run", "run/blocks", "run/quantized", "adapter", "results", "run/recover/state"]
NAMES = ["notes.txt", "eval.json", "model.safetensors.bak", "my config.json", "README", ".hidden", "data.jsonl"]


@st.composite
def layouts(draw):
    return {
        "kind": draw(st.sampled_from(["output", "export", "fresh"])),
        "model_inside": draw(st.booleans()),  # the source model folder lies inside --out
        "calib_inside": draw(st.booleans()),
        "recipe": draw(st.sampled_from([None, "outside", "inside"])),
        "out_is": draw(st.sampled_from(["own", "model", "inside model", "symlink to model"])),
        "user_files": draw(st.lists(st.tuples(st.sampled_from(SPOTS), st.sampled_from(NAMES)), max_size=3,
                                    unique=True)),
        "links": draw(st.lists(st.tuples(st.sampled_from(["", "run", "adapter"]),
                                         st.sampled_from(["model", "calib", "user file", "nowhere"])),
                               max_size=2, unique_by=lambda t: t[0])),
        "command": draw(st.sampled_from(["quantize", "export"])),
        "overwrite": draw(st.booleans()),
    }


def build(base, root: Path, lay: dict) -> tuple[list[str], Path, dict[str, Path]]:
    """The layout on disk under ``root``: (argv, --out, protected paths: inputs and user files)."""
    out = root / "out"
    if lay["kind"] != "fresh":
        shutil.copytree(base["q"] if lay["kind"] == "output" else base["x"], out)
    model = (out / "models" / "src") if lay["model_inside"] and lay["kind"] != "fresh" else root / "src"
    shutil.copytree(base["src"], model)
    calib = (out / "data" / "calib.txt") if lay["calib_inside"] and lay["kind"] != "fresh" else root / "calib.txt"
    calib.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(base["calib"], calib)
    protected = {"model": model, "calib": calib}
    outside_user = root / "elsewhere.txt"
    outside_user.write_text("a user file outside")
    protected["elsewhere"] = outside_user
    if lay["recipe"]:
        recipe = (out if lay["recipe"] == "inside" and lay["kind"] != "fresh" else root) / "recipe.yaml"
        recipe.write_text("quantize:\n  bits: 3\n")
        protected["recipe"] = recipe
    if lay["kind"] != "fresh":
        for i, (spot, name) in enumerate(lay["user_files"]):
            f = out / spot / f"{i}-{name}"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(f"user file {i}")
            protected[f"user {i}"] = f
        for i, (spot, target) in enumerate(lay["links"]):
            link = out / spot / f"link-{i}"
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to({"model": model, "calib": calib, "user file": outside_user,
                             "nowhere": root / "missing"}[target])
            protected[f"link {i}"] = link
    target = {"own": out, "model": model, "inside model": model / "q", "symlink to model": root / "link-out"}[
        lay["out_is"]]
    if lay["out_is"] == "symlink to model":
        target.symlink_to(model)
    extra = ["--overwrite"] if lay["overwrite"] else []
    if lay["command"] == "export":
        argv = ["export", str(base["q"]), "--out", str(target), *extra]
    else:
        argv = quantize(model, target, calib, *extra) + (["--recipe", str(protected["recipe"])]
                                                          if "recipe" in protected else [])
    return argv, target, protected


def snapshot(protected: dict[str, Path]) -> dict[str, object]:
    snap = {}
    for name, p in protected.items():
        if p.is_symlink():
            snap[name] = ("link", os.readlink(p))
        elif p.is_dir():
            snap[name] = tree(p)
        else:
            snap[name] = p.read_bytes()
    return snap


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lay=layouts())
def test_no_input_and_no_user_file_is_ever_removed(base, tmp_path_factory, stop_after_prepare, capsys, lay):
    root = tmp_path_factory.mktemp("layout")
    argv, out, protected = build(base, root, lay)
    before, whole = snapshot(protected), tree(root)
    rc = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    after = snapshot(protected)
    for name, was in before.items():  # a folder may gain files (an export written inside it); none may go
        now = after[name]
        kept = {k: v for k, v in now.items() if k in was} if isinstance(was, dict) else now
        assert kept == was, f"{name}, an input or a user file, was removed or changed: {lay}"
    foreign = any(k.startswith(("user", "link")) for k in protected) or lay["recipe"] == "inside" \
        or lay["model_inside"] or lay["calib_inside"]
    overlaps = lay["out_is"] != "own" or (lay["kind"] != "fresh" and (lay["model_inside"] or lay["calib_inside"]
                                                                      or lay["recipe"] == "inside"))
    if overlaps and lay["command"] == "quantize":
        assert rc == 2 and "--out" in err, (lay, err)
    if rc == 2:
        assert tree(root) == whole, f"a refused command removed something: {lay}"
    if lay["overwrite"] and lay["kind"] != "fresh" and foreign and lay["out_is"] == "own":
        assert rc == 2, f"--overwrite went ahead over files gift-quant did not write: {lay}\n{err}"
    if rc == 130 and lay["overwrite"] and lay["kind"] == "output":  # went ahead: the earlier run's files are gone
        assert out.is_dir() and owned_files(out) == ([], []), lay


# ---------------------------------------------------------------- every command's output is all gift-quant's


@pytest.fixture(scope="module")
def train_file(base):
    f = base["root"] / "train.jsonl"
    f.write_text("".join(json.dumps({"prompt": corpus(10, seed=i), "response": corpus(10, seed=40 + i)}) + "\n"
                         for i in range(30)), encoding="utf-8")
    return f


@pytest.mark.parametrize("command", ["recover post", "recover pre", "finetune"])
def test_every_file_a_command_writes_is_recognised_as_its_own(base, train_file, tmp_path, capsys, command):
    """A finished run kept whole (--keep-intermediate), and the same run stopped mid-training: nothing in --out
    counts as foreign, so --overwrite can replace it; and it then does (the earlier files are gone)."""
    out = tmp_path / "out"
    name, _, variant = command.partition(" ")
    argv = [name, str(base["src"]), "--out", str(out), "--calib-data", str(base["calib"]), "--train-data",
            str(train_file), *SMALL, "--steps", "3", "--save-every", "1", "--batch-size", "2"]
    if name == "recover":
        argv += ["--variant", variant, "--ppl-data", str(base["calib"]), "--ppl-seq-len", "32", "--max-windows", "2",
                 "--keep-intermediate"]
    with pytest.MonkeyPatch.context() as mp:  # stopped at training step 2 (state saved at step 1)
        from gift_quant.recover import loop

        real = loop._Loop.step

        def step(self, s, *a, **k):
            if s == 2:
                raise KeyboardInterrupt
            return real(self, s, *a, **k)
        mp.setattr(loop._Loop, "step", step)
        assert main(argv) == 130
    assert owned_files(out)[1] == [], owned_files(out)[1]
    assert main(argv) == 0, capsys.readouterr().err
    ours, foreign = owned_files(out)
    assert foreign == [] and ours
    if name == "recover":
        assert (out / "run" / ("quantized" if variant == "post" else "trained")).is_dir()
    started = json.loads((out / "run" / "run.json").read_text())["started"]  # a resume keeps it; a new run not
    assert main([*argv, "--overwrite"]) == 0
    assert json.loads((out / "run" / "run.json").read_text())["started"] > started
