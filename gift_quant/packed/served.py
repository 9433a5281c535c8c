"""An export folder as a server runs it: what it is, its bits as stored, and its base plus adapter loaded.

``gift-quant export`` writes a quantized base (GPTQ or compressed-tensors) whose salient columns ride in
a PEFT LoRA adapter (``adapter/``), a merged dense folder, or GGUF files. ``eval`` must score what a
server would serve, so ``load_served`` loads the base with its real client (transformers with
gptqmodel or compressed-tensors) and applies the adapter with peft; a folder it cannot score faithfully
(GGUF: llama.cpp is not a Python dependency; a quantization method gift-quant does not write; an
export whose adapter is missing) is refused with the reason. ``stored_bits`` counts every stored bit of
the quantized linears (codes, scales, zeros, indices, the padded LoRA A and B) per weight: the bits a
server holds, which ``inspect`` reports too (export/inspection.py reads the same rows).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from ..util.errors import GiftQuantError

__all__ = ["EXPORT_INFO", "adapter_rows", "ct_layers", "dense_bits", "gptq_layers", "load_served",
           "quantization_method", "served_kind", "stored_bits", "tensor_headers"]

EXPORT_INFO = "gift_quant_export.json"  # export/folder.py's provenance record
ADAPTER_DIR = "adapter"
DTYPE_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U8": 8,
              "BOOL": 8, "F8_E4M3": 8, "F8_E5M2": 8, "U16": 16, "U32": 32, "U64": 64}


def _json(path: Path) -> dict | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise GiftQuantError(f"{path} is not valid JSON ({str(exc).splitlines()[0][:120]}): the folder is damaged "
                             "(truncated or edited); re-create it") from None
    return doc if isinstance(doc, dict) else None


def tensor_headers(files: list[Path]) -> dict[str, tuple[str, list[int]]]:
    """name -> (safetensors dtype, shape), from the file headers only."""
    from safetensors import safe_open

    out = {}
    for f in files:
        try:
            with safe_open(f, "pt") as h:
                for k in h.keys():
                    s = h.get_slice(k)
                    out[k] = (s.get_dtype(), list(s.get_shape()))
        except Exception as exc:  # SafetensorError: truncated, empty, not safetensors
            raise GiftQuantError(f"{f} cannot be read ({str(exc).splitlines()[0][:160] if str(exc) else 'empty'}); "
                                 "the folder is damaged: re-create it") from None
    return out


def _bits(dtype: str, shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * DTYPE_BITS.get(dtype, 32)


def adapter_rows(path: Path) -> tuple[dict | None, dict[str, int], dict[str, int]]:
    """(adapter_config, salient count per module = non-zero rows of lora_A, stored bits per module)."""
    from safetensors import safe_open

    adapter_dir = Path(path) / ADAPTER_DIR
    acfg = _json(adapter_dir / "adapter_config.json")
    a_rows: dict[str, int] = {}
    adapter_bits: dict[str, int] = {}
    if acfg is not None:
        for f in sorted(adapter_dir.glob("*.safetensors")):
            tensor_headers([f])  # a damaged adapter file: one line naming it
            with safe_open(f, "pt") as h:
                for k in h.keys():
                    mod = k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
                    s = h.get_slice(k)
                    adapter_bits[mod] = adapter_bits.get(mod, 0) + _bits(s.get_dtype(), s.get_shape())
                    if ".lora_A." in k:
                        a_rows[mod] = int((h.get_tensor(k) != 0).any(dim=1).sum())
    return acfg, a_rows, adapter_bits


def gptq_layers(path: Path, adapter_bits: dict[str, int], a_rows: dict[str, int]) -> list[dict]:
    """One row per GPTQ linear: in/out features, groups, salient count, stored bits per weight (adapter included)."""
    headers = tensor_headers(sorted(Path(path).glob("*.safetensors")))
    rows = []
    for k, (_, shape) in sorted(headers.items()):
        if not k.endswith(".qweight"):
            continue
        name = k.removesuffix(".qweight")
        g = headers.get(f"{name}.g_idx")
        out_f, in_f = shape[1], (g[1][0] if g else None)
        stored = sum(_bits(*headers[f"{name}.{s}"]) for s in ("qweight", "qzeros", "scales", "g_idx")
                     if f"{name}.{s}" in headers) + adapter_bits.get(name, 0)
        rows.append({"name": name, "in_features": in_f, "out_features": out_f,
                     "groups": headers[f"{name}.scales"][1][0] if f"{name}.scales" in headers else None,
                     "salient": a_rows.get(name, 0), "effective_bits": stored / (in_f * out_f) if in_f else None})
    return rows


def ct_layers(path: Path, adapter_bits: dict[str, int], a_rows: dict[str, int]) -> list[dict]:
    """One row per compressed-tensors linear (shapes from its ``weight_shape`` tensor), as ``gptq_layers``."""
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    headers = tensor_headers(files)
    shapes: dict[str, list[int]] = {}
    for f in files:
        with safe_open(f, "pt") as h:
            for k in h.keys():
                if k.endswith(".weight_shape"):
                    shapes[k.removesuffix(".weight_shape")] = [int(v) for v in h.get_tensor(k).tolist()]
    rows = []
    for name, shape in sorted(shapes.items()):
        out_f, in_f = shape[-2], shape[-1]
        stored = sum(_bits(*headers[f"{name}.{s}"]) for s in ("weight_packed", "weight_scale", "weight_zero_point",
                                                              "weight_shape") if f"{name}.{s}" in headers)
        stored += adapter_bits.get(name, 0)
        scale = headers.get(f"{name}.weight_scale")
        rows.append({"name": name, "in_features": in_f, "out_features": out_f,
                     "groups": scale[1][-1] if scale else None, "salient": a_rows.get(name, 0),
                     "effective_bits": stored / (in_f * out_f) if in_f * out_f else None})
    return rows


def stored_bits(rows: list[dict]) -> float | None:
    """Stored bits per weight over the quantized linears, weighted by their sizes."""
    rows = [r for r in rows if r["in_features"] and r["effective_bits"] is not None]
    n = sum(r["in_features"] * r["out_features"] for r in rows)
    return sum(r["effective_bits"] * r["in_features"] * r["out_features"] for r in rows) / n if n else None


def quantization_method(path: Path) -> str | None:
    """``gptq``, ``compressed-tensors``, another method's name, or None for an unquantized folder."""
    qc = _json(Path(path) / "quantize_config.json")
    if qc is None:
        qc = (_json(Path(path) / "config.json") or {}).get("quantization_config")
    if not isinstance(qc, dict):
        return None
    return str(qc.get("quant_method", "gptq" if "bits" in qc else "unknown")).lower()


