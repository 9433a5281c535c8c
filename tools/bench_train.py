"""Benchmark: one training step of GIFT-SW against PEFT LoRA (rank 64, all seven linears), per objective.

Both train on the same quantized model (gift-quant GPTQ + salient columns of the default model), with
the same batch, sequence length and optimizer, each in its own subprocess so peak memory is its own:

* ``gift``:       SalientLinear on the packed codes (uint8 codes + scales, dequantized per pass) with
                  noise injection -- what ``gift-quant recover`` trains;
* ``gift-dense``: SalientLinear on a frozen dense fp32 base, to separate the method's cost from the
                  base representation;
* ``lora``:       peft LoRA r=64 (alpha 64) on q,k,v,o,gate,up,down of the same model with its quantized
                  weights materialized as frozen fp32 nn.Linear (QUIK+LoRA; peft has no layer for our
                  QuantLinear).
* ``gift-kd`` / ``lora-kd``: the same with the distillation objective (``--loss kd``): the full-precision
                  teacher (fp32 on CPU, bf16 on GPU) runs forward on the same batch; its memory counts.
* ``gift-blockwise``: one block-wise reconstruction step (``--blockwise-steps``): one decoder block's
                  forward and backward on the batch, MSE to a target; its tokens/s is divided by the
                  number of blocks, i.e. the rate at which a block-wise pass over the whole model
                  consumes tokens, comparable with the end-to-end rows.

Prints a table and writes JSON: tokens/s, seconds/step, memory, trainable parameters, and the ratios
gift/lora. Memory is reported two ways: the process's total peak (CPU: peak RSS; GPU: peak allocated) --
what a machine must have, and the headline -- and the growth during training alone (peak minus the
peak after loading), which leaves out each method's static copy of the model. The methods run
interleaved ``--repeats`` times (gift, gift-dense, lora, gift, ...) and the fastest repeat counts, so
a burst of load on a shared machine does not land on one method only.

    python tools/bench_train.py --steps 3 --batch-size 4 --seq-len 256 --repeats 2 --out results/bench_train
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

METHODS = ("gift", "gift-kd", "gift-blockwise", "gift-dense", "lora", "lora-kd")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args) -> dict:
    from gift_quant.config.settings import NoiseSpec
    from gift_quant.packed.checkpoint import load
    from gift_quant.recover.model import convert_to_dense, freeze_all_but_gift, prepare_quantized
    from gift_quant.recover.objective import Objective, Teacher, objective_loss

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = load(args.ckpt)
    teacher = None
    if args.method.endswith("-kd"):
        from gift_quant.model.loading import default_model_dir, load_model

        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        teacher = Teacher(load_model(default_model_dir(), dtype), device)
    objective = Objective("kd" if teacher is not None else "ce")
    if args.method in ("gift", "gift-kd", "gift-dense", "gift-blockwise"):
        model = prepare_quantized(model, noise=NoiseSpec("normal", 4), seed=0)
        if args.method == "gift-dense":
            from gift_quant.model.arch import model_linears as named_block_linears
            from gift_quant.recover.model import prepare_dense

            salient = {n: m.salient_idx.clone() for n, m in named_block_linears(model).items()}
            trained = {n: m.gift_salient.detach().clone() for n, m in named_block_linears(model).items()}
            convert_to_dense(model)
            prepare_dense(model, salient, noise=NoiseSpec("normal", 4), seed=0)
            for n, m in named_block_linears(model).items():
                m.gift_salient.data.copy_(trained[n])
        params = freeze_all_but_gift(model)
    else:
        from peft import LoraConfig, get_peft_model

        model = convert_to_dense(prepare_quantized(model, noise=NoiseSpec("none")))  # fp32 Linear, salient merged
        for p in model.parameters():
            p.requires_grad_(False)
        cfg = LoraConfig(r=64, lora_alpha=64, lora_dropout=0.0, bias="none",
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        model = get_peft_model(model, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
    model.to(device).train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 49152, (args.batch_size, args.seq_len), generator=g).to(device)

    if args.method == "gift-blockwise":
        from gift_quant.model.arch import find_blocks
        from gift_quant.model.capture import capture_block_inputs

        _, blocks = find_blocks(model)
        n_blocks = len(blocks)
        with torch.no_grad():
            inputs, kwargs = capture_block_inputs(model, blocks, ids, device, args.batch_size)
        block, x, kw = blocks[n_blocks // 2], inputs[0], kwargs[n_blocks // 2]
        target = x + 0.01 * torch.randn_like(x)

        def step():
            out = block(x, **kw)
            out = out[0] if isinstance(out, (tuple, list)) else out
            loss = (out - target).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        n_blocks = 1

        def step():
            loss, _ = objective_loss(model, ids, ids, objective, teacher)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    rss_before = _rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated() / 2**20
    step()  # warm-up (allocates optimizer state)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / args.steps
    out = {"method": args.method, "seconds_per_step": seconds * n_blocks,
           "tokens_per_s": args.batch_size * args.seq_len / (seconds * n_blocks),
           "trainable_params": sum(p.numel() for p in params),
           "peak_rss_growth_mb": _rss_mb() - rss_before, "peak_rss_mb": _rss_mb()}
    if device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["peak_cuda_growth_mb"] = out["peak_cuda_mb"] - base_cuda
    return out


def ensure_checkpoint(path: Path, calib_samples: int) -> Path:
    from gift_quant.config.settings import QuantizeConfig
    from gift_quant.packed.checkpoint import is_checkpoint
    from gift_quant.workflows.commands import quantize_to_checkpoint

    if not is_checkpoint(path):
        # calibration quality does not matter for step speed: a small calibration set keeps this quick
        quantize_to_checkpoint(None, path, QuantizeConfig(bits=3, calib_samples=calib_samples, seq_len=128,
                                                          device="cpu"), progress=True)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ckpt", default="/tmp/gift-bench-train-w3", help="quantized checkpoint (made if missing)")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs per method; the fastest counts")
    ap.add_argument("--out", default="results/bench_train")
    ap.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    args = ap.parse_args()
    if args.method:  # subprocess mode
        print(json.dumps(worker(args)))
        return
    ensure_checkpoint(Path(args.ckpt), args.calib_samples)
    methods = [m for m in args.methods.split(",") if m]
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    failed: dict[str, list[str]] = {}
    for _ in range(args.repeats):
        for method in methods:
            cmd = [sys.executable, __file__, "--method", method, "--steps", str(args.steps), "--batch-size",
                   str(args.batch_size), "--seq-len", str(args.seq_len), "--device", args.device,
                   "--ckpt", args.ckpt]
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                failed[method] = res.stderr.strip().splitlines()[-1:]
                continue
            runs[method].append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"{method}: {runs[method][-1]}", file=sys.stderr)
    rows = [min(runs[m], key=lambda r: r["seconds_per_step"]) if runs[m] else {"method": m, "failed": failed[m]}
            for m in methods]
    by = {r["method"]: r for r in rows if "failed" not in r}
    cuda = args.device.startswith("cuda")
    peak, growth = ("peak_cuda_mb", "peak_cuda_growth_mb") if cuda else ("peak_rss_mb", "peak_rss_growth_mb")
    ratios = {}
    if "gift" in by and "lora" in by:
        lora = by["lora"]
        for m in ("gift", "gift-kd", "gift-blockwise", "gift-dense"):
            if m in by:
                ref = by.get("lora-kd", lora) if m == "gift-kd" else lora  # same objective
                ratios[m] = {"vs": ref["method"], "tokens_per_s_ratio": by[m]["tokens_per_s"] / ref["tokens_per_s"],
                             "peak_memory_ratio": by[m][peak] / max(ref[peak], 1e-9),
                             "training_growth_ratio": by[m][growth] / max(ref[growth], 1e-9)}
    report = {"date": str(date.today()), "machine": platform.processor() or platform.machine(),
              "cpus": torch.get_num_threads(), "torch": torch.__version__, "device": args.device,
              "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps, "repeats": args.repeats,
              "command": " ".join(sys.argv), "rows": rows, "ratios_vs_lora": ratios}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_train.json").write_text(json.dumps(report, indent=1))
    lines = ["| method | trainable params | s/step | tokens/s | peak memory (MB) | growth in training (MB) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['method']} | failed: {r['failed']} | | | | |")
            continue
        lines.append(f"| {r['method']} | {r['trainable_params']:,} | {r['seconds_per_step']:.2f} | "
                     f"{r['tokens_per_s']:.0f} | {r[peak]:.0f} | {r[growth]:.0f} |")
    for m, v in ratios.items():
        lines.append(f"\n{m} / {v['vs']}: tokens/s x{v['tokens_per_s_ratio']:.2f}, "
                     f"peak memory x{v['peak_memory_ratio']:.2f}, growth in training x{v['training_growth_ratio']:.2f}")
    (out / "bench_train.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
