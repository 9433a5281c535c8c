#!/usr/bin/env python
"""Benchmark: gift-quant's GPTQ with K = 0 salient columns (plain GPTQ) against GPTQModel's GPTQ.

Both tools quantize the same model (default: the embedded SmolLM2-135M-Instruct) on the identical
calibration windows (``gift_quant.workflows.stages.calibration_set``) with matched settings: symmetric grid,
group size 64 (or -1 = per row; gift-quant takes only sizes that divide every linear's inputs, which 128
does not on SmolLM2's 576 columns), no act-order (GPTQModel's ``desc_act`` and its default
``act_group_aware`` both off), damp 0.01, block size 128, true-sequential, fp32 weights and forward.
Clip: gift-quant's ``clip="minmax"`` matches GPTQModel's default ``mse=0``; gift-quant's
``clip="mse"`` (grid search, 100 steps, shrink to 0.2, |err|^2) matches GPTQModel's ``mse=2.0``
(same search, 80 steps to 0.21). Each tool is run at both clip settings; like-for-like pairs are
compared.

Measured per (bits, clip):

1. layer reconstruction error of every quantized linear on the same calibration inputs:
   ``tr((W-Q) H (W-Q)^T) / tr(W H W^T)`` with ``H = X^T X`` from the *full-precision* model's
   inputs (one forward pass over the calibration windows, hooks), Q the dequantized weight of each
   tool (gift-quant: ``QuantLinear.dense_weight()``; GPTQModel: its packed ``qweight/qzeros/scales``
   unpacked, fp16 scales included); mean / median of the per-layer ratio gift/peer;
2. perplexity on ``boolq-passages:test`` windows of 512 tokens: both tools' dequantized weights are
   copied into one plain fp32 model (the same forward code for both; for gift-quant this equals its
   in-memory ``QuantLinear`` model, which the worker checks on one window);
3. wall time of the quantize call: gift-quant's ``quantize_model`` stage (``summary
   ["quantize_seconds"]``: capture, GPTQ, propagation, packing) and the whole
   ``quantize_to_checkpoint`` call (adds model load, tokenizing, fingerprints, checkpoint write);
   GPTQModel's ``model.quantize(...)`` (capture, GPTQ, propagation, packing) and its ``save``.

Each quantization runs in its own child process (``_worker`` sub-command) so the two libraries
never share a process (GPTQModel patches torch / transformers globals on import) and timings are
not disturbed; children run one at a time.

Usage::

    GPTQMODEL_CPU_WORKERS=2 GPTQMODEL_DISABLE_PACK_EXT=1 \
        python tools/bench_gptq.py --bits 3 4 --group-size 64 --calib-samples 128 --seq-len 256 --max-windows 40
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# like-for-like pairs: gift-quant clip -> GPTQModel mse norm
PEER_MSE = {"minmax": 0.0, "mse": 2.0}


# ----------------------------------------------------------------------------- helpers


def _env_for_children() -> dict:
    env = dict(os.environ)
    env.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))
    env.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env


def _save_weights(weights: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().float().contiguous().cpu() for k, v in weights.items()}, str(path))


def _block_linear_names(model) -> list[str]:
    from gift_quant.model.arch import model_linears as target_linears

    return list(target_linears(model))


def _unpack_gptq(qweight, qzeros, scales, g_idx, bits: int, in_f: int, out_f: int, zero_offset: int):
    from gift_quant.compare.gptqmodel_peer import dense_from_gptq

    w = dense_from_gptq(qweight, qzeros, scales, g_idx, bits, zero_offset)
    if tuple(w.shape) != (out_f, in_f):
        raise SystemExit(f"unpacked GPTQ layer has shape {tuple(w.shape)}, expected {(out_f, in_f)}")
    return w


# ----------------------------------------------------------------------------- workers


def worker_gift(a) -> None:
    from gift_quant.config.settings import QuantizeConfig, Runtime
    from gift_quant.data.windows import fingerprint_tokens
    from gift_quant.eval.perplexity import perplexity
    from gift_quant.packed.checkpoint import read_gift_config
    from gift_quant.packed.qlinear import QuantLinear
    from gift_quant.workflows.stages import quantize_to_checkpoint

    if a.threads:
        torch.set_num_threads(a.threads)
    if a.skip_scoring:
        # diagnostic only: what gift-quant would cost if it skipped the sensitivity scores when K = 0
        import gift_quant.quant.engine as engine

        score_layer = engine.score_layer

        def no_scores_at_k0(linear, stats, cfg, name):
            if cfg.salient_count(linear.in_features, name) == 0:
                return torch.zeros(linear.in_features), torch.zeros(0, dtype=torch.long)
            return score_layer(linear, stats, cfg, name)

        engine.score_layer = no_scores_at_k0
    windows = torch.load(a.calib, weights_only=True)
    cfg = QuantizeConfig(bits=a.bits, group_size=a.group_size, sym=True, act_order=False, static_groups=False,
                         clip=a.clip, damp=a.damp, block_size=a.block_size, salient=0, calib_samples=windows.shape[0],
                         seq_len=windows.shape[1], seed=a.seed, dtype="float32",
                         **({"calib_data": a.calib_data} if a.calib_data else {}))
    out = Path(a.ckpt)
    if out.exists():
        shutil.rmtree(out)
    c0, t0 = time.process_time(), time.perf_counter()
    model, summary = quantize_to_checkpoint(a.model_dir, out, cfg, overwrite=True,
                                            runtime=Runtime(device="cpu"))
    call_s, call_cpu = time.perf_counter() - t0, time.process_time() - c0
    fp = read_gift_config(out)["provenance"]["calibration_fingerprint"]
    if fp != fingerprint_tokens(windows):
        raise SystemExit(f"gift-quant used different calibration windows ({fp} != {fingerprint_tokens(windows)})")
    dense = {n: m.dense_weight(torch.float32) for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    _save_weights(dense, Path(a.weights))
    check = {}
    if a.check_windows:
        # the in-memory QuantLinear model, to show that the parent's dense-copy evaluation equals it
        w = torch.load(a.check_windows, weights_only=True)
        check = perplexity(model, w, "cpu", progress=False)
    meta = {"tool": "gift-quant", "skip_scoring": a.skip_scoring, "block_size": a.block_size,
            "bits": a.bits, "group_size": a.group_size,
            "clip": a.clip,
            "quantize_seconds": summary["quantize_seconds"], "call_seconds": call_s,
            "quantize_cpu_seconds": summary["quantize_cpu_seconds"], "call_cpu_seconds": call_cpu,
            "total_seconds_reported": summary["total_seconds"], "effective_bits": summary["effective_bits"],
            "own_mean_relative_error": summary["mean_relative_error"], "calibration_fingerprint": fp,
            "n_layers": len(dense), "inmemory_check": check, "torch_threads": torch.get_num_threads()}
    Path(a.meta).write_text(json.dumps(meta, indent=1))


def worker_peer(a) -> None:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))
    os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")
    from gptqmodel import GPTQModel
    from gptqmodel.nn_modules.qlinear import PackableQuantLinear
    from gptqmodel.quantization.config import QuantizeConfig as PeerConfig
    from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module
    from safetensors import safe_open

    from gift_quant.data.windows import fingerprint_tokens

    if a.threads:
        torch.set_num_threads(a.threads)
    windows = torch.load(a.calib, weights_only=True)
    qcfg = PeerConfig(bits=a.bits, group_size=a.group_size, sym=True, desc_act=False, act_group_aware=False,
                      static_groups=False, true_sequential=True, damp_percent=a.damp, mse=a.mse,
                      device="cpu", offload_to_disk=False)
    settings = {k: str(getattr(qcfg, k)) for k in ("bits", "group_size", "sym", "desc_act", "act_group_aware",
                                                    "static_groups", "true_sequential", "damp_percent",
                                                    "damp_auto_increment", "mse", "offload_to_disk", "fallback",
                                                    "hessian", "device", "format")}
    t0 = time.perf_counter()
    model = GPTQModel.load(str(a.model_dir), qcfg, dtype=torch.float32)
    load_s = time.perf_counter() - t0
    calib = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in windows]
    c0, t0 = time.process_time(), time.perf_counter()
    model.quantize(calib, batch_size=1, calibration_sort=None)
    quant_s, quant_cpu = time.perf_counter() - t0, time.process_time() - c0

    from gift_quant.packed.bits import unpack_cols

    mid = 2 ** (a.bits - 1)  # the zero point of a symmetric grid

    def zero_offset(qzeros, out_f):
        # GPTQ "v1" stores zero-1, "v2" the zero itself: detect which, sym grids have zero = 2**(bits-1)
        z = unpack_cols(qzeros.to(torch.int32), a.bits, out_f)
        for off in (0, 1):
            if bool((z + off == mid).all()):
                return off
        raise SystemExit(f"unexpected zero points {z.unique().tolist()} for a symmetric {a.bits}-bit grid")

    dense, packed, max_diff_peer_dequant, offsets = {}, {}, 0.0, set()
    for name, m in model.model.named_modules():
        if hasattr(m, "qweight") and hasattr(m, "qzeros") and hasattr(m, "g_idx"):
            off = zero_offset(m.qzeros, m.out_features)
            offsets.add(off)
            # exact fp32 value of scale * (code - zero), as gift-quant's dense_weight computes it
            w = _unpack_gptq(m.qweight, m.qzeros, m.scales, m.g_idx, a.bits, m.in_features, m.out_features, off)
            dense[name] = w
            packed[name] = m
    dtypes = sorted({str(p.dtype) for p in model.model.parameters()})
    out = Path(a.ckpt)
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    model.save(str(out))
    save_s = time.perf_counter() - t0

    # cross-check: unpack the *saved* checkpoint (what a server loads) and compare
    qc = json.loads((out / "quantize_config.json").read_text())
    saved = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                saved[k] = fh.get_tensor(k)
    max_diff = 0.0
    for name, w in dense.items():
        key = name if f"{name}.qweight" in saved else next(k[:-8] for k in saved if k.endswith(f"{name}.qweight"))
        qz = saved[f"{key}.qzeros"]
        out_f = w.shape[0]
        disk = _unpack_gptq(saved[f"{key}.qweight"], qz, saved[f"{key}.scales"], saved[f"{key}.g_idx"], a.bits,
                            w.shape[1], out_f, zero_offset(qz, out_f))
        max_diff = max(max_diff, float((disk - w).abs().max()))
        # and with GPTQModel's own (un-compiled base) dequantizer, which wants "v2" zeros and multiplies in fp16
        m = packed[name]
        if m.qzero_format() == 1:
            convert_gptq_v1_to_v2_format_module(m, bits=a.bits, pack_dtype=m.pack_dtype)
            m.qzero_format(format=2)
        theirs = PackableQuantLinear.dequantize_weight(m).T.float()
        rel = float(((theirs - w).abs() / m.scales.float().amax()).max())
        max_diff_peer_dequant = max(max_diff_peer_dequant, rel)
    _save_weights(dense, Path(a.weights))
    meta = {"tool": "gptqmodel", "bits": a.bits, "group_size": a.group_size, "mse": a.mse,
            "quantize_seconds": quant_s, "quantize_cpu_seconds": quant_cpu, "load_seconds": load_s,
            "save_seconds": save_s,
            "settings": settings, "model_dtypes": dtypes, "n_layers": len(dense),
            "calibration_fingerprint": fingerprint_tokens(windows), "checkpoint_format": qc.get("checkpoint_format"),
            "zero_offsets_in_memory": sorted(offsets),
            "peer_fp16_dequant_vs_exact_max_rel_to_max_scale": max_diff_peer_dequant,
            "dequant_vs_saved_checkpoint_max_abs": max_diff, "torch_threads": torch.get_num_threads()}
    Path(a.meta).write_text(json.dumps(meta, indent=1))


# ----------------------------------------------------------------------------- parent side


@torch.no_grad()
def fp_hessians(model, windows: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """X^T X (float64) of every block linear's input in the full-precision model, one pass over the
    calibration windows. Linears fed the same tensor (q/k/v, gate/up) share one matrix."""
    from gift_quant.model.arch import model_linears as target_linears

    linears = target_linears(model)
    calls: list[tuple[str, torch.Tensor]] = []
    handles = [lin.register_forward_pre_hook(lambda _m, args, n=n: calls.append((n, args[0])))
               for n, lin in linears.items()]
    try:
        model(input_ids=windows[:1], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    alias: dict[str, str] = {}
    for i, (name, x) in enumerate(calls):
        if name in alias:
            continue
        prev = next((alias[p] for p, px in calls[:i] if px is x and p in alias), None)
        alias[name] = prev or name
    calls.clear()
    canon = sorted(set(alias.values()), key=list(linears).index)
    hess = {n: torch.zeros(linears[n].in_features, linears[n].in_features, dtype=torch.float64) for n in canon}

    def hook(_m, args, n):
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        hess[n] += (x.T @ x).double()

    handles = [linears[n].register_forward_pre_hook(lambda m, args, n=n: hook(m, args, n)) for n in canon]
    try:
        for row in windows:
            model(input_ids=row.unsqueeze(0), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return hess, alias


def relative_errors(ref: dict[str, torch.Tensor], q: dict[str, torch.Tensor], hess, alias) -> dict[str, float]:
    out = {}
    for name, w in ref.items():
        h = hess[alias[name]]
        w64 = w.double()
        d = w64 - q[name].double()
        num = float(((d @ h) * d).sum())
        den = float(((w64 @ h) * w64).sum())
        out[name] = num / den
    return out


def run_worker(kind: str, args: list[str], log: Path) -> None:
    cmd = [sys.executable, str(Path(__file__).resolve()), "_worker", kind, *args]
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_env_for_children(), cwd=str(REPO))
    if proc.returncode != 0:
        tail = log.read_text()[-4000:]
        raise SystemExit(f"worker {kind} {' '.join(args)} failed (rc {proc.returncode}); log {log}:\n{tail}")


def machine_info() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def v(p):
        try:
            return version(p)
        except PackageNotFoundError:
            return None

    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "gift_quant"], cwd=REPO, capture_output=True,
                                    text=True).stdout.strip())
    except OSError:
        commit, dirty = None, None
    return {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), "cpu_count": os.cpu_count(),
            "cpu_model": cpu_model, "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "platform": platform.platform(), "torch": torch.__version__, "transformers": v("transformers"),
            "gptqmodel": v("gptqmodel"), "optimum": v("optimum"), "gift_quant": v("gift-quant"),
            "git_commit": commit, "gift_quant_dirty": dirty,
            "env": {k: os.environ.get(k) for k in ("GPTQMODEL_CPU_WORKERS", "GPTQMODEL_DISABLE_PACK_EXT")}}


def _fmt(x, nd=4):
    if x is None:
        return "–"
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        return f"{x:.{nd}f}" if abs(x) >= 10 ** -nd else f"{x:.2e}"
    return str(x)


def markdown(result: dict) -> str:
    rows = result["runs"]
    lines = [
        f"## gift-quant GPTQ (K=0) vs GPTQModel {result['machine']['gptqmodel']} — "
        f"{result['settings']['model_name']}, g{result['settings']['group_size']}",
        "",
        f"calibration: {result['settings']['calib_samples']} × {result['settings']['seq_len']} tokens of "
        f"`{result['settings']['calib_data']}` (same windows for both); perplexity: "
        f"{result['fp']['ppl']['windows']} × {result['settings']['eval_seq_len']} tokens of "
        f"`{result['settings']['ppl_data']}`; full-precision reference ppl "
        f"**{result['fp']['ppl']['perplexity']:.3f}**; "
        f"{result['machine']['cpu_count']} CPU cores, torch {result['machine']['torch']}.",
        "",
        "| bits | clip | tool | mean rel. err | median rel. err | ppl | quantize s (wall) | quantize s (CPU) "
        "| whole call s | load avg before |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['bits']} | {r['clip']} | {r['tool']} | {_fmt(r['mean_rel_err'], 5)} "
            f"| {_fmt(r['median_rel_err'], 5)} "
            f"| {_fmt(r['ppl'], 3)} | {_fmt(r['quantize_seconds'], 1)} | {_fmt(r['quantize_cpu_seconds'], 1)} "
            f"| {_fmt(r['call_seconds'], 1)} | {r['loadavg_before'][0]:.1f} |")
    lines += ["", "Like-for-like ratios gift/peer (< 1: gift-quant better or faster):", "",
              "| bits | clip (gift / peer) | mean ratio | median ratio | layers gift ≤ peer | ppl gift / peer | "
              "time ratio wall | time ratio CPU | whole call vs quantize+save |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in result["comparisons"]:
        label = {"gift-quant": f"{c['gift_clip']} / mse={c['peer_mse']}",
                 "gift-quant-noscore": f"{c['gift_clip']} / mse={c['peer_mse']} (gift no-scoring diagnostic)",
                 "gift-quant-bs64": f"{c['gift_clip']}: noise floor, gift block 64 / gift block 128"}[c["gift"]]
        lines.append(
            f"| {c['bits']} | {label} | {_fmt(c['mean_ratio'])} | "
            f"{_fmt(c['median_ratio'])} | {c['layers_gift_le_peer']}/{c['layers']} | "
            f"{_fmt(c['ppl_gift'], 3)} / {_fmt(c['ppl_peer'], 3)} | {_fmt(c['time_ratio'], 3)} | "
            f"{_fmt(c['cpu_time_ratio'], 3)} | "
            f"{_fmt(c['time_ratio_with_io'], 3)} |")
    lines += ["", "Like-for-like rows: gift `clip=minmax` ↔ GPTQModel `mse=0` (its default); gift `clip=mse` ↔ "
              "GPTQModel `mse=2.0`. Perplexity of both tools: dequantized weights in one plain fp32 model. "
              "'quantize s': gift-quant `quantize_model` stage / GPTQModel `model.quantize()`; 'whole call s': "
              "gift-quant `quantize_to_checkpoint` (load + tokenize + quantize + save) / GPTQModel quantize + save "
              "(its load is excluded).", ""]
    return "\n".join(lines)


def orchestrate(args) -> dict:
    from safetensors.torch import load_file

    from gift_quant.config.settings import DEFAULT_PPL_DATA, QuantizeConfig
    from gift_quant.data.sources import load_documents
    from gift_quant.data.windows import eval_windows, fingerprint_tokens
    from gift_quant.eval.perplexity import perplexity
    from gift_quant.model.loading import default_model_dir, load_model, load_tokenizer, resolve_model_dir
    from gift_quant.workflows.stages import calibration_set

    model_dir = resolve_model_dir(args.model) if args.model else default_model_dir()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "logs").mkdir(exist_ok=True)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)

    tok = load_tokenizer(model_dir)
    qcfg = QuantizeConfig(calib_samples=args.calib_samples, seq_len=args.seq_len, seed=args.seed, salient=0,
                          **({"calib_data": args.calib_data} if args.calib_data else {}))
    calib = calibration_set(tok, qcfg)
    torch.save(calib, work / "calib.pt")
    ppl_data = args.ppl_data or DEFAULT_PPL_DATA
    ev = eval_windows(tok, load_documents(ppl_data, "test"),
                      args.eval_seq_len, max_windows=args.max_windows, source=ppl_data)
    torch.save(ev[:1].clone(), work / "check.pt")
    print(f"[bench] model {model_dir}; calibration {tuple(calib.shape)} fp {fingerprint_tokens(calib)}; "
          f"eval {tuple(ev.shape)}", flush=True)

    model = load_model(model_dir, torch.float32)
    from gift_quant.model.arch import model_linears

    odd = [n for n, lin in model_linears(model).items() if args.group_size > 0 and lin.in_features % args.group_size]
    if odd:  # gift-quant refuses such groups: say so now, not after the Hessians
        raise SystemExit(f"--group-size {args.group_size} does not divide the inputs of {odd[0]}: gift-quant needs a "
                         "divisor of every linear's inputs (e.g. 64 or 32 on SmolLM2), or -1")
    t0 = time.perf_counter()
    hess, alias = fp_hessians(model, calib)
    hess_s = time.perf_counter() - t0
    print(f"[bench] full-precision Hessians of {len(alias)} linears ({len(hess)} distinct inputs) in {hess_s:.1f}s",
          flush=True)
    from gift_quant.model.arch import model_linears as target_linears

    linears = target_linears(model)
    ref = {n: lin.weight.detach().clone() for n, lin in linears.items()}
    t0 = time.perf_counter()
    fp_ppl = perplexity(model, ev, "cpu", progress=False)
    fp_check = perplexity(model, ev[:1], "cpu", progress=False)
    print(f"[bench] full-precision ppl {fp_ppl['perplexity']:.4f} ({time.perf_counter() - t0:.1f}s)", flush=True)

    def eval_dense(weights: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        missing = set(ref) - set(weights)
        if missing:
            raise SystemExit(f"quantized weights missing for {len(missing)} linears, e.g. {sorted(missing)[:3]}")
        for n, lin in linears.items():
            lin.weight.data.copy_(weights[n])
        try:
            return perplexity(model, ev, "cpu", progress=False), perplexity(model, ev[:1], "cpu", progress=False)
        finally:
            for n, lin in linears.items():
                lin.weight.data.copy_(ref[n])

    runs, by_key = [], {}
    for bits in args.bits:
        for clip in args.clip:
            tools = ["gift-quant", "gptqmodel"] + (["gift-quant-noscore"] if args.diagnose_scoring else [])
            tools += ["gift-quant-bs64"] if args.noise_floor else []
            for tool in tools:
                short = {"gift-quant": "gift", "gptqmodel": "peer", "gift-quant-noscore": "giftnoscore",
                         "gift-quant-bs64": "giftbs64"}[tool]
                tag = f"{short}_w{bits}_g{args.group_size}_{clip}"
                wfile, mfile, ckpt = work / f"{tag}.safetensors", work / f"{tag}.json", work / f"ckpt_{tag}"
                common = ["--bits", str(bits), "--group-size", str(args.group_size), "--damp", str(args.damp),
                          "--calib", str(work / "calib.pt"), "--model-dir", str(model_dir), "--weights", str(wfile),
                          "--meta", str(mfile), "--ckpt", str(ckpt), "--seed", str(args.seed),
                          "--threads", str(args.threads)]
                if tool.startswith("gift-quant"):
                    extra = ["--clip", clip, "--check-windows", str(work / "check.pt")]
                    extra += ["--calib-data", args.calib_data] if args.calib_data else []
                    extra += ["--skip-scoring"] if tool == "gift-quant-noscore" else []
                    extra += ["--block-size", "64"] if tool == "gift-quant-bs64" else []
                else:
                    extra = ["--mse", str(PEER_MSE[clip])]
                print(f"[bench] {tag}: quantizing ...", flush=True)
                load_before = os.getloadavg()
                t0 = time.perf_counter()
                run_worker("peer" if tool == "gptqmodel" else "gift", common + extra, out_dir / "logs" / f"{tag}.log")
                child_s = time.perf_counter() - t0
                meta = json.loads(mfile.read_text())
                if meta["calibration_fingerprint"] != fingerprint_tokens(calib):
                    raise SystemExit(f"{tag}: calibration windows differ from the parent's")
                q = load_file(str(wfile))
                errs = relative_errors(ref, q, hess, alias)
                ppl, check = eval_dense(q)
                del q
                if not args.keep_work:
                    wfile.unlink(missing_ok=True)
                    shutil.rmtree(ckpt, ignore_errors=True)
                vals = [errs[n] for n in ref]
                if tool.startswith("gift-quant"):
                    call_s = meta["call_seconds"]
                    inmem = meta.get("inmemory_check") or {}
                    consistency = {"inmemory_nll_first_window": inmem.get("nll"), "dense_copy_nll_first_window":
                                   check["nll"]}
                else:
                    call_s = meta["quantize_seconds"] + meta["save_seconds"]
                    consistency = {"peer_fp16_dequant_vs_exact_max_rel":
                                   meta["peer_fp16_dequant_vs_exact_max_rel_to_max_scale"],
                                   "dequant_vs_saved_checkpoint_max_abs": meta["dequant_vs_saved_checkpoint_max_abs"]}
                row = {"bits": bits, "group_size": args.group_size, "clip": clip if tool != "gptqmodel" else
                       f"mse={PEER_MSE[clip]}", "tool": tool, "mean_rel_err": statistics.fmean(vals),
                       "median_rel_err": statistics.median(vals), "max_rel_err": max(vals),
                       "ppl": ppl["perplexity"], "nll": ppl["nll"], "quantize_seconds": meta["quantize_seconds"],
                       "quantize_cpu_seconds": meta.get("quantize_cpu_seconds"), "call_seconds": call_s,
                       "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                       "child_process_seconds": child_s, "consistency": consistency,
                       "meta": meta, "layer_rel_err": errs}
                runs.append(row)
                by_key[(bits, clip, tool)] = row
                print(f"[bench] {tag}: mean rel err {row['mean_rel_err']:.5f}, median {row['median_rel_err']:.5f}, "
                      f"ppl {row['ppl']:.4f}, quantize {row['quantize_seconds']:.1f}s (whole call {call_s:.1f}s)",
                      flush=True)

    comparisons = []
    pairs = [("gift-quant", "gptqmodel")] + ([("gift-quant-noscore", "gptqmodel")] if args.diagnose_scoring else [])
    pairs += [("gift-quant-bs64", "gift-quant")] if args.noise_floor else []
    for bits, clip, (gtool, ptool) in ((b, c, t) for b in args.bits for c in args.clip for t in pairs):
        if True:
            g, p = by_key[(bits, clip, gtool)], by_key[(bits, clip, ptool)]
            ratios = [g["layer_rel_err"][n] / p["layer_rel_err"][n] for n in ref]
            comparisons.append({
                "bits": bits, "gift": gtool, "reference": ptool, "gift_clip": clip, "peer_mse": PEER_MSE[clip],
                "layers": len(ratios),
                "mean_ratio": statistics.fmean(ratios), "median_ratio": statistics.median(ratios),
                "min_ratio": min(ratios), "max_ratio": max(ratios),
                "layers_gift_le_peer": sum(r <= 1.0 for r in ratios),
                "ratio_of_mean_errors": g["mean_rel_err"] / p["mean_rel_err"],
                "ppl_gift": g["ppl"], "ppl_peer": p["ppl"], "ppl_ratio": g["ppl"] / p["ppl"],
                "time_gift_s": g["quantize_seconds"], "time_peer_s": p["quantize_seconds"],
                "time_ratio": g["quantize_seconds"] / p["quantize_seconds"],
                "cpu_time_gift_s": g["quantize_cpu_seconds"], "cpu_time_peer_s": p["quantize_cpu_seconds"],
                "cpu_time_ratio": g["quantize_cpu_seconds"] / p["quantize_cpu_seconds"],
                "time_ratio_with_io": g["call_seconds"] / p["call_seconds"],
                "targets_met": {"error": statistics.median(ratios) <= 1.0 and g["mean_rel_err"] <= p["mean_rel_err"],
                                "ppl": g["ppl"] <= p["ppl"], "time": g["quantize_seconds"] <= p["quantize_seconds"]},
            })
    return {
        "benchmark": "gift-quant GPTQ (salient=0) vs GPTQModel GPTQ",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {"model_dir": str(model_dir), "model_name": model_dir.name, "bits": args.bits,
                     "torch_threads": torch.get_num_threads(), "diagnose_scoring": args.diagnose_scoring,
                     "noise_floor": args.noise_floor,
                     "group_size": args.group_size, "clip": args.clip, "damp": args.damp, "sym": True,
                     "act_order": False, "block_size": 128, "true_sequential": True, "dtype": "float32",
                     "calib_data": qcfg.calib_data, "calib_samples": args.calib_samples, "seq_len": args.seq_len,
                     "seed": args.seed, "calibration_fingerprint": fingerprint_tokens(calib),
                     "ppl_data": ppl_data, "eval_seq_len": args.eval_seq_len, "max_windows": args.max_windows,
                     "ppl_eval": "dequantized weights of each tool copied into one plain fp32 model",
                     "peer_settings": "QuantizeConfig(bits, group_size, sym=True, desc_act=False, "
                                      "act_group_aware=False, static_groups=False, true_sequential=True, "
                                      "damp_percent=damp, mse=0.0|2.0, device='cpu', offload_to_disk=False); "
                                      "GPTQModel.load(..., dtype=float32); quantize(calib, batch_size=1, "
                                      "calibration_sort=None)"},
        "machine": machine_info(),
        "fp": {"ppl": fp_ppl, "nll_first_window": fp_check["nll"], "hessian_seconds": hess_s},
        "runs": runs,
        "comparisons": comparisons,
    }


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_worker":
        p = argparse.ArgumentParser(prog="bench_gptq.py _worker")
        p.add_argument("kind", choices=["gift", "peer"])
        p.add_argument("--bits", type=int, required=True)
        p.add_argument("--group-size", type=int, required=True)
        p.add_argument("--damp", type=float, required=True)
        p.add_argument("--clip", default="mse")
        p.add_argument("--mse", type=float, default=0.0)
        p.add_argument("--seed", type=int, default=0)
        for f in ("--calib", "--model-dir", "--weights", "--meta", "--ckpt"):
            p.add_argument(f, required=True)
        p.add_argument("--check-windows")
        p.add_argument("--calib-data", default=None)  # gift-quant re-draws its windows: the same text and seed
        p.add_argument("--threads", type=int, default=0)
        p.add_argument("--skip-scoring", action="store_true")
        p.add_argument("--block-size", type=int, default=128)
        a = p.parse_args(argv[1:])
        (worker_gift if a.kind == "gift" else worker_peer)(a)
        return

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    p.add_argument("--group-size", type=int, default=64,
                   help="-1: one grid per output row; must divide every linear's inputs (576 and 1536 on SmolLM2)")
    p.add_argument("--clip", nargs="+", default=["minmax", "mse"], choices=["minmax", "mse"],
                   help="gift-quant clip settings; each is paired with GPTQModel mse=0 (minmax) or mse=2.0 (mse)")
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--calib-data", default=None, help="calibration text (default: gift-quant's, sotu)")
    p.add_argument("--ppl-data", default=None, help="perplexity text (default: boolq-passages:test)")
    p.add_argument("--out-dir", default=str(REPO / "results" / "bench_gptq"))
    p.add_argument("--work-dir", default="/tmp/bench_gptq_work", help="scratch: weights and checkpoints")
    p.add_argument("--keep-work", action="store_true")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads for every process (0: torch's default, one per core)")
    p.add_argument("--diagnose-scoring", action="store_true",
                   help="also run gift-quant with the (unused at K=0) sensitivity scoring skipped, a diagnostic row")
    p.add_argument("--noise-floor", action="store_true",
                   help="also run gift-quant with GPTQ block size 64: the same mathematics as block size 128 with "
                        "other float rounding, so its difference from the block-size-128 run is the noise floor of "
                        "every gift/peer ratio")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.group_size == 0:
        args.group_size = -1
    t0 = time.perf_counter()
    result = orchestrate(args)
    result["bench_seconds"] = time.perf_counter() - t0
    out_dir = Path(args.out_dir)
    (out_dir / "bench_gptq.json").write_text(json.dumps(result, indent=1))
    md = markdown(result)
    (out_dir / "bench_gptq.md").write_text(md)
    print(md)
    print(f"[bench] wrote {out_dir / 'bench_gptq.json'} and {out_dir / 'bench_gptq.md'} "
          f"({result['bench_seconds']:.0f}s)")


if __name__ == "__main__":
    main()
