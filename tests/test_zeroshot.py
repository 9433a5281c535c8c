"""Zero-shot evaluation: generated lm-eval tasks equal lm-eval's own definitions on the local data, and
lm-eval's per-document answers equal a log-likelihood argmax computed by hand with the model."""

import gzip
import importlib
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tiny import QUIET_CPU, make_model_dir

pytest.importorskip("lm_eval")

from gift_quant.data.named import lambada_path, task_arrow_file  # noqa: E402
from gift_quant.eval import zeroshot  # noqa: E402
from gift_quant.eval.zeroshot import (  # noqa: E402
    ALL_TASKS,
    GIFT6,
    evaluate_tasks,
    resolve_tasks,
    run_eval_tasks,
    task_manager,
    write_task_configs,
)
from gift_quant.util.errors import GiftQuantError  # noqa: E402

LM_EVAL_TASKS = Path(importlib.util.find_spec("lm_eval").submodule_search_locations[0]) / "tasks"
LIMIT = 8


def _rows(task: str) -> list[dict]:
    import pyarrow as pa

    with pa.memory_map(str(task_arrow_file(task))) as source:
        return pa.ipc.open_stream(source).read_all().to_pylist()


class _TagLoader(yaml.SafeLoader):
    """Reads task YAMLs with `!function x.y` kept as the text "!function x.y"."""


_TagLoader.add_constructor("!function", lambda loader, node: "!function " + loader.construct_scalar(node))


def _lm_eval_yaml(rel: str) -> dict:
    """One of lm-eval's own task YAMLs (with its `include` applied)."""
    cfg = yaml.load((LM_EVAL_TASKS / rel).read_text(), Loader=_TagLoader)
    if "include" in cfg:
        cfg = {**_lm_eval_yaml(str(Path(rel).parent / cfg.pop("include"))), **cfg}
    return cfg


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    write_task_configs(folder, ["all"])
    loaded = task_manager(folder).load([f"gift_{t}" for t in ALL_TASKS])["tasks"]
    return {name.removeprefix("gift_"): task for name, task in loaded.items()}


@pytest.fixture(scope="module")
def docs(tasks):
    """Each task's evaluation documents, processed once (HellaSwag's map over 10k docs is not free)."""
    return {name: list(task.eval_docs) for name, task in tasks.items()}


# ------------------------------------------------------------------------------------- task names


def test_aliases_and_unknown_names():
    assert resolve_tasks("gift6") == list(GIFT6)
    assert resolve_tasks(["all"]) == [*GIFT6, "lambada"]
    assert resolve_tasks("piqa, gift_boolq,piqa,ARC-Easy") == ["piqa", "boolq", "arc_easy"]
    assert resolve_tasks(["lambada", "gift6"]) == ["lambada", *GIFT6]
    with pytest.raises(GiftQuantError, match="unknown zero-shot task 'mmlu'.*known: gift6, all"):
        resolve_tasks("arc_easy,mmlu")
    with pytest.raises(GiftQuantError, match="no zero-shot task"):
        resolve_tasks(" , ")


