"""Bad input -> one line ``gift-quant: error: ...`` naming the problem, exit status 2, no traceback.

A few cases run the CLI as a real subprocess (started together, they overlap); the rest call
``gift_quant.cli.app.main`` in-process. Positive controls run the same commands on valid input.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import corpus, make_model_dir

from gift_quant.cli.app import main

pytestmark = pytest.mark.usefixtures("torch_single_thread")

SMALL = ["--calib-samples", "4", "--seq-len", "32", "--no-progress"]
NAN_PARAM = "model.layers.1.mlp.down_proj.weight"


# ---------------------------------------------------------------- helpers


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for f in src.glob("tokenizer*"):
        shutil.copy2(f, dst / f.name)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"<dir>")
            for p in sorted(folder.rglob("*"))}


def _error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("gift-quant: error:")]
    assert len(lines) == 1, err
    return lines[0]


def assert_cli_error(rc: int, err: str, *needles: str) -> str:
    """Exit 2, exactly one error line that contains every needle, no traceback."""
    assert rc == 2, err
    line = _error_line(err)
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def run_in_process(capsys, args: list[str]) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Model folders and data files shared by the module (nothing here is modified by the tests)."""
    from transformers import AutoModelForCausalLM, BartConfig, BertConfig, BertForMaskedLM, T5Config

    root = tmp_path_factory.mktemp("cli")
    w = {"root": root}
    w["llama"] = make_model_dir("llama", root / "llama")
    w["calib"] = root / "calib.txt"
    w["calib"].write_text(corpus(), encoding="utf-8")
    w["empty"] = root / "empty.txt"
    w["empty"].write_text("", encoding="utf-8")
    w["short"] = root / "short.txt"
    w["short"].write_text("the model", encoding="utf-8")

    # one NaN in one weight, saved as an ordinary model folder
    nan_dir = root / "nan"
    nan_dir.mkdir()
    model = AutoModelForCausalLM.from_pretrained(w["llama"])
    with torch.no_grad():
        model.get_parameter(NAN_PARAM)[3, 5] = float("nan")
    model.save_pretrained(nan_dir)
    _copy_tokenizer(w["llama"], nan_dir)
    w["nan"] = nan_dir

    # not causal LMs: encoder-decoder (t5: no causal-LM class; bart: has one) and encoder-only (bert)
    small = {"vocab_size": 320}
    for name, cfg in {
        "t5": T5Config(d_model=32, d_kv=8, num_layers=1, num_heads=2, d_ff=64, **small),
        "bart": BartConfig(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                           decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, **small),
    }.items():
        (root / name).mkdir()
        cfg.save_pretrained(root / name)
        _copy_tokenizer(w["llama"], root / name)
        w[name] = root / name
    bert_cfg = BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                          **small)
    BertForMaskedLM(bert_cfg).save_pretrained(root / "bert")
    _copy_tokenizer(w["llama"], root / "bert")
    w["bert"] = root / "bert"

    w["no_config"] = root / "no_config"
    w["no_config"].mkdir()
    _copy_tokenizer(w["llama"], w["no_config"])

    w["config_only"] = root / "config_only"  # config + tokenizer, no weight files
    w["config_only"].mkdir()
    shutil.copy2(w["llama"] / "config.json", w["config_only"] / "config.json")
    _copy_tokenizer(w["llama"], w["config_only"])

    w["bad_json"] = root / "bad_json"
    w["bad_json"].mkdir()
    (w["bad_json"] / "config.json").write_text("{not json", encoding="utf-8")
    _copy_tokenizer(w["llama"], w["bad_json"])
    return w


def quantize_args(w, model, out, *extra):
    return ["quantize", str(model), "--out", str(out), "--calib-data", str(w["calib"]), *SMALL, *extra]


