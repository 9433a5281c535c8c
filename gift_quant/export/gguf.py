"""GGUF export for llama.cpp (CPU serving): the quantized base as Q4_0 / Q8_0 / Q4_1 blocks plus a LoRA GGUF.

``DIR/model.gguf`` holds the model: the packed layers as GGUF blocks copied bit for bit from the stored
codes and scales (``gguf_blocks.py`` says which grids map exactly; the rest is refused), the other
tensors unquantized, the Llama hyper-parameters and the tokenizer (``gguf_vocab.py``).
``DIR/salient-lora.gguf`` adds the salient columns back: llama.cpp applies a LoRA adapter at run time on
top of any base type (``W x + scale * B (A x)`` beside each matmul), so the one-hot adapter of
``adapter.py`` works unchanged: ``A`` (r x in) selects the salient inputs, ``B`` (out x r) holds the
salient columns, ``alpha = r`` makes llama.cpp's ``alpha / rank`` scale 1. Both files are float32 where
not quantized, so the export is exact: llama.cpp's only differences are its kernels' rounding.

Llama only (SmolLM2 and the Llama family) with default RoPE, for now. For Llama, llama.cpp expects the
Q and K projections with each head's rows interleaved (``gguf_blocks.rope_row_order``); rows only, so
blocks are moved whole, and the adapter's ``B`` rows (and Q/K biases) move with them.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFWriter, LlamaFileType

from ..util.errors import GiftQuantError
from ..util.files import atomic_dir
from .adapter import SalientAdapter, onehot_lora
from .folder import (
    EXPORT_INFO,
    check_out,
    dtype_name,
    export_info,
    files_written,
    replace_earlier,
    resolve_dtype,
    tie_fixup,
)
from .gguf_blocks import gguf_layer, rope_row_order
from .gguf_vocab import read_vocab, write_vocab
from .native import NativeCheckpoint

__all__ = ["ARCH", "LORA_FILE", "MODEL_FILE", "export_gguf", "gguf_name", "llama_hparams"]

ARCH = "llama"
MODEL_FILE = "model.gguf"
LORA_FILE = "salient-lora.gguf"
_FILE_TYPE = {QT.Q4_0: LlamaFileType.MOSTLY_Q4_0, QT.Q4_1: LlamaFileType.MOSTLY_Q4_1,
              QT.Q8_0: LlamaFileType.MOSTLY_Q8_0}
_BLOCK_PARTS = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down"}
_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_name(hf: str) -> str:
    """llama.cpp's tensor name for a Hugging Face Llama tensor name (``.weight`` / ``.bias`` kept)."""
    module, _, kind = hf.rpartition(".")
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", module)
    part = _BLOCK_PARTS.get(m.group(2)) if m else _TOP.get(module)
    if part is None or kind not in ("weight", "bias"):
        raise GiftQuantError(f"tensor {hf} has no place in llama.cpp's llama graph; --format gguf writes plain "
                             "Llama models only (use --format compressed-tensors or dense)")
    return f"blk.{m.group(1)}.{part}.{kind}" if m else f"{part}.{kind}"


def llama_hparams(nat: NativeCheckpoint) -> dict:
    """The hyper-parameters llama.cpp's llama graph needs, or a refusal for what it would compute differently."""
    c = nat.config
    if c.get("model_type") != "llama":
        raise GiftQuantError(f"{nat.path} is a {c.get('model_type')!r} model; --format gguf writes Llama-family "
                             "models (SmolLM2, Llama) only for now: use --format compressed-tensors or dense")
    rope = c.get("rope_scaling") or c.get("rope_parameters") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise GiftQuantError(f"{nat.path}: RoPE scaling {rope.get('rope_type', rope.get('type'))!r} is not written "
                             "by --format gguf yet; use --format compressed-tensors or dense")
    heads = c["num_attention_heads"]
    return {"heads": heads, "kv_heads": c.get("num_key_value_heads") or heads, "hidden": c["hidden_size"],
            "head_dim": c.get("head_dim") or c["hidden_size"] // heads, "blocks": c["num_hidden_layers"],
            "ff": c["intermediate_size"], "context": c["max_position_embeddings"], "eps": c["rms_norm_eps"],
            "theta": c.get("rope_theta") or rope.get("rope_theta", 10000.0), "vocab": c["vocab_size"]}