def served_kind(path: Path) -> str | None:
    """What ``eval`` scores in ``path`` when it is an export or a quantized folder (None: a plain model folder);
    refuses, with the reason, what it cannot score faithfully. Loads nothing."""
    path = Path(path)
    info = _json(path / EXPORT_INFO) or {}
    if info.get("format") == "gguf" or any(path.glob("*.gguf")):
        source = info.get("source_checkpoint")
        raise GiftQuantError(f"{path} is a GGUF export, which llama.cpp serves (not a Python dependency of "
                             "gift-quant): score it with llama.cpp's llama-perplexity, or eval the native checkpoint "
                             f"it was exported from{f' ({source})' if source else ''}, whose codes it holds exactly")
    method = quantization_method(path)
    if method is None:
        return "dense export (merged)" if info.get("format") == "dense" else None
    if method not in ("gptq", "compressed-tensors"):
        raise GiftQuantError(f"{path}/config.json: quantization_config.quant_method {method!r} is not a format "
                             "gift-quant writes or evaluates faithfully; eval takes gift-quant checkpoints, their "
                             "gptq-lora / compressed-tensors / dense exports, and full-precision model folders")
    salient = sum((info.get("salient_per_layer") or {}).values())
    has_adapter = (path / ADAPTER_DIR / "adapter_config.json").is_file()
    if salient and not has_adapter:
        raise GiftQuantError(f"{path}/{ADAPTER_DIR}/adapter_config.json is missing: this export keeps {salient} "
                             "salient columns in its adapter, and the base without it is not the model; restore "
                             "adapter/ or export again")
    return f"{method} export" + (" + salient LoRA adapter" if has_adapter else "")


def _load_base(path: Path, method: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    try:
        if method == "compressed-tensors":
            import compressed_tensors  # noqa: F401  (the client transformers needs for this format)
            from transformers import CompressedTensorsConfig

            # decompressed at load: peft attaches the adapter to a module with a weight, as servers apply it
            kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)}
        else:
            import gptqmodel  # noqa: F401
            from transformers import GPTQConfig

            bits = (_json(path / "quantize_config.json") or {}).get("bits")
            kw = {"quantization_config": GPTQConfig(bits=bits, backend="torch"), "device_map": "cpu"}
    except ImportError as exc:
        raise GiftQuantError(f"{path} is a {method} export; scoring it needs its client: pip install "
                             f"'gift-quant[peers]' ({exc})") from None
    with warnings.catch_warnings():  # "you passed quantization_config ... attributes will be overwritten"
        warnings.simplefilter("ignore", UserWarning)
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)


def load_served(path: Path, dtype: torch.dtype = torch.float32, device="cpu"):
    """(model as a server runs it, stored bits per weight, description) of an export folder."""
    path = Path(path)
    kind = served_kind(path)
    method = quantization_method(path)
    acfg, a_rows, adapter_bits = adapter_rows(path)
    rows = gptq_layers(path, adapter_bits, a_rows) if method == "gptq" else ct_layers(path, adapter_bits, a_rows)
    try:
        model = _load_base(path, method, dtype)
        if acfg is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(path / ADAPTER_DIR))
    except GiftQuantError:
        raise
    except Exception as exc:  # transformers / peft / the kernel package on a folder they cannot read
        raise GiftQuantError(f"{path} could not be loaded as a {method} export ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:160] if str(exc) else ''}); export it again") from None
    model.eval()
    model.config.use_cache = True
    return model.to(device), stored_bits(rows), kind


def dense_bits(path: Path) -> float | None:
    """Bits per weight of a plain folder as stored: its floating tensors' bits, weighted by their sizes."""
    headers = tensor_headers(sorted(Path(path).glob("*.safetensors")))
    floating = [(d, s) for d, s in headers.values() if d in ("F64", "F32", "F16", "BF16")]
    n = sum(_bits("U8", s) // 8 for _, s in floating)
    return sum(_bits(d, s) for d, s in floating) / n if n else None
