"""What gift-quant wrote in an output folder, so that ``--overwrite`` removes that and nothing else.

A file is gift-quant's when its path inside ``--out`` is one its writers produce: the names an export's
record (``gift_quant_export.json``, ``files``) lists, or, for the outputs of ``quantize``/``recover``/
``finetune``, the names of the checkpoint and its manifest (weights, ``config.json``, the copied tokenizer
files, ``gift_quant_config.json``), the summaries, and the run record's own layout under ``run/``
(``RUN_LAYOUT``: stage checkpoints, per-block results, training state). Names rather than a log of
writes, so a run killed between writing a file and recording it still owns it. Anything else (a file
the user added, a symlink, a folder gift-quant never makes) is not ours: ``--overwrite`` refuses, listing
a few, and removes nothing. Symlinks are never followed.

``check_inputs`` refuses an ``--out`` that is, contains or lies inside one of the command's inputs
(model folder, checkpoint, data file or folder, recipe), before anything is created.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from pathlib import Path

from ..util.errors import GiftQuantError, writing

__all__ = ["check_file_target", "check_inputs", "data_input", "foreign_files", "owned_files", "refuse_foreign",
           "remove_owned"]

EXPORT_INFO = "gift_quant_export.json"  # export/folder.py's record (repeated: export sits above packed)
_TOKENIZER = ("tokenizer*", "special_tokens_map.json", "vocab.*", "merges.txt", "chat_template*", "*.model",
              "added_tokens.json")  # checkpoint.copy_tokenizer_files' patterns
_HF_WEIGHTS = (r"model\.safetensors", r"model-\d{5}-of-\d{5}\.safetensors", r"model\.safetensors\.index\.json",
               r"config\.json", r"generation_config\.json")
_ADAPTER = r"adapter/(adapter_config\.json|adapter_model\.safetensors|README\.md)"
# top-level names of a quantize / recover / finetune output (besides the tokenizer files and run/)
OUTPUT_LAYOUT = (*_HF_WEIGHTS, r"gift_quant_config\.json", r"summary\.(json|md)", r"finetune_summary\.json", _ADAPTER)
# names under run/ (run_folder.py, quant/engine.py, recover/loop.py, workflows/)
_STATE = r"(recover|train)/(metrics\.jsonl|state/(trainable\.safetensors|optimizer\.pt|scheduler\.json|rng\.pt|" \
         r"step\.json|sha256\.json))"
RUN_LAYOUT = (r"(run|stages|files)\.json", r"salient\.(safetensors|tmp)",
              r"blocks/block_\d{3}\.(safetensors|json|tmp)", r"sensitivity/block_\d{3}\.(safetensors|tmp)", _STATE,
              *(rf"(quantized|recovered|start)/{n}" for n in (*_HF_WEIGHTS, r"gift_quant_config\.json")),
              *(rf"trained/{n}" for n in _HF_WEIGHTS))
# an export folder, when its record predates the ``files`` list
EXPORT_LAYOUT = (*_HF_WEIGHTS, r"quantize_config\.json", r"model\.gguf", r"salient-lora\.gguf", _ADAPTER,
                 re.escape(EXPORT_INFO))


def _temporary(name: str) -> bool:
    """The temporary names of gift-quant's atomic writes: ``.tmp-*`` folders, ``.NAME.xxxxxxxx``, ``.NAME.tmp``."""
    return name.startswith(".tmp-") or bool(re.fullmatch(r"\.[^/]+\.([a-z0-9_]{8}|tmp)", name))


def _matches(rel: str, patterns) -> bool:
    return any(re.fullmatch(p, rel) for p in patterns)


def _tokenizer_file(rel: str) -> bool:
    return "/" not in rel and any(fnmatch.fnmatch(rel, p) for p in _TOKENIZER)


def _ours_in_run(rel: str) -> bool:
    """``rel``: a path under run/ (stage checkpoints nest their own run/: ``quantized/run/blocks/...``)."""
    for stage in ("quantized/run/", "recovered/run/", "start/run/"):
        if rel.startswith(stage):
            return _ours_in_run(rel[len(stage):])
    head, _, tail = rel.partition("/")
    if head in ("quantized", "recovered", "trained", "start") and _tokenizer_file(tail):
        return True
    return _matches(rel, RUN_LAYOUT)


def _copied_record(out: Path) -> set[str] | None:
    """The tokenizer files a finished output names as copied (its checkpoint config or finetune summary);
    None when it names none (unfinished, or written by an older gift-quant): then their patterns decide."""
    for name in ("gift_quant_config.json", "finetune_summary.json"):
        try:
            copied = json.loads((out / name).read_text(encoding="utf-8")).get("copied_files")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(copied, list):
            return {c for c in copied if isinstance(c, str)}
    return None


def _export_record(out: Path) -> list[str] | None:
    try:
        files = json.loads((out / EXPORT_INFO).read_text(encoding="utf-8")).get("files_written")
    except (OSError, ValueError, AttributeError):
        return None
    return [f for f in files if isinstance(f, str)] if isinstance(files, list) else None