def _add_hparams(w: GGUFWriter, hp: dict) -> None:
    w.add_context_length(hp["context"])
    w.add_embedding_length(hp["hidden"])
    w.add_block_count(hp["blocks"])
    w.add_feed_forward_length(hp["ff"])
    w.add_head_count(hp["heads"])
    w.add_head_count_kv(hp["kv_heads"])
    w.add_rope_freq_base(float(hp["theta"]))
    w.add_layer_norm_rms_eps(float(hp["eps"]))
    w.add_vocab_size(hp["vocab"])
    w.add_rope_dimension_count(hp["head_dim"])
    if hp["head_dim"] * hp["heads"] != hp["hidden"]:  # llama.cpp assumes hidden / heads otherwise
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])


def _rope_rows(name: str, hp: dict) -> torch.Tensor | None:
    """The row order llama.cpp wants for this tensor (Q and K only), None for every other tensor."""
    if ".attn_q." in name:
        return rope_row_order(hp["heads"] * hp["head_dim"], hp["heads"])
    if ".attn_k." in name:
        return rope_row_order(hp["kv_heads"] * hp["head_dim"], hp["kv_heads"])
    return None


def _plain(name: str, t: torch.Tensor, hp: dict, dtype: torch.dtype) -> np.ndarray:
    """An unquantized tensor: 1-D ones (norms, biases) in float32, as llama.cpp's graph adds them; 2-D in dtype."""
    perm = _rope_rows(name, hp)
    t = t[perm] if perm is not None else t
    return t.to(dtype if t.dim() > 1 else torch.float32).numpy()


def _base_tensors(nat: NativeCheckpoint, hp: dict, dtype: torch.dtype, adapter: SalientAdapter | None):
    """GGUF name -> (array, raw type or None) for every tensor; the adapter gets each layer's salient columns.

    ``adapter`` None: the merged model in float32 (salient columns inside the weights), the reference
    that separates llama.cpp's kernel rounding from format errors.
    """
    out, types = {}, set()
    for hf, t in tie_fixup(nat.other_tensors(), nat).items():
        if not hf.endswith("rotary_emb.inv_freq"):
            out[gguf_name(hf)] = (_plain(gguf_name(hf), t.float(), hp, dtype), None)
    for hf, q in nat.layers.items():
        name = gguf_name(f"{hf}.weight")
        perm = _rope_rows(name, hp)
        if adapter is None:
            w = q.dense_weight(torch.float32)
            out[name] = ((w[perm] if perm is not None else w).numpy(), None)
        else:
            blocks = gguf_layer(hf, q)
            if perm is not None:
                blocks.d, blocks.q = blocks.d[perm], blocks.q[perm]
                blocks.m = blocks.m[perm] if blocks.m is not None else None
            out[name] = (blocks.to_bytes(), blocks.qtype)
            types.add(blocks.qtype)
            inv = torch.argsort(perm) if perm is not None else None  # the adapter wants HF's row order back
            base = blocks.dequantized()[:, q.salient_idx.long()]
            adapter.add(name, q, base[inv] if inv is not None else base)
        if q.bias is not None:
            out[gguf_name(f"{hf}.bias")] = (_plain(name, q.bias.float(), hp, dtype), None)
    return out, types


def _write(path: Path, w: GGUFWriter, tensors: dict) -> None:
    for name, (arr, raw) in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(arr), raw_dtype=raw)
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _lora_tensors(adapter: SalientAdapter, hp: dict) -> dict:
    """``<name>.lora_a`` (r, in) and ``.lora_b`` (out, r) float32, B's rows in llama.cpp's Q/K order."""
    out = {}
    for name, (idx, delta, in_features) in adapter.columns.items():
        if not idx.numel():  # no salient columns: nothing to add back
            continue
        a, b = onehot_lora(idx, delta, in_features, adapter.r)
        perm = _rope_rows(name, hp)
        out[f"{name}.lora_a"] = (a.numpy(), None)
        out[f"{name}.lora_b"] = ((b[perm] if perm is not None else b).numpy(), None)
    return out


