"""Batch-1 greedy decode speed and peak memory: full precision vs gift-quant's packed model vs llama.cpp.

Each model runs in its own fresh subprocess (so peak memory is its own) with the same thread count, the
same prompt token ids and the same greedy loop: one prefill, then N single-token steps with the KV
cache, timed without the prefill. Models:

* ``fp32``: the full-precision model folder through ``gift_quant.load`` (plain transformers);
* ``ckpt:PATH``: a gift-quant checkpoint through ``gift_quant.load`` (packed layers, dequantized once
  per layer and cached on first use: qlinear.py);
* ``lean:PATH``: the same through ``gift_quant.load(PATH, dense_cache=False)`` (only the packed buffers are
  kept; each layer is dequantized into a temporary at every forward pass);
* ``gguf:DIR``: a ``gift-quant export --format gguf`` folder under llama.cpp (llama-cpp-python, the
  ``[cpu-serve]`` extra), base + salient LoRA, float16 KV cache (llama.cpp's default).

    python tools/bench_decode.py --model fp32 --model ckpt:runs/w3 --model ckpt:runs/w4 --model gguf:runs/w4-gguf \\
        --threads 1 --tokens 64 --repeats 3 --out results/bench_decode/bench_decode.json

Prints a table (tokens/s, ratio to fp32, peak RSS, RSS added by loading) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

PROMPT = ("The President spoke to the Congress about the state of the economy, the budget and the "
          "challenges the nation faces in the years ahead. He said that")


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def _prompt_ids(model_dir: str) -> list[int]:
    import gift_quant

    return gift_quant.load_tokenizer(model_dir)(PROMPT)["input_ids"]


def _torch_decode(path: str, ids: list[int], tokens: int, repeats: int, dense_cache: bool = True
                  ) -> tuple[list[float], list[int]]:
    import torch

    import gift_quant

    model = gift_quant.load(path, dense_cache=dense_cache)
    times, out = [], []
    with torch.no_grad():
        for _ in range(repeats):
            res = model(torch.tensor([ids]), use_cache=True)
            past, tok, out = res.past_key_values, int(res.logits[0, -1].argmax()), []
            t0 = time.perf_counter()
            for _ in range(tokens):
                out.append(tok)
                res = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
                past, tok = res.past_key_values, int(res.logits[0, -1].argmax())
            times.append(time.perf_counter() - t0)
    return times, out


def _llama_cpp_decode(folder: str, ids: list[int], tokens: int, repeats: int, threads: int):
    import llama_cpp
    import numpy as np

    from gift_quant.export.gguf import LORA_FILE, MODEL_FILE

    default = llama_cpp.llama_cpp.llama_model_default_params

    def no_extra_bufts():  # llama.cpp's AMX repacking can crash on AMX CPUs (tests/test_export_gguf_llama.py)
        p = default()
        p.use_extra_bufts = False
        return p

    llama_cpp.llama_cpp.llama_model_default_params = no_extra_bufts
    try:
        lora = Path(folder) / LORA_FILE
        llm = llama_cpp.Llama(model_path=str(Path(folder) / MODEL_FILE),
                              lora_path=str(lora) if lora.is_file() else None, n_ctx=512, n_batch=512,
                              n_ubatch=512, logits_all=True, n_threads=threads, n_threads_batch=threads, verbose=False)
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = default
    times, out = [], []
    for _ in range(repeats):
        llm.reset()
        llm.eval(ids)
        tok, out = int(np.argmax(llm.scores[llm.n_tokens - 1])), []
        t0 = time.perf_counter()
        for _ in range(tokens):
            out.append(tok)
            llm.eval([tok])
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        times.append(time.perf_counter() - t0)
    return times, out


def worker(spec: str, tokenizer_dir: str, threads: int, tokens: int, repeats: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    ids = _prompt_ids(tokenizer_dir)
    before = _rss_mb()
    kind, _, path = spec.partition(":")
    if kind == "gguf":
        times, out = _llama_cpp_decode(path, ids, tokens, repeats, threads)
    else:
        times, out = _torch_decode(path or tokenizer_dir, ids, tokens, repeats, dense_cache=kind != "lean")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"model": spec, "tokens_per_s": tokens / statistics.median(times), "seconds": times,
            "peak_rss_mb": peak, "loaded_rss_mb": peak - before, "greedy_ids": out}


def run(specs: list[str], tokenizer_dir: str, threads: int, tokens: int, repeats: int) -> list[dict]:
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for spec in specs:
        cmd = [sys.executable, __file__, "--worker", spec, "--tokenizer", tokenizer_dir, "--threads", str(threads),
               "--tokens", str(tokens), "--repeats", str(repeats)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            rows.append({"model": spec, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]})
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    fp = next((r for r in rows if r["model"] == "fp32" and "error" not in r), None)
    for r in rows:
        if fp and "error" not in r:
            r["speed_vs_fp32"] = r["tokens_per_s"] / fp["tokens_per_s"]
            r["same_greedy_as_fp32_tokens"] = next(
                (i for i, (a, b) in enumerate(zip(r["greedy_ids"], fp["greedy_ids"])) if a != b), tokens)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | decode tokens/s | vs fp32 | peak RSS (MB) | RSS added by the model (MB) |",
             "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | failed: {r['error']} | | | |")
            continue
        lines.append(f"| {r['model']} | {r['tokens_per_s']:.1f} | x{r.get('speed_vs_fp32', float('nan')):.2f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['loaded_rss_mb']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", default=[], help="fp32, ckpt:PATH, lean:PATH or gguf:DIR (repeatable)")
    ap.add_argument("--tokenizer", default=None, help="folder with the tokenizer (default: the default model)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.tokenizer is None:
        from gift_quant.model.loading import resolve_model_dir

        a.tokenizer = str(resolve_model_dir(None))
    if a.worker:
        print(json.dumps(worker(a.worker, a.tokenizer, a.threads, a.tokens, a.repeats)))
        return 0
    rows = run(a.model or ["fp32"], a.tokenizer, a.threads, a.tokens, a.repeats)
    print(table(rows))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        doc = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
               "threads": a.threads, "tokens": a.tokens, "repeats": a.repeats, "rows": rows}
        a.out.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
