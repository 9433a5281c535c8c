"""Data-parallel recovery: 2 CPU processes (torchrun, gloo) train the gift_ parameters to what 1 process
with the same global batch trains them to, with and without noise.

The same global batch: 2 processes x grad_accum 2 x batch 2 == 1 process x grad_accum 4 x batch 2. The
2-process run uses accumulation too, so the ``no_sync`` path is exercised. This file is also the
per-rank driver (``python tests/test_recover_distributed.py driver ...``), so no helper script is
written anywhere.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny import QUIET_CPU

HERE = Path(__file__).resolve()
# name -> (noise, loss): the KD run distils from the tiny source model on every rank's micro-batch
RUNS = {"none": ("none", "ce"), "normal": ("normal", "ce"), "normal-kd": ("normal", "kd")}
STEPS, BATCH, LR = 4, 2, 1e-2
TIMEOUT = 240


# ------------------------------------------------------------------------------ driver (per rank)


def _driver(argv: list[str]) -> None:
    import argparse

    from safetensors.torch import load_file, save_file

    from gift_quant.config.settings import NoiseSpec, RecoverConfig
    from gift_quant.packed.checkpoint import load
    from gift_quant.recover.loop import train
    from gift_quant.recover.model import prepare_quantized, trainable_state

    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--grad-accum", type=int, required=True)
    ap.add_argument("--teacher", required=True)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    data = load_file(a.data)
    out = Path(a.out)
    from gift_quant.model.loading import load_model
    from gift_quant.recover.objective import Teacher

    for name, (noise, loss) in RUNS.items():
        model = prepare_quantized(load(a.ckpt), noise=NoiseSpec(noise, 4), seed=0)
        init = trainable_state(model)
        # fp32 pinned: this compares process layouts, not precisions (tests/test_precision.py does those)
        settings = RecoverConfig(loss=loss, steps=STEPS, lr=LR, batch_size=BATCH, grad_accum=a.grad_accum,
                                 warmup_ratio=0.0, save_every=STEPS, seed=0, precision="fp32")
        teacher = Teacher(load_model(Path(a.teacher)), "cpu") if loss == "kd" else None
        summary = train(model, data["ids"], data["labels"], settings, out / f"run-{name}", device="cpu",
                        progress=False, teacher=teacher)
        noise = name
        rank = int(os.environ.get("RANK", "0"))
        if rank == 0:
            save_file(trainable_state(model), str(out / f"{noise}.safetensors"))
            save_file(init, str(out / f"{noise}-init.safetensors"))
            (out / f"{noise}.json").write_text(json.dumps({"world_size": summary["world_size"],
                                                           "history": summary["history"]}))


# ------------------------------------------------------------------------------ test


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from safetensors.torch import save_file
    from tiny import corpus, make_model_dir

    from gift_quant.config.settings import QuantizeConfig
    from gift_quant.workflows.commands import quantize_to_checkpoint

    root = tmp_path_factory.mktemp("ddp")
    src = make_model_dir("llama", root / "llama")
    calib = root / "calib.txt"
    calib.write_text(corpus(3000, seed=1), encoding="utf-8")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        quantize_to_checkpoint(str(src), root / "ckpt", QuantizeConfig(
            bits=3, salient=4, calib_data=str(calib), calib_samples=4, seq_len=32), runtime=QUIET_CPU)
    finally:
        torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (12, 24), generator=g)  # 12 windows: 4 steps x 8 rows wrap into a 2nd epoch
    labels = ids.clone()
    labels[:, :6] = -100  # a masked "prompt"
    save_file({"ids": ids, "labels": labels}, str(root / "data.safetensors"))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    common = ["driver", "--ckpt", str(root / "ckpt"), "--data", str(root / "data.safetensors"),
              "--teacher", str(src)]
    outs = {1: root / "world1", 2: root / "world2"}
    for d in outs.values():
        d.mkdir()
    cmds = {
        # --standalone: torchrun picks a free local port itself (no race with a port probed here)
        2: [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(HERE),
            *common, "--out", str(outs[2]), "--grad-accum", "2"],
        1: [sys.executable, str(HERE), *common, "--out", str(outs[1]), "--grad-accum", "4"],
    }
    t0 = time.perf_counter()
    # both at once: the 1-process run hides in the 2-process run's start-up. Each in its own session, so
    # that a hung torchrun is stopped together with its workers.
    procs = {w: subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 start_new_session=True) for w, c in cmds.items()}
    logs = {}
    try:
        for w, p in procs.items():
            logs[w] = p.communicate(timeout=TIMEOUT)[0]
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    for w, p in procs.items():
        assert p.returncode == 0, f"{w}-process run failed:\n{logs[w][-4000:]}"
    return {"out": outs, "seconds": time.perf_counter() - t0, "logs": logs}


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.parametrize("noise", list(RUNS))
def test_two_processes_match_one(runs, noise):
    one, two = runs["out"][1], runs["out"][2]
    meta1 = json.loads((one / f"{noise}.json").read_text())
    meta2 = json.loads((two / f"{noise}.json").read_text())
    assert meta1["world_size"] == 1 and meta2["world_size"] == 2, "torchrun did not give a 2-process group"
    a, b, init = _load(one / f"{noise}.safetensors"), _load(two / f"{noise}.safetensors"), \
        _load(one / f"{noise}-init.safetensors")
    assert set(a) == set(b) == set(init) and a and all(k.endswith("gift_salient") for k in a)
    for k in a:
        assert torch.equal(init[k], _load(two / f"{noise}-init.safetensors")[k])
        moved = (a[k] - init[k]).abs().max()
        assert moved > 100 * 1e-6, f"{k} barely trained ({moved:.2e}); the comparison would be vacuous"
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    # the reported (all-reduced) loss is the same global-batch loss
    l1 = [h["loss"] for h in meta1["history"]]
    l2 = [h["loss"] for h in meta2["history"]]
    assert len(l1) == len(l2) == STEPS
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=1e-5, atol=1e-6)


def test_noise_changes_the_result(runs):
    """Guards the test above: noise really perturbs training here, so matching under noise is not trivial."""
    a, b = _load(runs["out"][1] / "none.safetensors"), _load(runs["out"][1] / "normal.safetensors")
    assert any(not torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


if __name__ == "__main__" and sys.argv[1:2] == ["driver"]:
    _driver(sys.argv[2:])
