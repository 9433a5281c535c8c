"""The exact ``vllm serve`` command for an export folder, from what ``inspect`` read (pure, no vLLM needed).

What vLLM serves, as of the releases the export targets (the reasons are in docs/serving.md):

* compressed-tensors ``pack-quantized`` bases at 2-8 bits (its WNA16 path), zero points at 4 and 8 bits;
* GPTQ bases only at 4 and 8 bits, symmetric, through Marlin (2/3-bit GPTQ is refused:
  vllm-project/vllm#38288, superseded by compressed-tensors);
* LoRA adapters on quantized bases up to rank 512 (``--max-lora-rank`` takes 8 ... 512, see
  ``export.adapter.LORA_RANKS``).

``vllm_command(info)`` returns ``(command or None, note)``: no command when vLLM cannot serve the folder,
and the note says why and what to do.
"""

from __future__ import annotations

VLLM_MAX_LORA_RANK = 512
ADAPTER_NAME = "salient"  # the name clients request to get base + salient columns


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


def vllm_command(info: dict) -> tuple[str | None, str]:
    """(the ``vllm serve`` command line, a note) for an ``inspect_checkpoint`` dict."""
    kind, bits = info.get("kind", ""), info.get("bits")
    if kind.startswith("compressed-tensors"):
        quant = "compressed-tensors"
        note = ""
        if not info.get("sym") and bits not in (4, 8):
            note = f"asymmetric {bits}-bit: vLLM's WNA16 scheme takes zero points at 4 and 8 bits only; "
    elif kind.startswith("gptq"):
        if bits not in (4, 8):
            return None, (f"vLLM serves GPTQ only at 4 and 8 bits (vllm-project/vllm#38288); export this "
                          f"{bits}-bit checkpoint with --format compressed-tensors for vLLM")
        quant, note = ("gptq_marlin", "") if info.get("sym") else ("gptq", "asymmetric GPTQ misses Marlin; ")
    elif kind == "dense":
        return f"vllm serve {info['path']}", "an ordinary model folder"
    else:
        return None, "a native gift-quant checkpoint: export it first (gift-quant export CKPT --out DIR)"
    lora, refusal = _lora_flags(info)
    if refusal:
        return None, refusal
    cmd = " ".join(["vllm serve", info["path"], "--quantization", quant, *lora])
    ask = f"request model '{ADAPTER_NAME}' for the recovered model" if lora else "no adapter"
    return cmd, note + ask