def _model_writer(nat: NativeCheckpoint, hp: dict, file_type: int) -> GGUFWriter:
    w = GGUFWriter(None, ARCH)
    w.add_type("model")
    w.add_name(f"{nat.path.name} (gift-quant)")
    w.add_file_type(int(file_type))
    w.add_quantization_version(2)  # ggml's current block layout version (GGML_QNT_VERSION)
    _add_hparams(w, hp)
    write_vocab(w, read_vocab(nat.path, hp["vocab"]))
    return w


def _lora_writer(r: int) -> GGUFWriter:
    w = GGUFWriter(None, ARCH)
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(r))  # llama.cpp scales B A x by alpha / rank = 1
    return w


def _commands(out_dir: Path, lora: bool) -> dict[str, str]:
    extra = f" --lora {out_dir / LORA_FILE}" if lora else ""
    return {tool: f"{tool} -m {out_dir / MODEL_FILE}{extra}" for tool in ("llama-cli", "llama-server")}


def export_gguf(ckpt: str | Path, out_dir: str | Path, dtype: str | torch.dtype | None = None,
                overwrite: bool = False, merged: bool = False) -> dict:
    """``out_dir/model.gguf`` + ``out_dir/salient-lora.gguf`` for llama.cpp; returns a summary.

    ``dtype``: of the embedding and output matrices, float32 (default: every stored value is exact in it,
    and llama.cpp keeps float32 activations for float32 weights) or float16 (half the size; the values
    are rounded, with a warning). ``merged``: one float32 model.gguf with the salient columns merged in
    and no adapter (large; the reference the tests compare llama.cpp's quantized kernels with).
    """
    nat = NativeCheckpoint(ckpt)
    out_dir = Path(out_dir)
    dtype = resolve_dtype(dtype, torch.float32)
    if dtype not in (torch.float32, torch.float16):
        raise GiftQuantError(f"--dtype {dtype_name(dtype)}: --format gguf stores embeddings as float32 or float16")
    if not nat.layers:
        raise GiftQuantError(f"{nat.path} has no quantized layers to export")
    hp = llama_hparams(nat)
    check_out(out_dir, nat.path, overwrite)
    adapter = None if merged else SalientAdapter(max(nat.max_salient, 1), nat.salient_dtype)
    tensors, types = _base_tensors(nat, hp, dtype, adapter)
    qtype = next(iter(types)) if len(types) == 1 else None
    lora = adapter is not None and nat.max_salient > 0
    warnings = []
    if dtype == torch.float16:
        warnings.append("embeddings stored in float16: rounded from the checkpoint's values (--dtype float32 is exact)")
    summary = {"out": str(out_dir), "format": "gguf", "bits": nat.bits, "sym": nat.sym,
               "group_size": nat.group_size if nat.group_size > 0 else -1,
               "ggml_type": qtype.name if qtype else "F32", "merged": merged, "embedding_dtype": dtype_name(dtype),
               "files": [MODEL_FILE] + ([LORA_FILE] if lora else []), "lora_rank": adapter.r if lora else 0,
               "max_salient": nat.max_salient, "commands": _commands(out_dir, lora), "warnings": warnings}
    with atomic_dir(out_dir) as tmp:
        _write(tmp / MODEL_FILE, _model_writer(nat, hp, _FILE_TYPE.get(qtype, LlamaFileType.ALL_F32)), tensors)
        if lora:
            _write(tmp / LORA_FILE, _lora_writer(adapter.r), _lora_tensors(adapter, hp))
        (tmp / EXPORT_INFO).write_text(export_info(nat, "gguf", summary, files_written(tmp)))
        replace_earlier(out_dir)
    return summary
