"""Check docs/scaling.md's memory model on this CPU: quantize's and one training step's peak memory vs prediction.

Random-initialised Llama models built from configs (no downloads) of growing depth and width. Each point
runs in a fresh subprocess that reads its own peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``
right before the measured part, so the model's construction does not count):

* ``quantize``: engine.quantize_model (GPTQ, 3 bits, default salient fraction) on N x L random tokens;
  reported: peak RSS beyond what the process held with the model loaded, and wall time. The memory model
  (gift_quant/workflows/memory_model.quantize_memory, CPU run) predicts that peak; it must not grow with depth, and
  time must grow linearly with depth (the fitted seconds per block and the ratios are printed).
* ``step``: one end-to-end recovery step (prepare_quantized on an RTN-quantized copy, gradient
  checkpointing on, AdamW) with CE and with KD (a CPU teacher); reported: peak RSS growth during the first
  step (grads, AdamW state, scratch buffers, activations, the loss's chunks) vs recover_memory's terms, and
  the static tensor bytes of the prepared model vs its base/grid/outside/salient terms.

``--table`` prints docs/scaling.md's table (from gift_quant.workflows.memory_model) and exits.

    OMP_NUM_THREADS=1 python tools/bench_memory.py --out results/bench_memory
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gift_quant.workflows import memory_model as mm  # noqa: E402  (pure: no torch)

MB = 2**20
VOCAB = 2048


def shape_of(hidden: int, layers: int) -> mm.Shape:
    """A Llama-2-proportioned shape: head_dim 128 (64 below 512), intermediate 2.6875 d rounded to 32."""
    head_dim = 128 if hidden >= 512 else 64
    inter = int(round(hidden * 2.6875 / 32)) * 32
    return mm.Shape(f"d{hidden}x{layers}", hidden, inter, layers, hidden // head_dim, hidden // head_dim, VOCAB)


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def release_free_memory() -> None:
    """Hand freed heap pages back to the kernel (glibc), so a later peak counts new allocations, not reuse."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def build(shape: mm.Shape, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                      num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                      num_key_value_heads=shape.kv_heads, max_position_embeddings=4096, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


def tensor_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def worker_quantize(args) -> dict:
    import torch

    from gift_quant.config.settings import QuantizeConfig
    from gift_quant.quant.engine import quantize_model

    torch.set_num_threads(1)
    shape = shape_of(args.hidden, args.layers)
    model = build(shape)
    windows = torch.randint(0, VOCAB, (args.samples, args.seq), generator=torch.Generator().manual_seed(1))
    cfg = QuantizeConfig(bits=3, calib_samples=args.samples, seq_len=args.seq, calib_batch_size=args.calib_batch)
    weights = tensor_bytes(model)
    rss0 = _status("VmRSS")
    exact = reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    quantize_model(model, windows, cfg, torch.device("cpu"), None, progress=False)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    peak = _status("VmHWM")
    pred = mm.quantize_memory(shape, args.samples, args.seq, weight_bytes=4, act_bytes=4,
                              calib_batch=args.calib_batch, on_gpu=False)
    return {"kind": "quantize", "hidden": shape.hidden, "intermediate": shape.intermediate, "layers": shape.layers,
            "samples": args.samples, "seq": args.seq, "weights_mb": weights / MB, "rss_before_mb": rss0 / MB,
            "peak_beyond_mb": (peak - rss0) / MB, "predicted_beyond_mb": pred["beyond_weights"] / MB,
            "predicted_terms_mb": {k: v / MB for k, v in pred["terms"].items()}, "seconds": seconds,
            "cpu_seconds": cpu_seconds, "peak_reset": exact}


