"""Probe the block stage on the first blocks of the default model: held-out block loss per trainable set.

Quantizes the first ``--blocks`` decoder blocks of the default model (3-bit per-row GPTQ with salient
columns, the default calibration draw) with block-wise reconstruction v2 under each configuration, and
prints, per block, the relative squared error of the block's outputs on the calibration batches held
out of training (before and after, and along the way), the training loss, and how much of the grid
moved. Cheap enough to run before a long study; it says nothing about perplexity.

    python tools/blockwise_probe.py --blocks 2 --steps 32 \
        --config blockwise_train=salient --config blockwise_train=salient,scales,rounding/noise=normal

A configuration is ``key=value`` pairs of RecoverConfig fields joined by ``/``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_config(text: str) -> dict:
    from gift_quant.config.settings import RecoverConfig

    types = {f: t for f, t in RecoverConfig.__annotations__.items()}
    out = {}
    for pair in text.split("/"):
        key, _, value = pair.partition("=")
        out[key] = float(value) if "float" in str(types.get(key, "")) else value
    return out


def probe(config: dict, blocks: int, steps: int, calib_samples: int) -> list[dict]:
    import torch

    from gift_quant.config.settings import QuantizeConfig, RecoverConfig
    from gift_quant.model.arch import find_blocks
    from gift_quant.model.loading import load_model, load_tokenizer, resolve_model_dir
    from gift_quant.quant.engine import quantize_model
    from gift_quant.workflows.stages import blockwise_reconstructor, calibration_set

    src = resolve_model_dir(None)
    qcfg = QuantizeConfig(bits=3, calib_samples=calib_samples)
    windows = calibration_set(load_tokenizer(src), qcfg)
    rcfg = RecoverConfig(**{"steps": 0, "blockwise_steps": steps, "noise": "none", **config})
    model = load_model(src)
    prefix, layers = find_blocks(model)
    del layers[blocks:]  # the first blocks only: the engine finds the shortened ModuleList by the config's count
    model.config.num_hidden_layers = blocks
    report = quantize_model(model, windows, qcfg, torch.device("cpu"), None, progress=False,
                            reconstruct=blockwise_reconstructor(rcfg, rcfg.blockwise_noise_spec(qcfg.bits)))
    seen = {}
    for name, m in report.layers.items():
        seen.setdefault(name.split(".")[len(prefix.split("."))], m["blockwise"])
    return list(seen.values())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--config", action="append", required=True, help="RecoverConfig key=value pairs joined by /")
    p.add_argument("--json", default=None, help="write every record here")
    a = p.parse_args(argv)
    rows = []
    print("| config | block | held-out before -> after (curve) | train loss first -> last | codes changed "
          "| mean scale shift | s |")
    print("|---|---|---|---|---|---|---|")
    for text in a.config:
        t0 = time.perf_counter()
        recs = probe(parse_config(text), a.blocks, a.steps, a.calib_samples)
        for i, r in enumerate(recs):
            curve = ", ".join(f"{v:.4f}" for _, v in r["holdout_curve"])
            print(f"| {text} | {i} | {r['holdout_before']:.4f} -> {r['holdout_after']:.4f} ({curve}) | "
                  f"{r['first_loss']:.4f} -> {r['last_loss']:.4f} | {100 * r['codes_changed']:.1f} % | "
                  f"{100 * r['scale_shift']:.1f} % | {r['seconds']:.0f} |", flush=True)
            rows.append({"config": text, "block": i, **r})
        print(f"<!-- {text}: {time.perf_counter() - t0:.0f} s with GPTQ -->", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"steps": a.steps, "blocks": a.blocks, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
