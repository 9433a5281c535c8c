"""Text sources -> token windows for calibration, training and perplexity.

A data spec is one of: a named dataset of gift-quant (``sotu``, ``boolq-passages:test`` ..., see
``gift_quant.datasets``), a local ``.txt`` / ``.jsonl`` / ``.parquet`` file, a folder of such files,
or a Hugging Face dataset name (``name``, ``name:config`` or ``name:config:split``) for users who are
online. Documents are lists of strings; records are dicts (``text``, or ``prompt``/``response``, or
chat ``messages``).
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import torch

from .errors import GiftQuantError

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
            records.extend(_read_file(f))
        return records
    if spec.startswith((".", "/", "~")) or Path(spec).suffix in TEXT_SUFFIXES:
        raise GiftQuantError(f"data file {spec} does not exist")
    from . import datasets as named

    if named.is_named(spec):
        return named.load_named_records(spec, default_split, limit)
    return _load_hf(spec, default_split)


def load_documents(spec: str, default_split: str = "train") -> list[str]:
    """Plain-text documents (records rendered without a chat template)."""
    docs = [record_text(r) for r in load_records(spec, default_split)]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise GiftQuantError(f"{spec}: no text found (empty file or no 'text' field)")
    return docs


def record_text(r: dict) -> str:
    if "text" in r:
        return str(r["text"])
    if "prompt" in r and "response" in r:
        return f"{r['prompt']}\n{r['response']}"
    if "messages" in r:
        return "\n".join(str(m.get("content", "")) for m in r["messages"])
    raise GiftQuantError(f"record has none of the fields text, prompt/response, messages: {sorted(r)[:8]}")


def _read_file(path: Path) -> list[dict]:
    if path.suffix == ".txt":
        return [{"text": path.read_text(encoding="utf-8", errors="replace")}]
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
                out.append(obj)
        return out
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise GiftQuantError(f"{path}: unsupported file type; use .txt, .jsonl or .parquet")


def _load_hf(spec: str, default_split: str) -> list[dict]:
    import datasets

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


# ---------------------------------------------------------------- token windows


def _token_stream(tokenizer, docs: list[str], budget: int | None) -> list[int]:
    sep = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if sep is not None:
            ids.append(sep)
        if budget is not None and len(ids) >= budget:
            break
    return ids


def _calibration_stream(tokenizer, docs: list[str], n_samples: int, seq_len: int, seed: int):
    """(rng, documents read, token stream) of a calibration draw: seeded shuffle, then a token budget."""
    rng = random.Random(seed)
    docs = list(docs)
    rng.shuffle(docs)
    budget = max(4 * n_samples * seq_len, seq_len + 1)
    used, ids = [], []
    for doc in docs:  # same stream as _token_stream, remembering which documents it read
        used.append(doc)
        ids.extend(_token_stream(tokenizer, [doc], None))
        if len(ids) >= budget:
            break
    return rng, used, ids


def calibration_windows(tokenizer, docs: list[str], n_samples: int, seq_len: int, seed: int,
                        source: str = "calibration data") -> torch.Tensor:
    """(n_samples, seq_len) windows at seeded random offsets of the shuffled documents' token stream."""
    if n_samples <= 0 or seq_len <= 0:
        raise GiftQuantError(f"--calib-samples and --seq-len must be positive (got {n_samples}, {seq_len})")
    rng, _, ids = _calibration_stream(tokenizer, docs, n_samples, seq_len, seed)
    if len(ids) <= seq_len:
        raise GiftQuantError(
            f"{source} is too short: {len(ids)} tokens, need more than --seq-len {seq_len}; "
            "give more text or a smaller --seq-len")
    starts = [rng.randrange(0, len(ids) - seq_len + 1) for _ in range(n_samples)]
    return torch.tensor([ids[s : s + seq_len] for s in starts], dtype=torch.long)


def calibration_documents(tokenizer, docs: list[str], n_samples: int, seq_len: int, seed: int) -> list[str]:
    """The documents a calibration draw reads: training on the same source must leave these out."""
    return _calibration_stream(tokenizer, docs, n_samples, seq_len, seed)[1]


def eval_windows(tokenizer, docs: list[str], seq_len: int, max_windows: int | None = None,
                 source: str = "evaluation data") -> torch.Tensor:
    """Consecutive non-overlapping windows of the documents joined in order (GPTQ-paper protocol)."""
    budget = None if max_windows is None else (max_windows + 1) * seq_len
    ids = _token_stream(tokenizer, docs, budget)
    n = len(ids) // seq_len
    if n == 0:
        raise GiftQuantError(f"{source} is too short: {len(ids)} tokens for one window of {seq_len}")
    if max_windows is not None:
        n = min(n, max_windows)
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def fingerprint_tokens(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16]