def worker_step(args) -> dict:
    import copy

    import torch

    from gift_quant.config.settings import NoiseSpec, QuantizeConfig
    from gift_quant.quant.engine import quantize_model
    from gift_quant.recover.model import freeze_all_but_gift, linear_weights, prepare_quantized, set_noise_key
    from gift_quant.recover.objective import Objective, Teacher, objective_loss

    torch.set_num_threads(1)
    shape = shape_of(args.hidden, args.layers)
    model = build(shape)
    teacher = Teacher(copy.deepcopy(model), torch.device("cpu")) if args.loss == "kd" else None
    reference = linear_weights(model)
    calib = torch.randint(0, VOCAB, (4, 64), generator=torch.Generator().manual_seed(1))
    cfg = QuantizeConfig(bits=3, algorithm="rtn", salient=args.k, calib_samples=4, seq_len=64)
    quantize_model(model, calib, cfg, torch.device("cpu"), None, progress=False)
    prepare_quantized(model, noise=NoiseSpec("normal", 4), seed=0, reference=reference)
    del reference
    params = freeze_all_but_gift(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, VOCAB, (args.batch, args.seq), generator=torch.Generator().manual_seed(2))
    static = tensor_bytes(model)
    # quantizing and freeing the reference left freed pages in the heap: without this the step reuses
    # them and its peak RSS growth reads near zero
    release_free_memory()
    rss0 = _status("VmRSS")
    exact = reset_peak()
    t0 = time.perf_counter()
    set_noise_key(model, 0)
    loss, _ = objective_loss(model, ids, ids, Objective(args.loss), teacher)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM")
    pred = mm.recover_memory(shape, batch=args.batch, seq=args.seq, k=args.k, checkpointing=True,
                             teacher="cpu" if args.loss == "kd" else None, weight_bytes=4, act_bytes=4)
    t = pred["terms"]
    static_keys = ("base_codes", "grids_and_indices", "outside_weights", "salient_params")
    growth_pred = sum(v for k, v in t.items() if k not in static_keys and not k.startswith("teacher_weights"))
    if args.loss == "kd":  # the CPU teacher's forward runs in this process: its transient is host memory here
        growth_pred += mm.block_forward_transient(shape, args.batch * args.seq, 4)
    return {"kind": "step", "loss": args.loss, "hidden": shape.hidden, "layers": shape.layers, "batch": args.batch,
            "seq": args.seq, "k": args.k, "static_mb": static / MB,
            "predicted_static_mb": sum(t[k] for k in static_keys) / MB,
            "step_growth_mb": (peak - rss0) / MB, "predicted_growth_mb": growth_pred / MB,
            "predicted_terms_mb": {k: v / MB for k, v in t.items()}, "seconds": seconds, "peak_reset": exact}


def run_point(kind: str, **kw) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind] + [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TRANSFORMERS_VERBOSITY="error",
               HF_HUB_OFFLINE="1")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{kind} {kw} failed:\n{res.stderr[-3000:]}")
    row = json.loads(res.stdout.strip().splitlines()[-1])
    print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()
                      if k != "predicted_terms_mb"}), file=sys.stderr, flush=True)
    return row


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (slope, intercept)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return slope, my - slope * mx


def depth_verdict(rows: list[dict]) -> dict:
    """Per width with >= 2 depths: peak beyond weights vs depth (must stay flat), seconds vs depth (linear)."""
    out = {}
    for hidden in sorted({r["hidden"] for r in rows}):
        rs = sorted((r for r in rows if r["hidden"] == hidden), key=lambda r: r["layers"])
        if len(rs) < 2:
            continue
        depth = [r["layers"] for r in rs]
        mem = [r["peak_beyond_mb"] for r in rs]
        sec = [r["cpu_seconds"] for r in rs]  # CPU time: wall time on a shared machine carries others' load
        mem_slope, _ = fit_line(depth, mem)
        sec_slope, sec_icpt = fit_line(depth, sec)
        per_block = [s / d for s, d in zip(sec, depth)]
        worst = max(abs(s - (sec_slope * d + sec_icpt)) / s for s, d in zip(sec, depth))
        out[str(hidden)] = {
            "depths": depth, "peak_beyond_mb": mem, "cpu_seconds": sec,
            "memory_mb_per_block": mem_slope,
            "memory_growth_fraction": (mem[-1] - mem[0]) / max(mem[0], 1e-9),
            # flat: the deepest point's peak within 15 % of the shallowest's (allocator noise)
            "memory_flat": mem[-1] <= 1.15 * mem[0] + 16,
            "seconds_per_block": sec_slope, "seconds_intercept": sec_icpt,
            "seconds_per_block_each": per_block, "linear_fit_worst_rel_error": worst,
            "time_linear": worst <= 0.25,
        }
    return out


