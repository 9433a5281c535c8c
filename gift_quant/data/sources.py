"""Where text comes from: a data spec -> records (dicts) or plain-text documents.

A data spec is one of: a named dataset of gift-quant (``sotu``, ``boolq-passages:test`` ..., see
``gift_quant.data.named``), a local ``.txt`` / ``.jsonl`` / ``.parquet`` file, a folder of such files,
or a Hugging Face dataset name (``name``, ``name:config`` or ``name:config:split``) for users who are
online. Documents are lists of strings; records are dicts (``text``, or ``prompt``/``response``, or
chat ``messages``). Turning documents into token windows is windows.py's job.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..util.errors import GiftQuantError, os_error
from . import named as named_data
from .named.splits import record_text

__all__ = ["TEXT_SUFFIXES", "load_documents", "load_records", "record_problem"]

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")


def load_records(spec: str, default_split: str = "train", limit: int | None = None) -> list[dict]:
    """Records from any supported source (see module docstring); at most ``limit`` when given."""
    records = _load_records(spec, default_split, limit)
    return records if limit is None else records[:limit]


def _load_records(spec: str, default_split: str, limit: int | None) -> list[dict]:
    path = Path(spec)
    if path.exists():
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES) if path.is_dir() else [path]
        if path.is_dir() and not files:
            raise GiftQuantError(f"{path} contains no .txt, .jsonl or .parquet files")
        records: list[dict] = []
        for f in files:
            try:
                f.resolve(strict=True)
            except (OSError, RuntimeError):  # RuntimeError: Python < 3.13 reports a symlink loop so
                raise GiftQuantError(f"data file {f} is a broken symlink or a symlink loop; remove it or point "
                                     "it at a file") from None
            try:
                records.extend(_read_file(f))
            except OSError as exc:
                raise os_error(exc, f, "reading") from None
            except UnicodeDecodeError as exc:
                raise GiftQuantError(f"data file {f} is not UTF-8 text (byte {exc.start}); convert it to UTF-8 or "
                                     "give a text file") from None
        return records
    if spec.startswith((".", "/", "~")) or Path(spec).suffix in TEXT_SUFFIXES:
        raise GiftQuantError(f"data file {spec} does not exist")
    if named_data.is_named(spec):
        return named_data.load_named_records(spec, default_split, limit)
    return _load_hf(spec, default_split)


def load_documents(spec: str, default_split: str = "train") -> list[str]:
    """Plain-text documents (records rendered without a chat template)."""
    docs = [record_text(r) for r in load_records(spec, default_split)]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise GiftQuantError(f"{spec}: no text found (empty file or no 'text' field); give a file that holds text")
    return docs


def record_problem(r: dict) -> str | None:
    """Why a record's fields cannot be read as text (the fields' types), or None."""
    for key in ("text", "prompt", "response"):
        if key in r and not isinstance(r[key], str):
            return f"field {key!r} must be a string, got {type(r[key]).__name__} {str(r[key])[:40]!r}; fix the record"
    if "messages" in r:
        msgs = r["messages"]
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in msgs):
            return ("field 'messages' must be a non-empty list of {\"role\": ..., \"content\": \"...\"} objects, got "
                    f"{str(msgs)[:60]!r}; fix the record")
    return None


def _read_file(path: Path) -> list[dict]:
    if path.suffix == ".txt":
        return [{"text": _plain_text(path)}]
    if path.suffix == ".jsonl":
        out = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise GiftQuantError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
                if isinstance(obj, str):
                    obj = {"text": obj}
                if not isinstance(obj, dict):
                    raise GiftQuantError(f"{path}:{lineno}: expected a JSON object or string, got {type(obj).__name__}")
                why = record_problem(obj)
                if why:
                    raise GiftQuantError(f"{path}:{lineno}: {why}")
                out.append(obj)
        return out
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise GiftQuantError(f"data file {path} is not a readable parquet file "
                                 f"({str(exc).splitlines()[0][:160]})") from None
    raise GiftQuantError(f"{path}: unsupported file type; use .txt, .jsonl or .parquet")


def _plain_text(path: Path) -> str:
    """A .txt file's text; a binary file (NUL bytes, or mostly bytes that are not UTF-8) is refused."""
    data = path.read_bytes()
    text = data.decode("utf-8", errors="replace")
    bad = text.count("\ufffd")
    nul = b"\0" in data
    if nul or bad > max(8, len(text) // 100):
        why = "it holds NUL bytes" if nul else f"{bad} bytes are not UTF-8"
        raise GiftQuantError(f"data file {path} is not text ({why}); give a UTF-8 text file")
    return text


def _load_hf(spec: str, default_split: str) -> list[dict]:
    import datasets  # Hugging Face `datasets`, imported only for specs that name a hub dataset

    parts = spec.split(":")
    name, config = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None)
    split = parts[2] if len(parts) > 2 else default_split
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # datasets raises many types for offline / unknown names
        raise GiftQuantError(
            f"{spec!r} is not a local file or folder, a gift-quant dataset name, or a reachable Hugging Face "
            f"dataset ({type(exc).__name__}: {str(exc)[:200]})") from exc
    return [dict(r) for r in ds]