def owned_files(out: Path) -> tuple[list[Path], list[Path]]:
    """(gift-quant's files in ``out``, everything else: files, symlinks and other entries), walking without
    following symlinks. A ``.tmp-*`` folder is ours whole (an atomic write that never reached its rename)."""
    out = Path(out)
    export = (out / EXPORT_INFO).is_file()
    record = set(_export_record(out) or ()) | {EXPORT_INFO} if export else None
    copied = None if export else _copied_record(out)
    ours, other = [], []
    for root, dirs, files in os.walk(out, followlinks=False):
        here = Path(root)
        for d in list(dirs):
            p = here / d
            if p.is_symlink():  # os.walk lists a symlinked folder among the folders; it is never ours
                other.append(p)
                dirs.remove(d)
            elif d.startswith(".tmp-"):
                ours.append(p)
                dirs.remove(d)
        for name in files:
            p = here / name
            rel = p.relative_to(out).as_posix()
            if p.is_symlink() or not p.is_file():
                other.append(p)
            elif _temporary(name):
                ours.append(p)
            elif export:
                ok = rel in record if record != {EXPORT_INFO} else _matches(rel, EXPORT_LAYOUT) or _tokenizer_file(rel)
                (ours if ok else other).append(p)
            elif rel.startswith("run/"):
                (ours if _ours_in_run(rel[4:]) else other).append(p)
            else:
                tokenizer = _tokenizer_file(rel) and (copied is None or rel in copied)
                (ours if _matches(rel, OUTPUT_LAYOUT) or tokenizer else other).append(p)
    return ours, other


def foreign_files(out: Path) -> list[Path]:
    return owned_files(out)[1]


def _listing(paths: list[Path], out: Path, n: int = 4) -> str:
    names = [p.relative_to(out).as_posix() for p in sorted(paths)[:n]]
    more = f" and {len(paths) - n} more" if len(paths) > n else ""
    return ", ".join(names) + more


def refuse_foreign(out: Path, what: str = "--out") -> list[Path]:
    """Refuse an ``out`` holding anything gift-quant did not write, naming a few; else gift-quant's files in it."""
    ours, other = owned_files(Path(out))
    if other:
        raise GiftQuantError(f"{what} {out} holds {len(other)} file(s) gift-quant did not write "
                             f"({_listing(other, Path(out))}); --overwrite removes only gift-quant's files: move "
                             "those away or choose another folder")
    return ours


def remove_owned(out: Path, what: str = "--out") -> None:
    """``--overwrite``: remove gift-quant's files from ``out`` (and the folders that held only them), after
    refusing, with nothing removed, when ``out`` holds anything gift-quant did not write."""
    import shutil

    out = Path(out)
    ours = refuse_foreign(out, what)
    with writing(out, action="removing"):
        for p in ours:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        parents = sorted({q for p in ours for q in p.parents if out in q.parents}, key=lambda q: -len(q.parts))
        for d in parents:  # folders left empty by the removal (run/blocks, adapter ...), deepest first
            if d.is_dir() and not d.is_symlink() and not any(d.iterdir()):
                d.rmdir()


# ---------------------------------------------------------------- inputs


def data_input(spec: str | None) -> Path | None:
    """The local file or folder a data spec names (None for named and Hugging Face datasets)."""
    if not spec:
        return None
    p = Path(spec).expanduser()
    return p if p.exists() else None


def check_inputs(out: Path, inputs: dict[str, str | os.PathLike | None], what: str = "--out") -> None:
    """Refuse an ``out`` that is, contains or lies inside an input (symlinks resolved): writing or
    ``--overwrite`` there would change or delete what the command reads."""
    target = Path(out).expanduser().resolve()
    for label, path in inputs.items():
        if path is None:
            continue
        src = Path(path).expanduser().resolve()
        if target == src:
            rel = "is"
        elif src in target.parents:
            rel = "lies inside"
        elif target in src.parents:
            rel = "contains"
        else:
            continue
        raise GiftQuantError(f"{what} {out} {rel} the {label} {path}: gift-quant never writes where it reads; "
                             f"choose an {what} outside every input")


def check_file_target(target: Path, inputs: dict[str, str | os.PathLike | None], what: str = "--json") -> None:
    """A file the command writes (``--json``) must not be an input, contain one, or replace a file an input
    folder is read from (its weights, configs, tokenizer, data files); a new file beside them is fine."""
    t = Path(target).expanduser().resolve()
    for label, path in inputs.items():
        if path is None:
            continue
        src = Path(path).expanduser().resolve()
        if t == src or t in src.parents:
            check_inputs(target, {label: path}, what)
        if src in t.parents and t.exists():
            rel = t.relative_to(src).as_posix()
            if rel.startswith("run/") or t.suffix in (".txt", ".jsonl", ".parquet", ".safetensors", ".gguf") or \
                    _matches(rel, (*OUTPUT_LAYOUT, *EXPORT_LAYOUT)) or _tokenizer_file(rel):
                raise GiftQuantError(f"{what} {target} would replace {rel}, which the {label} {path} is read from; "
                                     f"choose another {what} file")