@pytest.fixture(scope="module")
def subprocess_runs(world):
    """Real ``python -m gift_quant.cli`` runs, started together so their start-up costs overlap."""
    w, root = world, world["root"]
    cases = {
        "missing_model": quantize_args(w, root / "no_such_model", root / "sp_out1"),
        "nan_weight": quantize_args(w, w["nan"], root / "sp_out2"),
        "eval_ok": ["eval", str(w["llama"]), "--ppl-data", str(w["calib"]), "--seq-len", "32",
                    "--max-windows", "2", "--no-progress"],
    }
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               GIFT_QUANT_CACHE=str(root / "cache"), OMP_NUM_THREADS="1")
    procs = {k: subprocess.Popen([sys.executable, "-m", "gift_quant.cli", *args], cwd=root, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k, args in cases.items()}
    results = {}
    for k, p in procs.items():
        out, err = p.communicate(timeout=180)
        results[k] = (p.returncode, out, err)
    return results


# ---------------------------------------------------------------- real subprocesses


def test_subprocess_missing_model_folder(subprocess_runs, world):
    rc, _, err = subprocess_runs["missing_model"]
    assert_cli_error(rc, err, "no_such_model", "does not exist")
    assert not (world["root"] / "sp_out1").exists()


def test_subprocess_nan_weight_names_the_parameter(subprocess_runs, world):
    rc, _, err = subprocess_runs["nan_weight"]
    assert_cli_error(rc, err, NAN_PARAM, "NaN")
    assert not (world["root"] / "sp_out2").exists()


def test_subprocess_positive_control(subprocess_runs):
    rc, out, err = subprocess_runs["eval_ok"]
    assert rc == 0, err
    assert "Traceback" not in err and "gift-quant: error" not in err
    assert "perplexity" in out and "full-precision model" in out


# ---------------------------------------------------------------- model folders (in-process)


def test_positive_control_in_process(world, capsys, tmp_path):
    rc, out, err = run_in_process(capsys, quantize_args(world, world["llama"], tmp_path / "out"))
    assert rc == 0, err
    assert "wrote" in out and "gift-quant: error" not in err
    rc, out, err = run_in_process(capsys, ["eval", tmp_path / "out", "--ppl-data", world["calib"],
                                           "--seq-len", "32", "--max-windows", "2", "--no-progress"])
    assert rc == 0, err
    assert "perplexity" in out


def test_missing_model_folder(world, capsys, tmp_path):
    rc, _, err = run_in_process(capsys, quantize_args(world, tmp_path / "ghost", tmp_path / "out"))
    assert_cli_error(rc, err, "ghost", "does not exist")
    assert not (tmp_path / "out").exists()


def test_model_path_is_a_file(world, capsys, tmp_path):
    rc, _, err = run_in_process(capsys, quantize_args(world, world["calib"], tmp_path / "out"))
    assert_cli_error(rc, err, "calib.txt", "is a file")


def test_folder_without_config(world, capsys, tmp_path):
    rc, _, err = run_in_process(capsys, quantize_args(world, world["no_config"], tmp_path / "out"))
    assert_cli_error(rc, err, "no_config", "config.json")
    assert not (tmp_path / "out").exists()


def test_unreadable_config(world, capsys, tmp_path):
    rc, _, err = run_in_process(capsys, quantize_args(world, world["bad_json"], tmp_path / "out"))
    assert_cli_error(rc, err, "bad_json", "config.json")


def test_folder_without_weights(world, capsys, tmp_path):
    rc, _, err = run_in_process(capsys, quantize_args(world, world["config_only"], tmp_path / "out"))
    assert_cli_error(rc, err, "config_only")


def test_encoder_decoder_without_causal_class_is_refused(world, capsys, tmp_path):
    rc, _, err = run_in_process(capsys, quantize_args(world, world["t5"], tmp_path / "out"))
    assert_cli_error(rc, err, "'t5'", "not a causal LM")
    assert not (tmp_path / "out").exists()


def test_encoder_decoder_with_causal_class_is_refused(world, capsys, tmp_path):
    rc, _, err = run_in_process(capsys, quantize_args(world, world["bart"], tmp_path / "out"))
    assert_cli_error(rc, err, "bart", "encoder-decoder")
    assert not (tmp_path / "out").exists()


def test_encoder_only_is_refused(world, capsys, tmp_path, monkeypatch):
    def accepted(*_a, **_k):
        raise AssertionError("an encoder-only model reached quantization")

    monkeypatch.setattr("gift_quant.workflows.stages.quantize_model", accepted)
    rc, _, err = run_in_process(capsys, quantize_args(world, world["bert"], tmp_path / "out"))
    line = assert_cli_error(rc, err, "bert")
    assert "encoder" in line or "decoder-only" in line


# ---------------------------------------------------------------- settings (in-process)


def test_unsupported_bits(world, capsys, tmp_path):
    rc, _, err = run_in_process(capsys, quantize_args(world, world["llama"], tmp_path / "out", "--bits", "5"))
    assert_cli_error(rc, err, "--bits 5", "2, 3, 4, 8")
    assert not (tmp_path / "out").exists()


def test_salient_count_not_below_in_features_names_the_layer(world, capsys, tmp_path):
    rc, _, err = run_in_process(capsys, quantize_args(world, world["llama"], tmp_path / "out", "--salient", "64"))
    assert_cli_error(rc, err, "salient count 64", "in_features 64", "model.layers.0.self_attn.q_proj")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, needles", [
    (["--salient-fraction", "1.0"], ["--salient-fraction", "1.0"]),
    (["--salient", "-1"], ["--salient", "-1"]),
    (["--metric", "bogus"], ["'bogus'"]),
    (["--dtype", "float64"], ["'float64'"]),
    (["--damp", "1.5"], ["damp", "1.5"]),
    (["--calib-samples", "0"], ["--calib-samples"]),
])
def test_bad_settings(world, capsys, tmp_path, extra, needles):
    rc, _, err = run_in_process(capsys, quantize_args(world, world["llama"], tmp_path / "out", *extra))
    assert_cli_error(rc, err, *needles)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu(world, capsys, tmp_path):
    rc, _, err = run_in_process(capsys, quantize_args(world, world["llama"], tmp_path / "out", "--device", "cuda"))
    assert_cli_error(rc, err, "--device cuda")


