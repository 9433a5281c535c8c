"""The full-precision perplexity is cached per (source fingerprint, evaluation tokens, dtype, device), checked
by sha256 before use, recomputed when damaged, and a second ``recover`` of the same source reuses it."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import QUIET_CPU, corpus, make_model_dir

from gift_quant.config.settings import EvalConfig, QuantizeConfig, RecoverConfig
from gift_quant.eval import reference_cache
from gift_quant.eval.perplexity import perplexity
from gift_quant.model.loading import load_model
from gift_quant.util.files import CACHE_ENV
from gift_quant.workflows.commands import run_recover


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / "perplexity"


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = tmp_path_factory.mktemp("refcache")
    (root / "text.txt").write_text(corpus(3000, seed=2))
    (root / "train.txt").write_text(corpus(2000, seed=3))
    return make_model_dir("llama", root / "src"), root


def test_hit_miss_and_damaged_entry(src, cache):
    path, _ = src
    windows = torch.randint(0, 300, (3, 16), generator=torch.Generator().manual_seed(0))
    calls = []

    def loader():
        calls.append(1)
        return load_model(path)

    want = perplexity(load_model(path), windows, progress=False)["perplexity"]
    first = reference_cache.cached_perplexity(loader, "fp-a", windows, torch.float32, torch.device("cpu"), False)
    assert first["cached"] is None and first["perplexity"] == want and len(calls) == 1
    second = reference_cache.cached_perplexity(loader, "fp-a", windows, torch.float32, torch.device("cpu"), False)
    assert second["cached"] and second["perplexity"] == want and len(calls) == 1  # nothing loaded on a hit
    # another model, other tokens or another dtype: a different entry
    for args in (("fp-b", windows, torch.float32), ("fp-a", windows[:2], torch.float32),
                 ("fp-a", windows, torch.bfloat16)):
        assert reference_cache.cache_key(*args, torch.device("cpu")) != reference_cache.cache_key(
            "fp-a", windows, torch.float32, torch.device("cpu"))
    # a damaged entry (its sha256 no longer matches) is recomputed, not believed
    entry = next(cache.glob("*.json"))
    doc = json.loads(entry.read_text())
    doc["perplexity"] = 1.0
    entry.write_text(json.dumps(doc))
    third = reference_cache.cached_perplexity(loader, "fp-a", windows, torch.float32, torch.device("cpu"), False)
    assert third["cached"] is None and third["perplexity"] == want and len(calls) == 2
    assert reference_cache.cached_perplexity(loader, "fp-a", windows, torch.float32, torch.device("cpu"),
                                             False)["cached"]


def test_second_recover_of_the_same_source_reuses_it(src, cache, tmp_path, capsys):
    path, root = src
    text = str(root / "text.txt")
    qcfg = QuantizeConfig(bits=3, salient=4, calib_data=text, calib_samples=4, seq_len=32)
    rcfg = RecoverConfig(loss="ce", steps=1, batch_size=2, seq_len=32, train_data=str(root / "train.txt"),
                         eval_every=0)
    ecfg = EvalConfig(ppl_data=text, seq_len=32, max_windows=3)
    a = run_recover(str(path), tmp_path / "a", qcfg, rcfg, ecfg, runtime=QUIET_CPU)
    assert "cached from an earlier run" not in capsys.readouterr().err
    b = run_recover(str(path), tmp_path / "b", qcfg, rcfg, ecfg, runtime=QUIET_CPU)
    assert "ppl full precision" in capsys.readouterr().err
    stages = json.loads((tmp_path / "b" / "run" / "stages.json").read_text())
    assert stages["eval_fp"]["cached"] and b["ppl_fp"] == a["ppl_fp"]
    # other evaluation settings: computed, not taken from the other entry
    c = run_recover(str(path), tmp_path / "c", qcfg, rcfg, EvalConfig(ppl_data=text, seq_len=32, max_windows=2),
                    runtime=QUIET_CPU)
    assert json.loads((tmp_path / "c" / "run" / "stages.json").read_text())["eval_fp"]["cached"] is None
    assert c["ppl_fp"] != a["ppl_fp"]