def markdown(report: dict) -> str:
    lines = ["Quantize (GPTQ 3-bit, CPU, fp32): peak RSS beyond the loaded model, predicted by "
             "`memory_model.quantize_memory`", "",
             "| hidden x layers | calibration | weights (MB) | peak beyond weights (MB) | predicted (MB) | "
             "measured / predicted | wall s | CPU s | CPU s per block |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["quantize"]:
        lines.append(f"| {r['hidden']} x {r['layers']} | {r['samples']} x {r['seq']} | {r['weights_mb']:.0f} | "
                     f"{r['peak_beyond_mb']:.0f} | {r['predicted_beyond_mb']:.0f} | "
                     f"{r['peak_beyond_mb'] / r['predicted_beyond_mb']:.2f} | {r['seconds']:.1f} | "
                     f"{r['cpu_seconds']:.1f} | {r['cpu_seconds'] / r['layers']:.2f} |")
    for hidden, v in report["depth"].items():
        lines.append(f"\nhidden {hidden}, depths {v['depths']}: peak beyond weights {v['memory_mb_per_block']:+.1f} "
                     f"MB per block ({100 * v['memory_growth_fraction']:+.0f} % deepest vs shallowest: "
                     f"{'flat' if v['memory_flat'] else 'GROWS'}); CPU time {v['seconds_per_block']:.2f} s per block, "
                     f"worst deviation from the line {100 * v['linear_fit_worst_rel_error']:.0f} % "
                     f"({'linear' if v['time_linear'] else 'NOT linear'})")
    if report["step"]:
        lines += ["", "One recovery step (gradient checkpointing on, fp32 on the CPU): peak RSS growth during the "
                  "step and static tensor bytes, predicted by `memory_model.recover_memory`", "",
                  "| loss | hidden x layers | batch x seq | K | static (MB) | predicted static (MB) | "
                  "step growth (MB) | predicted growth (MB) | measured / predicted |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in report["step"]:
            lines.append(f"| {r['loss']} | {r['hidden']} x {r['layers']} | {r['batch']} x {r['seq']} | {r['k']} | "
                         f"{r['static_mb']:.0f} | {r['predicted_static_mb']:.0f} | {r['step_growth_mb']:.0f} | "
                         f"{r['predicted_growth_mb']:.0f} | {r['step_growth_mb'] / r['predicted_growth_mb']:.2f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", action="store_true", help="print docs/scaling.md's table and exit")
    ap.add_argument("--widths", default="256,512", help="hidden sizes of the width series (at --base-depth)")
    ap.add_argument("--depths", default="4,8,16,32", help="depths of the depth series (at --depth-width)")
    ap.add_argument("--depth-width", type=int, default=512)
    ap.add_argument("--base-depth", type=int, default=4)
    ap.add_argument("--samples", type=int, default=16, help="calibration windows")
    ap.add_argument("--seq", type=int, default=128, help="calibration window length")
    ap.add_argument("--calib-batch", type=int, default=8)
    ap.add_argument("--step-widths", default="512,1024", help="hidden sizes of the training-step points")
    ap.add_argument("--step-depth", type=int, default=4)
    ap.add_argument("--step-batch", type=int, default=2)
    ap.add_argument("--step-seq", type=int, default=256)
    ap.add_argument("--k", type=int, default=32, help="salient columns per linear in the step points")
    ap.add_argument("--out", default="results/bench_memory")
    # subprocess mode
    ap.add_argument("--worker", choices=("quantize", "step"), help=argparse.SUPPRESS)
    ap.add_argument("--hidden", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--loss", default="ce", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=2, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.table:
        print(mm.scaling_table(), end="")
        return 0
    if args.worker == "quantize":
        print(json.dumps(worker_quantize(args)))
        return 0
    if args.worker == "step":
        print(json.dumps(worker_step(args)))
        return 0
    t0 = time.perf_counter()
    points = [(w, args.base_depth) for w in _ints(args.widths)]
    points += [(args.depth_width, d) for d in _ints(args.depths) if (args.depth_width, d) not in points]
    qrows = [run_point("quantize", hidden=h, layers=n, samples=args.samples, seq=args.seq,
                       calib_batch=args.calib_batch) for h, n in points]
    srows = [run_point("step", hidden=h, layers=args.step_depth, batch=args.step_batch, seq=args.step_seq, k=args.k,
                       loss=loss) for h in _ints(args.step_widths) for loss in ("ce", "kd")]
    report = {"date": str(date.today()), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "threads": 1, "command": "python tools/bench_memory.py " + " ".join(sys.argv[1:]),
              "quantize": qrows, "depth": depth_verdict(qrows), "step": srows,
              "seconds": time.perf_counter() - t0}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_memory.json").write_text(json.dumps(report, indent=1))
    text = markdown(report)
    (out / "bench_memory.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