# ---------------------------------------------------------------- calibration data (in-process)


def test_empty_calibration_file(world, capsys, tmp_path):
    args = quantize_args(world, world["llama"], tmp_path / "out", "--calib-data", world["empty"])
    rc, _, err = run_in_process(capsys, args)
    assert_cli_error(rc, err, "empty.txt", "no text")
    assert not (tmp_path / "out").exists()


def test_calibration_too_short_for_seq_len(world, capsys, tmp_path):
    args = quantize_args(world, world["llama"], tmp_path / "out", "--calib-data", world["short"])
    rc, _, err = run_in_process(capsys, args)
    assert_cli_error(rc, err, "short.txt", "too short", "--seq-len 32")
    assert not (tmp_path / "out").exists()


def test_missing_calibration_file(world, capsys, tmp_path):
    args = quantize_args(world, world["llama"], tmp_path / "out", "--calib-data", tmp_path / "nope.jsonl")
    rc, _, err = run_in_process(capsys, args)
    assert_cli_error(rc, err, "nope.jsonl", "does not exist")


def test_invalid_jsonl_calibration_names_line(world, capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{broken\n', encoding="utf-8")
    rc, _, err = run_in_process(capsys, quantize_args(world, world["llama"], tmp_path / "out", "--calib-data", bad))
    assert_cli_error(rc, err, f"{bad}:2", "not valid JSON")


# ---------------------------------------------------------------- output folder (in-process)


@pytest.mark.parametrize("overwrite", [False, True])
def test_foreign_output_folder_is_refused_and_untouched(world, capsys, tmp_path, overwrite):
    out = tmp_path / "precious"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("my thesis", encoding="utf-8")
    (out / "sub" / "data.bin").write_bytes(b"\x00\x01\x02")
    before = _snapshot(out)
    extra = ["--overwrite"] if overwrite else []
    rc, _, err = run_in_process(capsys, quantize_args(world, world["llama"], out, *extra))
    assert_cli_error(rc, err, "precious", "not a gift-quant output")
    assert _snapshot(out) == before


def test_output_path_is_a_file(world, capsys, tmp_path):
    out = tmp_path / "out.txt"
    out.write_text("keep", encoding="utf-8")
    rc, _, err = run_in_process(capsys, quantize_args(world, world["llama"], out))
    assert_cli_error(rc, err, "out.txt", "is a file")
    assert out.read_text() == "keep"


# ---------------------------------------------------------------- recipes (in-process)


def test_recipe_unknown_key(world, capsys, tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("quantize:\n  bitz: 4\n", encoding="utf-8")
    rc, _, err = run_in_process(capsys, quantize_args(world, world["llama"], tmp_path / "out", "--recipe", recipe))
    assert_cli_error(rc, err, "typo.yaml", "'bitz'")


def test_recipe_unknown_section(world, capsys, tmp_path):
    recipe = tmp_path / "section.yaml"
    recipe.write_text("quantise:\n  bits: 4\n", encoding="utf-8")
    rc, _, err = run_in_process(capsys, quantize_args(world, world["llama"], tmp_path / "out", "--recipe", recipe))
    assert_cli_error(rc, err, "section.yaml", "'quantise'")


def test_recipe_invalid_yaml(world, capsys, tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("quantize: [bits: 4\n", encoding="utf-8")
    rc, _, err = run_in_process(capsys, quantize_args(world, world["llama"], tmp_path / "out", "--recipe", recipe))
    assert_cli_error(rc, err, "broken.yaml", "not valid YAML")


def test_recipe_bad_value(world, capsys, tmp_path):
    recipe = tmp_path / "bits.yaml"
    recipe.write_text("quantize:\n  bits: 7\n", encoding="utf-8")
    rc, _, err = run_in_process(capsys, quantize_args(world, world["llama"], tmp_path / "out", "--recipe", recipe))
    assert_cli_error(rc, err, "bits 7")


def test_missing_recipe(world, capsys, tmp_path):
    args = quantize_args(world, world["llama"], tmp_path / "out", "--recipe", tmp_path / "absent.yaml")
    rc, _, err = run_in_process(capsys, args)
    assert_cli_error(rc, err, "absent.yaml", "does not exist")


def test_recipe_positive_control(world, capsys, tmp_path, monkeypatch):
    """A valid recipe is applied, and flags given on the command line override it."""
    seen = []

    def fake_run_quantize(model_dir, out, cfg, **_kw):
        seen.append(cfg)
        return {"out": str(out), "effective_bits": 4.0, "mean_relative_error": 0.0, "total_seconds": 0.0}

    monkeypatch.setattr("gift_quant.workflows.commands.run_quantize", fake_run_quantize)
    recipe = tmp_path / "ok.yaml"
    recipe.write_text("description: fine\nquantize:\n  bits: 4\n  salient: 2\n  clip: minmax\n",
                      encoding="utf-8")
    rc, out, err = run_in_process(capsys, quantize_args(world, world["llama"], tmp_path / "out", "--recipe", recipe))
    assert rc == 0, err
    assert "4-bit" in out
    rc, out, err = run_in_process(capsys, quantize_args(world, world["llama"], tmp_path / "out", "--recipe", recipe,
                                                        "--bits", "8"))
    assert rc == 0, err
    assert [(c.bits, c.salient, c.clip, c.seq_len) for c in seen] == [(4, 2, "minmax", 32), (8, 2, "minmax", 32)]


# ---------------------------------------------------------------- eval (in-process)


def test_eval_missing_path(world, capsys, tmp_path):
    rc, _, err = run_in_process(capsys, ["eval", tmp_path / "nothing_here", "--ppl-data", world["calib"],
                                         "--no-progress"])
    assert_cli_error(rc, err, "nothing_here", "does not exist")


def test_eval_text_too_short(world, capsys):
    rc, _, err = run_in_process(capsys, ["eval", world["llama"], "--ppl-data", world["short"], "--seq-len", "32",
                                         "--no-progress"])
    assert_cli_error(rc, err, "short.txt", "too short")


@pytest.mark.parametrize("key,value,message", [
    ("act_order", "false", "quantize.act_order must be bool, got 'false'"),
    ("sym", "no", "quantize.sym must be bool, got 'no'"),
    ("bits", 3.5, "quantize.bits must be int, got 3.5"),
    ("calib_batch_size", 0, "--calib-batch-size must be > 0"),
])
def test_recipe_values_are_type_checked(world, capsys, tmp_path, key, value, message):
    import yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"quantize": {key: value}}))
    rc, _, err = run_in_process(capsys, quantize_args(world, world["llama"], tmp_path / "out", "--recipe", str(recipe)))
    assert_cli_error(rc, err, message)
    assert not (tmp_path / "out").exists()


def test_group_size_that_does_not_divide_a_layer_is_refused_before_work(world, capsys, tmp_path):
    rc, _, err = run_in_process(capsys, quantize_args(world, world["llama"], tmp_path / "out", "--group-size", "48"))
    assert_cli_error(rc, err, "--group-size 48 does not divide", "model.layers.0.")


# ---------------------------------------------------------------- interrupts at start-up (#22 req 7)

# Injected where no timing can miss it: a sitecustomize on PYTHONPATH raises KeyboardInterrupt (what Python's
# SIGINT handler raises) when the named module is first imported by the real command.
_INTERRUPT_AT = """
import sys

class _Stop:
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            sys.meta_path.remove(self)
            raise KeyboardInterrupt
        return None

sys.meta_path.insert(0, _Stop())
"""


def _env(world, extra_path: Path | None = None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               GIFT_QUANT_CACHE=str(world["root"] / "cache"))
    paths = [str(extra_path)] if extra_path else []
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return env


@pytest.mark.parametrize("entry, module", [
    ("module", "gift_quant.cli.app"), ("module", "yaml"), ("module", "gift_quant.config.settings"),
    ("module", "transformers"), ("console script", "gift_quant.util.cpu_policy"), ("console script", "torch")])
def test_interrupt_during_start_up_imports_is_one_line_and_130(world, tmp_path, module, entry):
    (tmp_path / "sitecustomize.py").write_text(_INTERRUPT_AT.format(module=module))
    argv = quantize_args(world, world["llama"], tmp_path / "out")
    cmd = ([sys.executable, "-m", "gift_quant.cli", *argv] if entry == "module" else
           [sys.executable, "-c", "import sys; from gift_quant.cli import main; sys.exit(main())", *argv])
    proc = subprocess.run(cmd, env=_env(world, tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("gift-quant: interrupted")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_real_sigint_at_any_moment_is_one_line_and_130(world, tmp_path):
    """The real signal, delivered at several moments of a quantize run (start-up to quantization)."""
    import signal
    import time

    procs = []
    for i, delay in enumerate((0.3, 1.0, 2.5, 5.0)):
        argv = quantize_args(world, world["llama"], tmp_path / f"out{i}")
        p = subprocess.Popen([sys.executable, "-m", "gift_quant.cli", *argv], env=_env(world), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        procs.append((delay, p))
    start = time.monotonic()
    for delay, p in procs:
        time.sleep(max(0.0, start + delay - time.monotonic()))
        p.send_signal(signal.SIGINT)
    for delay, p in procs:
        _, err = p.communicate(timeout=300)
        if p.returncode == 0:  # finished before the signal: nothing to check at this delay
            continue
        assert p.returncode == 130, (delay, err[-2000:])
        assert "Traceback" not in err, (delay, err[-2000:])
        assert len([ln for ln in err.splitlines() if ln.startswith("gift-quant: interrupted")]) == 1, err[-2000:]


def test_a_stop_that_lands_after_the_command_finished_does_not_turn_it_into_a_failure():
    """A Ctrl-C or SIGTERM that arrives once the command has its exit code (while Python shuts down) used to kill
    the process silently with -SIGINT: the command's exit code stands and nothing is printed."""

    script = ("import os, signal, sys\n"
              "sys.argv[0] = os.path.join(os.path.dirname(sys.executable), 'gift-quant')  # as the console script\n"
              "import gift_quant.cli.app as app\n"
              "from gift_quant import cli\n"
              "app.main = lambda argv=None: 0\n"
              "code = cli.main([])\n"
              "os.kill(os.getpid(), signal.SIGINT)\n"
              "os.kill(os.getpid(), signal.SIGTERM)\n"
              "sys.exit(code)\n")
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (p.returncode, p.stderr) == (0, ""), (p.returncode, p.stderr[-2000:])


def test_the_entry_point_called_from_python_leaves_the_callers_signal_handlers(monkeypatch):
    """Only the command's own process ignores late stops: a Python caller keeps its Ctrl-C (and its children,
    which would inherit an ignored SIGINT, keep theirs)."""
    import signal

    import gift_quant.cli.app as app
    from gift_quant import cli

    monkeypatch.setattr(app, "main", lambda argv=None: 0)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    assert cli.main([]) == 0
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.parametrize("stop, code, line", [(KeyboardInterrupt, 130, "gift-quant: interrupted; rerun"),
                                              ("terminated", 143, "gift-quant: terminated (SIGTERM); rerun")])
def test_a_stop_between_the_commands_handlers_and_its_exit_is_one_line(monkeypatch, capsys, stop, code, line):
    """The window after app.main's own handlers returned: the entry point still ends in the one line."""
    import signal

    import gift_quant.cli.app as app
    from gift_quant import cli

    exc = app.Terminated if stop == "terminated" else stop

    def stops_late(argv=None):
        raise exc()

    monkeypatch.setattr(app, "main", stops_late)
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert cli.main([]) == code
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
    err = capsys.readouterr().err
    assert err.splitlines() == [next(ln for ln in err.splitlines() if ln.startswith(line))]


def test_an_unanticipated_library_error_is_one_line(world, capsys, tmp_path, monkeypatch):
    """The safety net under every input check: an exception nothing anticipated is one line naming its type and
    place (exit 1, not an input error's 2); GIFT_QUANT_TRACEBACK=1 shows the traceback for a bug report."""
    def fails(*a, **k):
        raise ZeroDivisionError("float division by zero")

    monkeypatch.setattr("gift_quant.workflows.stages.calibration_set", fails)
    args = quantize_args(world, world["llama"], tmp_path / "out")
    rc, _, err = run_in_process(capsys, args)
    line = _error_line(err)
    assert rc == 1 and "unexpected ZeroDivisionError in test_cli_errors.py:" in line
    assert "float division by zero" in line and "GIFT_QUANT_TRACEBACK=1" in line
    monkeypatch.setenv("GIFT_QUANT_TRACEBACK", "1")
    with pytest.raises(ZeroDivisionError):
        main([str(a) for a in args])
