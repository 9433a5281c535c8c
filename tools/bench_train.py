"""Benchmark: one training step of GIFT-SW against PEFT LoRA (rank 64, all seven linears), per objective,
and the same step before and after a code change, side by side in one run.

Both methods train on the same quantized model (gift-quant GPTQ + salient columns of the default model),
with the same batch, sequence length and optimizer, each in its own subprocess so peak memory is its own:

* ``gift``:       SalientLinear on the packed codes with noise injection -- what ``gift-quant recover`` trains;
* ``gift-dense``: SalientLinear on a frozen dense fp32 base, to separate the method's cost from the
                  base representation;
* ``lora``:       peft LoRA r=64 (alpha 64) on q,k,v,o,gate,up,down of the same model with its quantized
                  weights materialized as frozen fp32 nn.Linear (QUIK+LoRA; peft has no layer for our
                  QuantLinear).
* ``gift-kd`` / ``lora-kd``: the same with the distillation objective (``--loss kd``, the default recipe's):
                  the full-precision teacher runs forward on the same batch (bf16 weights when the variant
                  computes in bf16, as ``recover`` loads it; else fp32).
* ``gift-blockwise``: one block-wise reconstruction step; its tokens/s is divided by the number of blocks.

A variant is ``METHOD[@old][:tN][:lN][:cCACHE][:ddpN][:pPREC]``:

* ``@old``: run the worker of ``--old-code`` (a checkout of the previous version, e.g. ``git worktree add
  ../gift-quant-old bf306ad``) with that checkout first on the path: today's code against the previous
  one on the same start, in the same run;
* ``:tN``: N intra-op threads (default 1);
* ``:lN``: N lanes of the batch trained in parallel threads (recover/lanes.py; what ``recover`` does on a
  CPU), N threads, each with the ``:t`` intra-op threads;
* ``:cCACHE``: training caches (recover/caches.py): ``auto`` (the default budget), ``0`` (off), ``keep``
  (noisy weights kept for backward only), ``base`` (dense base only), or a budget in MB;
* ``:ddpN``: N data-parallel processes (torchrun, gloo), one thread each, the batch split between them;
* ``:pPREC``: the compute precision (``--precision``, util/precision.py): ``p32`` (fp32), ``pbf16`` (forward
  passes and losses under bf16 autocast, trained weights and optimizer fp32, as ``recover --precision bf16``)
  or ``pauto`` (the default: what ``recover`` picks on this device).

Memory is the process's peak RSS (for ``ddp``: the sum over the processes), and its growth during
training. Variants run interleaved ``--repeats`` times and the fastest repeat counts, so a burst of load on
a shared machine does not land on one variant only; the load average before each run is recorded.
``--noise-table`` adds the per-pass cost of each way to draw the noise on the default model's shapes.

    python tools/bench_train.py --steps 3 --batch-size 2 --seq-len 256 --repeats 2 --old-code ../gift-quant-old \\
        --variants gift-kd@old,gift-kd,gift-kd:t2,lora-kd:t2 --out results/bench_train
    python tools/bench_train.py --variants gift-kd:t1:p32,gift-kd:t1:pbf16,lora-kd:t1:p32,lora-kd:t1:pbf16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

METHODS = ("gift", "gift-kd", "gift-blockwise", "gift-dense", "lora", "lora-kd")
HERE = Path(__file__).resolve()


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------ worker (one variant, one process or rank)


def _noise(kind: str) -> dict:
    """prepare_*'s noise arguments, for today's code (a NoiseSpec) or the previous one (loose values): the
    one worker measures both sides."""
    import inspect

    from gift_quant.recover.model import prepare_quantized

    if "noise_bits" in inspect.signature(prepare_quantized).parameters:
        return {"noise": kind, "noise_bits": 4}
    from gift_quant.config.settings import NoiseSpec

    return {"noise": NoiseSpec(kind, 4)}


def _caches(model, spec: str, device) -> None:
    try:
        from gift_quant.recover.caches import plan_caches
    except ImportError:  # the previous code has none
        return
    from gift_quant.recover.layer import SalientLinear

    if spec in ("keep", "base"):
        for m in model.modules():
            if isinstance(m, SalientLinear):
                m.keep_weight = spec == "keep"
                m.cache_base(spec == "base")
        return
    plan_caches(model, None if spec == "auto" else int(spec), device)


PRECISIONS = {"32": "fp32", "fp32": "fp32", "bf16": "bf16", "auto": "auto"}  # the :p modifier -> --precision


def _precision(setting: str, device):
    """(the resolved precision's name, its util.precision object or None). The previous code (@old) may have no
    precision module: there auto is fp32, and bf16 is applied by this worker alone."""
    try:
        from gift_quant.util.precision import resolve_precision
    except ImportError:
        return ("fp32" if setting == "auto" else setting), None
    p = resolve_precision(setting, device)
    return p.name, p


def worker(args) -> dict | None:
    from gift_quant.packed.checkpoint import load
    from gift_quant.recover.model import convert_to_dense, freeze_all_but_gift, prepare_quantized, set_noise_key
    from gift_quant.recover.objective import Objective, Teacher, objective_loss

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    precision, prec_obj = _precision(args.precision, device)
    bf16 = precision == "bf16"

    def autocast():  # the forward pass and the loss, as the training loop runs them; backward outside
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    model = load(args.ckpt)
    teacher = None
    if args.method.endswith("-kd"):
        from gift_quant.model.loading import load_model, resolve_model_dir

        dtype = torch.bfloat16 if bf16 else torch.float32  # recover/training.load_teacher's choice
        teacher = Teacher(load_model(resolve_model_dir(args.model), dtype), device)
    objective = Objective("kd" if teacher is not None else "ce")
    if args.method.startswith("gift"):
        model = prepare_quantized(model, seed=0, **_noise("normal"))
        if args.method == "gift-dense":
            from gift_quant.model.arch import model_linears
            from gift_quant.recover.model import prepare_dense

            salient = {n: m.salient_idx.clone() for n, m in model_linears(model).items()}
            trained = {n: m.gift_salient.detach().clone() for n, m in model_linears(model).items()}
            convert_to_dense(model)
            prepare_dense(model, salient, seed=0, **_noise("normal"))
            for n, m in model_linears(model).items():
                m.gift_salient.data.copy_(trained[n])
        params = freeze_all_but_gift(model)
    else:
        from peft import LoraConfig, get_peft_model

        model = convert_to_dense(prepare_quantized(model, **_noise("none")))  # fp32 Linear, salient merged
        for p in model.parameters():
            p.requires_grad_(False)
        cfg = LoraConfig(r=64, lora_alpha=64, lora_dropout=0.0, bias="none",
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        model = get_peft_model(model, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
    model.to(device).train()
    _caches(model, args.cache, device)
    wrapped = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # the frozen base is in buffers that never change: broadcasting them every step would only cost time
        wrapped = DistributedDataParallel(model, broadcast_buffers=False)
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len), generator=g)
    per_rank = args.batch_size // world
    ids = ids[rank * per_rank:(rank + 1) * per_rank].to(device)
    n_blocks = 1
    keys = iter(range(10**9))

    if args.method == "gift-blockwise":
        from gift_quant.model.arch import find_blocks
        from gift_quant.model.capture import capture_block_inputs

        _, blocks = find_blocks(model)
        n_blocks = len(blocks)
        with torch.no_grad():
            inputs, kwargs = capture_block_inputs(model, blocks, ids, device, len(ids))
        block, x, kw = blocks[n_blocks // 2], inputs[0], kwargs[n_blocks // 2]
        target = x + 0.01 * torch.randn_like(x)

        def step():
            set_noise_key(block, next(keys))
            with autocast():
                out = block(x, **kw)
            out = out[0] if isinstance(out, (tuple, list)) else out
            (out - target).pow(2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    elif args.lanes > 1:
        from gift_quant.recover.lanes import Lanes

        lanes = Lanes(args.lanes, args.lanes)

        def step():
            set_noise_key(model, next(keys))
            if prec_obj is None:  # the previous code's lanes take no precision
                with autocast():  # (this thread only: its lanes' threads would not see it)
                    lanes.backward(model, ids, ids, objective, teacher, params, 1.0, False)
            else:
                lanes.backward(model, ids, ids, objective, teacher, params, 1.0, False, prec_obj)
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        def step():
            set_noise_key(model, next(keys) * world + rank)  # as the training loop keys it
            with autocast():
                loss, _ = objective_loss(wrapped, ids, ids, objective, teacher)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    rss_before = _rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated() / 2**20
    step()  # warm-up (allocates optimizer state and caches)
    _sync(device, world)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        step()
    _sync(device, world)
    seconds = (time.perf_counter() - t0) / args.steps
    cpu = (time.process_time() - c0) / args.steps  # every thread of this process; on a loaded machine the work done
    out = {"variant": args.variant, "seconds_per_step": seconds * n_blocks, "cpu_seconds_per_step": cpu * n_blocks,
           "tokens_per_s": args.batch_size * args.seq_len / (seconds * n_blocks),
           "trainable_params": sum(p.numel() for p in params),
           "peak_rss_growth_mb": _rss_mb() - rss_before, "peak_rss_mb": _rss_mb(), "processes": world,
           "precision": precision}
    if device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["peak_cuda_growth_mb"] = out["peak_cuda_mb"] - base_cuda
    if world > 1:  # memory of the run: every process's
        import torch.distributed as dist

        every = [None] * world
        dist.all_gather_object(every, (out["peak_rss_mb"], out["peak_rss_growth_mb"], out["cpu_seconds_per_step"]))
        for j, key in enumerate(("peak_rss_mb", "peak_rss_growth_mb", "cpu_seconds_per_step")):
            out[key] = sum(e[j] for e in every)
        dist.destroy_process_group()
    return out if rank == 0 else None


def _sync(device, world: int) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


# ------------------------------------------------------------------ noise: the cost of each way to draw it


def noise_table(tokens: int, repeats: int = 3) -> list[dict]:
    """Seconds per pass over the default model's 210 linears (hidden 576, intermediate 1536, 30 blocks), one
    thread: each generator drawing the weight-space noise, what output-space noise would draw (tokens x out
    per layer), and the dequantization / cache copy it is added to."""
    import numpy as np

    torch.set_num_threads(1)
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)] * 30
    big = max(o * i for o, i in shapes)
    buf, cache = torch.empty(big), torch.empty(big)
    codes = torch.randint(0, 8, (big,), dtype=torch.uint8)
    arr = buf.numpy()

    def per_pass(draw, sizes) -> float:
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for n in sizes:
                draw(n)
            best = min(best, time.perf_counter() - t0)
        return best

    weight = [o * i for o, i in shapes]
    output = [tokens * o for o, _ in shapes]
    gen = torch.Generator().manual_seed(0)
    rows = [("torch normal_ (mt19937), weight space", lambda n: buf[:n].normal_(generator=gen), weight),
            ("torch uniform_ (mt19937), weight space", lambda n: buf[:n].uniform_(generator=gen), weight),
            (f"torch normal_, output space ({tokens} tokens x out)", lambda n: buf[:n].normal_(generator=gen),
             output)]
    for name in ("PCG64", "SFC64", "Philox"):
        rng = np.random.Generator(getattr(np.random, name)(0))
        rows.append((f"numpy {name} standard_normal float32, weight space",
                     lambda n, r=rng: r.standard_normal(out=arr[:n], dtype=np.float32), weight))
    rows += [("dequantize codes (uint8 -> float, zero, scale)",
              lambda n: buf[:n].copy_(codes[:n]).sub_(4.0).mul_(0.01), weight),
             ("copy the dense base cache", lambda n: buf[:n].copy_(cache[:n]), weight),
             ("add 0.5 * Delta * noise (addcmul)", lambda n: buf[:n].add_(cache[:n], alpha=0.5), weight)]
    return [{"what": name, "draws_per_pass": sum(sizes), "seconds_per_pass": per_pass(draw, sizes)}
            for name, draw, sizes in rows]


# ------------------------------------------------------------------ driver


def parse_variant(spec: str) -> dict:
    method, *mods = spec.split(":")
    method, _, code = method.partition("@")
    if method not in METHODS or code not in ("", "old"):
        raise SystemExit(f"unknown variant {spec!r}: METHOD[@old][:tN][:lN][:cCACHE][:ddpN][:pPREC], "
                         f"METHOD in {METHODS}")
    v = {"spec": spec, "method": method, "old": code == "old", "threads": 1, "cache": "auto", "procs": 1, "lanes": 1,
         "precision": "auto"}
    for m in mods:
        if m.startswith("p") and m[1:] in PRECISIONS:
            v["precision"] = PRECISIONS[m[1:]]
        elif m.startswith("ddp"):
            v["procs"] = int(m[3:])
        elif m.startswith("l"):
            v["lanes"] = int(m[1:])
        elif m.startswith("t"):
            v["threads"] = int(m[1:])
        elif m.startswith("c"):
            v["cache"] = m[1:]
        else:
            raise SystemExit(f"unknown modifier {m!r} in {spec!r}")
    return v


def run_variant(v: dict, args, port: int) -> dict:
    code = Path(args.old_code).resolve() if v["old"] else HERE.parents[1]
    # as the gift-quant command runs (util/cpu_policy.py): waiting OpenMP threads sleep instead of spinning
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": str(v["threads"])}
    tool = HERE  # this worker for both sides: only the package on the path differs
    common = ["--method", v["method"], "--steps", str(args.steps), "--batch-size", str(args.batch_size),
              "--seq-len", str(args.seq_len), "--device", args.device, "--ckpt", args.ckpt,
              *(["--model", args.model] if args.model else []), "--threads", str(v["threads"]),
              "--cache", v["cache"], "--variant", v["spec"], "--lanes", str(v["lanes"]), "--precision", v["precision"]]
    if v["procs"] > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(v["procs"]),
               "--master_port", str(port), str(tool), *common]
    else:
        cmd = [sys.executable, str(tool), *common]
    load = os.getloadavg()[0]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env, cwd=code)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        return {"variant": v["spec"], "method": v["method"], "failed": (res.stderr.strip().splitlines() or ["?"])[-1],
                "load_before": load}
    row = json.loads(lines[-1])
    row.update(variant=v["spec"], method=v["method"], code="old" if v["old"] else "new", threads=v["threads"],
               lanes=v["lanes"], cache=None if v["old"] else v["cache"], load_before=load)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ckpt", default=str(Path(tempfile.gettempdir()) / "gift-bench-train-w3"),
                    help="quantized checkpoint (made if missing)")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--model", default=None,
                    help="source model folder: quantized when --ckpt is missing, the KD teacher (default: SmolLM2)")
    ap.add_argument("--calib-data", default=None, help="calibration text when --ckpt is made (default: gift-quant's)")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs per variant; the fastest counts")
    ap.add_argument("--variants", default=",".join(METHODS), help="comma-separated variants (module docstring)")
    ap.add_argument("--old-code", default=None, help="checkout of the previous version, for the @old variants")
    ap.add_argument("--noise-table", action="store_true", help="also time each way to draw the noise")
    ap.add_argument("--out", default="results/bench_train")
    # worker mode (the driver's subprocesses)
    ap.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--cache", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--lanes", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="auto", choices=sorted(set(PRECISIONS.values())), help=argparse.SUPPRESS)
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.method:
        args.variant = args.variant or args.method
        out = worker(args)
        if out is not None:
            print(json.dumps(out))
        return 0
    variants = [parse_variant(s) for s in args.variants.split(",") if s]
    if any(v["old"] for v in variants) and not args.old_code:
        raise SystemExit("@old variants need --old-code DIR (a checkout of the previous version)")
    ensure_checkpoint(Path(args.ckpt), args.calib_samples, args.model, args.calib_data, min(args.seq_len, 128))
    runs: dict[str, list[dict]] = {v["spec"]: [] for v in variants}
    failed: dict[str, dict] = {}
    for r in range(args.repeats):
        for i, v in enumerate(variants):
            row = run_variant(v, args, 29500 + 10 * r + i)
            if "failed" in row:
                failed[v["spec"]] = row
            else:
                runs[v["spec"]].append(row)
            print(f"{v['spec']}: {row}", file=sys.stderr, flush=True)
    rows = [min(runs[v["spec"]], key=lambda r: r["seconds_per_step"]) if runs[v["spec"]] else failed[v["spec"]]
            for v in variants]
    cuda = args.device.startswith("cuda")
    peak, growth = ("peak_cuda_mb", "peak_cuda_growth_mb") if cuda else ("peak_rss_mb", "peak_rss_growth_mb")
    report = {"date": str(date.today()), "machine": platform.processor() or platform.machine(),
              "cores": os.cpu_count(), "torch": torch.__version__, "device": args.device,
              "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps, "repeats": args.repeats,
              "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
              "rows": rows, "all_runs": runs, "ratios_vs_lora": ratios_vs_lora(rows, peak),
              "ratios_bf16_vs_fp32": ratios_bf16_vs_fp32(rows, peak)}
    ratio_lines = [f"{m} / {v['vs']}: tokens/s x{v['tokens_per_s_ratio']:.2f}, "
                   f"peak memory x{v['peak_memory_ratio']:.2f}"
                   for key in ("ratios_vs_lora", "ratios_bf16_vs_fp32") for m, v in report[key].items()]
    lines = ["| variant | code | lanes x threads x processes | caches | precision | trainable params | s/step | "
             "CPU s/step | tokens/s | peak memory (MB) | growth in training (MB) | load avg before |",
             "|---" * 12 + "|"]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['variant']} | failed: {r['failed']} |" + " |" * 9)
            continue
        lines.append(f"| {r['variant']} | {r['code']} | {r['lanes']} x {r['threads']} x {r.get('processes', 1)} | "
                     f"{r['cache'] or '-'} | {r.get('precision', 'fp32')} | {r['trainable_params']:,} | "
                     f"{r['seconds_per_step']:.2f} | "
                     f"{r['cpu_seconds_per_step']:.2f} | {r['tokens_per_s']:.0f} | {r[peak]:.0f} | {r[growth]:.0f} | "
                     f"{r['load_before']:.1f} |")
    lines += ["", *ratio_lines] if ratio_lines else []
    if args.noise_table:
        report["noise"] = noise_table(args.batch_size * args.seq_len)
        lines += ["", "| noise option (one thread, the default model's 210 linears) | values drawn per pass | "
                      "s per pass |", "|---|---|---|"]
        lines += [f"| {n['what']} | {n['draws_per_pass']:,} | {n['seconds_per_pass']:.3f} |" for n in report["noise"]]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_train.json").write_text(json.dumps(report, indent=1))
    (out / "bench_train.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def ratios_vs_lora(rows: list[dict], peak: str) -> dict:
    """Each new-code GIFT-SW variant against the LoRA variant with the same objective, parallelism (lanes,
    threads, processes, caches aside) and precision: tokens/s and peak-memory ratios."""
    ok = [r for r in rows if "failed" not in r and r["code"] == "new"]
    shape = lambda r: (r["lanes"], r["threads"], r.get("processes", 1), r.get("precision"))  # noqa: E731
    out = {}
    for r in ok:
        if not r["method"].startswith("gift") or r["method"] in ("gift-blockwise",):
            continue
        want = "lora-kd" if r["method"].endswith("-kd") else "lora"
        ref = next((x for x in ok if x["method"] == want and shape(x) == shape(r)), None)
        if ref is not None:
            out[r["variant"]] = {"vs": ref["variant"], "tokens_per_s_ratio": r["tokens_per_s"] / ref["tokens_per_s"],
                                 "peak_memory_ratio": r[peak] / max(ref[peak], 1e-9)}
    return out


def ratios_bf16_vs_fp32(rows: list[dict], peak: str) -> dict:
    """Each bf16 variant against the fp32 variant of the same method, code and parallelism: tokens/s and memory."""
    ok = [r for r in rows if "failed" not in r]
    shape = lambda r: (r["method"], r["code"], r["lanes"], r["threads"], r.get("processes", 1))  # noqa: E731
    out = {}
    for r in ok:
        if r.get("precision") != "bf16":
            continue
        ref = next((x for x in ok if x.get("precision") == "fp32" and shape(x) == shape(r)), None)
        if ref is not None:
            out[r["variant"]] = {"vs": ref["variant"], "tokens_per_s_ratio": r["tokens_per_s"] / ref["tokens_per_s"],
                                 "peak_memory_ratio": r[peak] / max(ref[peak], 1e-9)}
    return out


def ensure_checkpoint(path: Path, calib_samples: int, model: str | None = None, calib_data: str | None = None,
                      seq_len: int = 128) -> Path:
    from gift_quant.config.settings import QuantizeConfig, Runtime
    from gift_quant.packed.checkpoint import is_checkpoint
    from gift_quant.workflows.stages import quantize_to_checkpoint

    if not is_checkpoint(path):
        # calibration quality does not matter for step speed: a small calibration set keeps this quick
        extra = {"calib_data": calib_data} if calib_data else {}
        quantize_to_checkpoint(model, path, QuantizeConfig(bits=3, calib_samples=calib_samples, seq_len=seq_len,
                                                           **extra), runtime=Runtime(device="cpu"))
    return path


if __name__ == "__main__":
    sys.exit(main())