def test_missing_lm_eval_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` raise ImportError
    with pytest.raises(GiftQuantError, match=r"pip install \"gift-quant\[eval\]\""):
        evaluate_tasks(torch.nn.Linear(1, 1), None, ["piqa"], limit=1)
    with pytest.raises(GiftQuantError, match=r"gift-quant\[eval\]"):
        run_eval_tasks(None, "piqa", limit=1)


def test_bad_limit_and_batch_size():
    for bad in (0, -3, 0.5):  # lm-eval would read 0.5 as half of each task
        with pytest.raises(GiftQuantError, match="--limit"):
            evaluate_tasks(torch.nn.Linear(1, 1), None, ["piqa"], limit=bad)
    with pytest.raises(GiftQuantError, match="--batch-size"):
        evaluate_tasks(torch.nn.Linear(1, 1), None, ["piqa"], limit=2, batch_size=0)
    with pytest.raises(GiftQuantError, match="tokenizer"):
        evaluate_tasks(torch.nn.Linear(1, 1), None, ["piqa"], limit=2)


# ---------------------------------------------------------------- (a) the generated task definitions


@pytest.mark.parametrize("task, lm_eval_file", [
    ("arc_easy", "arc/arc_easy.yaml"), ("arc_challenge", "arc/arc_challenge.yaml"),
    ("boolq", "super_glue/boolq/default.yaml"), ("hellaswag", "hellaswag/hellaswag.yaml"),
    ("piqa", "piqa/piqa.yaml"), ("winogrande", "winogrande/default.yaml"),
    ("lambada", "lambada/lambada_openai.yaml")])
def test_definitions_match_lm_eval(tmp_path, task, lm_eval_file):
    ours = yaml.load(write_task_configs(tmp_path, [task])[f"gift_{task}"].read_text(), Loader=_TagLoader)
    theirs = _lm_eval_yaml(lm_eval_file)
    assert ours["output_type"] == theirs["output_type"]
    metrics = lambda cfg: sorted(m["metric"] for m in cfg["metric_list"])  # noqa: E731
    assert metrics(ours) == metrics(theirs)
    differ = {"boolq": {"doc_to_target"}, "lambada": {"doc_to_text", "doc_to_target"}}.get(task, set())
    for key in {"doc_to_text", "doc_to_target", "doc_to_choice"} - differ:
        if isinstance(theirs.get(key), str) and theirs[key].startswith("!function "):
            # Same function name; same behaviour is checked on every document below.
            assert ours[key].split()[-1].endswith(theirs[key].split(".")[-1]), key
        else:
            assert ours.get(key) == theirs.get(key), key
    assert ours["dataset_path"] in ("arrow", "json")


@pytest.mark.parametrize("task", ALL_TASKS)
def test_doc_counts_equal_the_data_files(docs, task):
    if task == "lambada":
        with gzip.open(lambada_path(), "rt") as f:
            expected = sum(1 for _ in f)
    else:
        import pyarrow as pa

        with pa.memory_map(str(task_arrow_file(task))) as source:
            expected = pa.ipc.open_stream(source).read_all().num_rows
    assert len(docs[task]) == expected
    assert expected == {"arc_easy": 570, "arc_challenge": 299, "boolq": 3270, "hellaswag": 10042, "piqa": 1838,
                        "winogrande": 1267, "lambada": 5153}[task]


def test_arc_targets_follow_answer_key(tasks, docs):
    for task in ("arc_easy", "arc_challenge"):
        t, raw = tasks[task], _rows(task)
        assert [d["id"] for d in docs[task]] == [r["id"] for r in raw]
        keys = set()
        for doc, row in zip(docs[task], raw):
            keys.add(row["answerKey"])
            assert t.doc_to_choice(doc) == row["choices"]["text"]
            assert t.doc_to_target(doc) == row["choices"]["label"].index(row["answerKey"])
            assert t.doc_to_text(doc) == f"Question: {row['question']}\nAnswer:"
        assert {"1", "4", "A", "D"} <= keys  # both label styles occur
    # hand-checked: numeric labels (ARC-Easy 8) and the one five-choice question (ARC-Challenge 210)
    easy8 = docs["arc_easy"][8]
    assert easy8["answerKey"] == "1" and tasks["arc_easy"].doc_to_target(easy8) == 0
    assert tasks["arc_easy"].doc_to_choice(easy8)[0] == "obtain energy"
    ch210 = docs["arc_challenge"][210]
    assert tasks["arc_challenge"].doc_to_target(ch210) == 4
    assert tasks["arc_challenge"].doc_to_choice(ch210)[4] == "heart"


def test_boolq_prompt_and_target(tasks, docs):
    t, raw, docs = tasks["boolq"], _rows("boolq"), docs["boolq"]
    for doc, row in zip(docs[:200], raw[:200]):
        assert t.doc_to_text(doc) == f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:"
        assert t.doc_to_choice(doc) == ["no", "yes"]
        assert t.doc_to_target(doc) == int(row["answer"])
    assert t.doc_to_target(docs[0]) == 0  # "does ethanol take more energy make that produces": False
    assert {t.doc_to_target(d) for d in docs[:50]} == {0, 1}


def test_hellaswag_preprocessing_equals_lm_eval(tasks, docs):
    t, ours = tasks["hellaswag"], docs["hellaswag"]
    theirs = importlib.import_module("lm_eval.tasks.hellaswag.utils").process_docs(t.dataset["validation"])
    for a, b in zip(ours, theirs):
        assert (a["query"], a["choices"], a["gold"]) == (b["query"], b["choices"], b["gold"])
    assert len(ours) == len(theirs) == 10042
    # hand-checked: doc 0 (capitalized ctx_b) and doc 3243 (WikiHow markup)
    assert t.doc_to_text(ours[0]) == "Roof shingle removal: A man is sitting on a roof. He"
    assert t.doc_to_target(ours[0]) == 3
    doc = ours[3243]
    assert t.doc_to_text(doc) == (
        "Personal Care and Style: How to become a fashion consultant. Obtain your high school diploma or ged. "
        "This job requires a high school diploma or equivalent, so make sure to apply yourself and finish "
        "school. If your high school offers these classes, take art, design, and sewing to familiarize "
        "yourself with foundational concepts in fashion.")
    assert t.doc_to_choice(doc)[3] == (" Earn a bachelor's degree in a fashion-related field. Degrees for the "
                                       "fashion industry include art, fashion merchandising, and marketing.")
    assert t.doc_to_target(doc) == 3


def test_piqa_prompt_and_target(tasks, docs):
    t, raw = tasks["piqa"], _rows("piqa")
    for doc, row in zip(docs["piqa"][:100], raw[:100]):
        assert t.doc_to_text(doc) == f"Question: {row['goal']}\nAnswer:"
        assert t.doc_to_choice(doc) == [row["sol1"], row["sol2"]]
        assert t.doc_to_target(doc) == row["label"]


def test_winogrande_partial_evaluation(tasks, docs):
    t, docs = tasks["winogrande"], docs["winogrande"]
    theirs = importlib.import_module("lm_eval.tasks.winogrande.preprocess_winogrande")
    for doc in docs:
        for fn in ("doc_to_text", "doc_to_target", "doc_to_choice"):
            assert getattr(t, fn)(doc) == getattr(theirs, fn)(doc), fn
    # hand-checked: doc 0, answer "2" -> the context with option2 is the right one
    assert t.doc_to_text(docs[0]) == 1
    assert t.doc_to_choice(docs[0]) == ["Sarah was a much better surgeon than Maria so Sarah",
                                        "Sarah was a much better surgeon than Maria so Maria"]
    assert t.doc_to_target(docs[0]) == "always got the easier cases."
    assert t.multiple_input


def test_lambada_context_and_continuation(tasks, docs):
    t, docs = tasks["lambada"], docs["lambada"]
    with gzip.open(lambada_path(), "rt") as f:
        raw = [json.loads(line) for _, line in zip(range(20), f)]
    for doc, row in zip(docs, raw):
        assert t.doc_to_text(doc) == row["request"]["context"]
        assert t.doc_to_target(doc) == row["request"]["continuation"]
        assert t.doc_to_target(doc) == " " + row["doc"]["answers_text"][0]
    assert t.doc_to_target(docs[0]) == " signs"


# -------------------------------------------------------- (b) end to end, (c) by-hand reference


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, torch_single_thread):
    from gift_quant.workflows.commands import load_any

    src = make_model_dir("llama", tmp_path_factory.mktemp("zs") / "model")
    model, tokenizer, _, _ = load_any(str(src))
    res = evaluate_tasks(model, tokenizer, ["all"], limit=LIMIT, batch_size=4, device="cpu", seed=0,
                         log_samples=True)
    return model, tokenizer, res


def test_end_to_end_every_task_and_mean(tiny_run):
    _, _, res = tiny_run
    assert list(res["tasks"]) == list(ALL_TASKS)
    for task, entry in res["tasks"].items():
        assert entry["n"] == LIMIT and entry["n_total"] > LIMIT, task
        assert 0.0 <= entry["acc"] <= 1.0 and entry["acc_stderr"] >= 0.0, task
        assert ("acc_norm" in entry) == (task in ("arc_easy", "arc_challenge", "hellaswag", "piqa")), task
        if "acc_norm" in entry:
            assert 0.0 <= entry["acc_norm"] <= 1.0
        # accuracy over LIMIT documents is a multiple of 1/LIMIT
        assert abs(entry["acc"] * LIMIT - round(entry["acc"] * LIMIT)) < 1e-9
    assert res["tasks"]["lambada"]["perplexity"] > 1.0
    headline = [res["tasks"][t]["acc_norm" if t in ("arc_easy", "arc_challenge", "hellaswag", "piqa") else "acc"]
                for t in GIFT6]
    assert res["mean"] == pytest.approx(sum(headline) / 6)
    assert res["mean_acc"] == pytest.approx(sum(res["tasks"][t]["acc"] for t in GIFT6) / 6)
    assert res["mean_is_gift6"] and res["mean_tasks"] == list(GIFT6)
    assert res["limit"] == LIMIT and res["lm_eval_version"] == "0.4.13"
    # per-document records agree with the aggregate
    for task in ALL_TASKS:
        docs = res["samples"][task]
        assert sorted(s["doc_id"] for s in docs) == list(range(LIMIT))
        assert sum(s["acc"] for s in docs) / LIMIT == pytest.approx(res["tasks"][task]["acc"])


@torch.no_grad()
def _loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """sum log p(continuation tokens | context), tokenized as lm-eval does for causal models (trailing
    context spaces move to the continuation; the continuation is the tail of the whole encoding)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n_ctx = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([whole])
    logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    targets = ids[0, 1:]
    return float(logprobs[torch.arange(n_ctx - 1, len(whole) - 1), targets[n_ctx - 1:]].sum())


def _by_hand(task: str, row: dict):
    """(pairs of context/continuation, gold index, choice texts for acc_norm) from the raw row."""
    if task == "arc_easy":
        ctx = f"Question: {row['question']}\nAnswer:"
        choices = row["choices"]["text"]
        return [(ctx, " " + c) for c in choices], row["choices"]["label"].index(row["answerKey"]), choices
    if task == "piqa":
        ctx = f"Question: {row['goal']}\nAnswer:"
        choices = [row["sol1"], row["sol2"]]
        return [(ctx, " " + c) for c in choices], row["label"], choices
    if task == "winogrande":
        blank = row["sentence"].index("_")
        rest = " " + row["sentence"][blank + 1:].strip()
        return [(row["sentence"][:blank] + o, rest) for o in (row["option1"], row["option2"])], \
            int(row["answer"]) - 1, None
    raise AssertionError(task)


@pytest.mark.parametrize("task", ["arc_easy", "piqa", "winogrande"])
def test_per_document_answers_match_a_hand_computed_argmax(tiny_run, task):
    model, tokenizer, res = tiny_run
    raw = _rows(task)
    checked = 0
    for sample in res["samples"][task]:
        row = raw[sample["doc_id"]]
        pairs, gold, choices = _by_hand(task, row)
        assert [tuple(a) for a in sample["arguments"]] == pairs  # the prompt lm-eval scored
        if len(tokenizer(pairs[0][0] + pairs[0][1])["input_ids"]) > 200:  # lm-eval truncates past 256
            continue
        lls = [_loglikelihood(model, tokenizer, c, x) for c, x in pairs]
        harness = [r[0] for r in sample["filtered_resps"]]
        assert lls == pytest.approx(harness, abs=1e-3)
        pred = max(range(len(lls)), key=lls.__getitem__)
        assert sample["acc"] == float(pred == gold)
        if choices is not None:
            norm = [ll / len(c) for ll, c in zip(lls, choices)]
            assert sample["acc_norm"] == float(max(range(len(norm)), key=norm.__getitem__) == gold)
        checked += 1
    assert checked >= 4


def test_gift_quant_checkpoint_is_evaluated_as_a_module(tmp_path, torch_single_thread):
    from tiny import corpus

    from gift_quant.config.settings import QuantizeConfig
    from gift_quant.workflows.commands import quantize_to_checkpoint

    src = make_model_dir("llama", tmp_path / "src")
    calib = tmp_path / "calib.txt"
    calib.write_text(corpus(2000, seed=1))
    cfg = QuantizeConfig(bits=4, salient=4, calib_data=str(calib), calib_samples=4, seq_len=32,
                         salient_dtype="float32")
    quantize_to_checkpoint(str(src), tmp_path / "q", cfg, runtime=QUIET_CPU)
    res = run_eval_tasks(str(tmp_path / "q"), "winogrande,piqa", limit=4, batch_size=4, runtime=QUIET_CPU)
    assert res["kind"] == "gift-quant checkpoint" and res["effective_bits"] < 16
    assert [res["tasks"][t]["n"] for t in ("winogrande", "piqa")] == [4, 4]
    assert not res["mean_is_gift6"] and res["mean_tasks"] == ["piqa", "winogrande"]
    assert 0.0 <= res["mean"] <= 1.0
    assert zeroshot.format_table(res).splitlines()[-1].startswith("mean of 2:")
