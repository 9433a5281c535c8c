"""Writing an export folder: where it may go, its config.json and provenance, tied embeddings, one atomic write.

Every format writes the same frame around its own tensors: ``model.safetensors``, ``config.json`` (the
source's, with the format's ``quantization_config``), the tokenizer files, the optional adapter and
``gift_quant_export.json`` (provenance; every loader ignores it), all in a temporary folder renamed into
place at the end, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..model.loading import parse_dtype
from ..packed.checkpoint import copy_tokenizer_files
from ..packed.ownership import check_inputs, refuse_foreign, remove_owned
from ..packed.run_folder import lock_output
from ..util.errors import GiftQuantError
from ..util.files import atomic_dir
from .adapter import ADAPTER_DIR, SalientAdapter
from .native import NativeCheckpoint

__all__ = ["EXPORT_INFO", "cast_tensors", "check_out", "dtype_name", "export_info", "files_written", "replace_earlier",
           "resolve_dtype", "tie_fixup", "write_export"]

EXPORT_INFO = "gift_quant_export.json"  # provenance of an export; every loader ignores it


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def resolve_dtype(dtype: str | torch.dtype | None, default: torch.dtype) -> torch.dtype:
    if dtype is None:
        return default
    return parse_dtype(dtype) if isinstance(dtype, str) else dtype


def check_out(out_dir: Path, ckpt: Path, overwrite: bool) -> None:
    """Refuse an export folder that is, holds or lies inside the checkpoint, that holds something else than an
    export, or an earlier export unless asked; with ``overwrite``, one that holds files the export did not write.
    The refusals come before the lock, so a refused folder gets nothing created beside it."""
    check_inputs(out_dir, {"checkpoint": ckpt}, what="export folder")
    _check_existing(out_dir, overwrite)
    # one writer per folder; the lock also removes what a killed export left (.tmp-NAME-xxxxxxxx beside it)
    lock_output(out_dir)
    _check_existing(out_dir, overwrite)


def _check_existing(out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise GiftQuantError(f"export folder {out_dir} is a file; give a folder path")
    if any(out_dir.iterdir()):
        if not (out_dir / EXPORT_INFO).is_file():
            raise GiftQuantError(f"export folder {out_dir} exists and is not a gift-quant export; choose a new folder")
        if not overwrite:
            raise GiftQuantError(f"export folder {out_dir} holds an earlier export; pass --overwrite to replace it")
        refuse_foreign(out_dir, "export folder")


def replace_earlier(out_dir: Path) -> None:
    """Just before the new export is renamed into place: remove the earlier one's files, and nothing else."""
    if out_dir.is_dir():
        remove_owned(out_dir, "export folder")
        if any(out_dir.iterdir()):
            left = ", ".join(sorted(p.name for p in out_dir.iterdir())[:4])
            raise GiftQuantError(f"export folder {out_dir} still holds {left} (not written by gift-quant); move "
                                 "them away or choose another folder")
        out_dir.rmdir()


def files_written(folder: Path) -> list[str]:
    """Every file under ``folder`` (relative, sorted) plus the export record: what --overwrite may remove."""
    return sorted({p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} | {EXPORT_INFO})


def tie_fixup(tensors: dict[str, torch.Tensor], nat: NativeCheckpoint) -> dict[str, torch.Tensor]:
    """Write tied embeddings the way ``save_pretrained`` does: input embedding kept, output dropped.

    The native file is written by safetensors' ``save_model``, which keeps whichever name of a shared
    tensor sorts first (``lm_head.weight`` for Llama); transformers looks for the input embedding.
    """
    model = nat.skeleton()
    if not getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        return tensors
    names = {id(m): n for n, m in model.named_modules()}
    inp = names[id(model.get_input_embeddings())] + ".weight"
    out_mod = model.get_output_embeddings()
    outp = names[id(out_mod)] + ".weight" if out_mod is not None else None
    tensors = dict(tensors)
    if inp not in tensors and outp in tensors:
        tensors[inp] = tensors[outp]
    if outp != inp:
        tensors.pop(outp, None)
    return tensors


def cast_tensors(tensors: dict[str, torch.Tensor], nat: NativeCheckpoint, dtype: torch.dtype,
                 keep: Collection[str] = ()) -> dict[str, torch.Tensor]:
    """Tied embeddings fixed up, floating tensors cast to ``dtype`` (except the names in ``keep``), contiguous."""
    return {k: (v.to(dtype) if v.is_floating_point() and k not in keep else v).contiguous()
            for k, v in tie_fixup(tensors, nat).items()}


def _config_json(nat: NativeCheckpoint, dtype: torch.dtype, quantization_config: dict | None) -> str:
    cfg = {k: v for k, v in nat.config.items() if k != "quantization_config"}
    # the native config records use_cache false (set while quantizing); served models want the KV cache
    if "use_cache" in cfg:
        cfg["use_cache"] = True
    cfg["dtype"] = dtype_name(dtype)
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = dtype_name(dtype)
    if quantization_config is not None:
        cfg["quantization_config"] = quantization_config
    return json.dumps(cfg, indent=2)


def export_info(nat: NativeCheckpoint, fmt: str, summary: dict, files: list[str] | None = None) -> str:
    info = {"files_written": files or [], "format": fmt, "source_checkpoint": str(nat.path.resolve()),
            "tool": nat.doc.get("tool"),
            "version": nat.doc.get("version"), "native_effective_bits": nat.doc.get("effective_bits"),
            "salient_per_layer": {n: q.n_salient for n, q in nat.layers.items()},
            "provenance": nat.doc.get("provenance"), "spec": nat.spec.to_json(), "quantize": nat.doc.get("quantize"),
            **{k: v for k, v in summary.items() if k not in ("out", "format")}}
    return json.dumps(info, indent=1, default=str)


def write_export(out_dir: Path, nat: NativeCheckpoint, summary: dict, tensors: dict[str, torch.Tensor],
                 dtype: torch.dtype, quantization_config: dict | None = None, extra_files: dict[str, str] | None = None,
                 adapter: SalientAdapter | None = None, targets: list[str] | None = None) -> None:
    """Write the export folder ``out_dir`` atomically; ``summary["format"]`` names the format."""
    need = sum(t.numel() * t.element_size() for t in tensors.values())
    with atomic_dir(out_dir, need_bytes=need) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        (tmp / "config.json").write_text(_config_json(nat, dtype, quantization_config))
        copy_tokenizer_files(nat.path, tmp)
        if adapter is not None:
            adapter.write(tmp / ADAPTER_DIR, targets)
        (tmp / EXPORT_INFO).write_text(export_info(nat, summary["format"], summary, files_written(tmp)))
        replace_earlier(out_dir)
