"""Documents -> fixed-length token windows for calibration (seeded random offsets) and perplexity (consecutive).

All read the documents as one token stream, each document followed by EOS. Calibration shuffles the
documents with the seed, tokenizes only as much as its draw needs, and cuts windows at seeded offsets;
plain-text training (`random_windows`) cuts them at seeded offsets across every document;
`calibration_documents` names the documents such a draw read, so training on the same source can
leave them out. Evaluation cuts the stream, in order, into non-overlapping windows (the GPTQ paper's
protocol). Training windows, with prompts masked out of the labels, are data/examples.py's.
"""

from __future__ import annotations

import hashlib
import random

import torch

from ..util.errors import GiftQuantError

__all__ = ["calibration_documents", "calibration_windows", "eval_windows", "fingerprint_tokens", "random_windows"]


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


def random_windows(tokenizer, docs: list[str], n_windows: int, seq_len: int, seed: int,
                   source: str = "training data") -> torch.Tensor:
    """(n_windows, seq_len) windows at seeded random offsets of ALL the documents' token stream (training text).

    Unlike consecutive packing, which reads the first few shuffled documents and stops, every position of
    every document is equally likely to be drawn, so a short run still sees the whole source's variety.
    Windows may overlap when more tokens are asked for than the source holds.
    """
    if n_windows <= 0 or seq_len <= 0:
        raise GiftQuantError(f"{source}: need a positive number of windows and length (got {n_windows}, {seq_len})")
    ids = _token_stream(tokenizer, docs, None)
    if len(ids) < seq_len:
        raise GiftQuantError(f"{source} is too short: {len(ids)} tokens for one training window of {seq_len}; "
                             "give more text or a smaller --seq-len")
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(ids) - seq_len + 1) for _ in range(n_windows)]
    return torch.tensor([ids[s : s + seq_len] for s in starts], dtype=torch.long)


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
    """Short sha256 of a window tensor, recorded with a run so a resume can check it sees the same tokens."""
    return hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16]
