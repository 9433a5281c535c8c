"""Data sources (.txt / .jsonl / .parquet / folders) and token windows for calibration and perplexity."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import corpus, make_tokenizer

from gift_quant.data.sources import load_documents, load_records, record_text
from gift_quant.data.windows import calibration_windows, eval_windows
from gift_quant.util.errors import GiftQuantError

# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _stream(tok, docs):
    """The documents' token stream, joined in order and separated by EOS."""
    ids = []
    for d in docs:
        ids.extend(tok(d, add_special_tokens=False)["input_ids"])
        ids.append(tok.eos_token_id)
    return ids


def _is_slice(window: list[int], stream: list[int]) -> bool:
    n = len(window)
    return any(stream[s : s + n] == window for s in range(len(stream) - n + 1))


# ---------------------------------------------------------------- records / documents


def test_txt_is_one_record(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("line one\nline two\n", encoding="utf-8")
    assert load_records(str(f)) == [{"text": "line one\nline two\n"}]
    assert load_documents(str(f)) == ["line one\nline two\n"]


def test_jsonl_fields(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text(
        json.dumps({"text": "plain text", "id": 1}) + "\n"
        + "\n"  # blank lines are skipped
        + json.dumps({"prompt": "What is 2+2?", "response": "4"}) + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "hi"},
                                   {"role": "assistant", "content": "hello"}]}) + "\n"
        + json.dumps("a bare string") + "\n",
        encoding="utf-8")
    recs = load_records(str(f))
    assert len(recs) == 4
    assert recs[0] == {"text": "plain text", "id": 1}
    assert recs[3] == {"text": "a bare string"}
    assert load_documents(str(f)) == ["plain text", "What is 2+2?\n4", "hi\nhello", "a bare string"]


def test_record_text_without_known_fields_is_an_error(tmp_path):
    with pytest.raises(GiftQuantError, match="text, prompt/response, messages"):
        record_text({"question": "q", "answer": "a"})
    f = _write_jsonl(tmp_path / "odd.jsonl", [{"question": "q"}])
    with pytest.raises(GiftQuantError, match="question"):
        load_documents(str(f))


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    f = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": ["first doc", "second doc"], "n": [1, 2]}), f)
    assert load_records(str(f)) == [{"text": "first doc", "n": 1}, {"text": "second doc", "n": 2}]
    assert load_documents(str(f)) == ["first doc", "second doc"]
    g = tmp_path / "chat.parquet"
    pq.write_table(pa.table({"prompt": ["p1"], "response": ["r1"]}), g)
    assert load_documents(str(g)) == ["p1\nr1"]


def test_folder_of_mixed_files(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("from txt", encoding="utf-8")
    _write_jsonl(d / "b.jsonl", [{"text": "from jsonl 1"}, {"prompt": "p", "response": "r"}])
    pq.write_table(pa.table({"text": ["from parquet"]}), d / "sub" / "c.parquet")
    (d / "README.md").write_text("not data", encoding="utf-8")  # other suffixes are ignored
    docs = load_documents(str(d))
    # files in sorted path order, records in file order, nested folders included
    assert docs == ["from txt", "from jsonl 1", "p\nr", "from parquet"]


def test_empty_folder_is_an_error(tmp_path):
    d = tmp_path / "nothing"
    d.mkdir()
    (d / "notes.md").write_text("x")
    with pytest.raises(GiftQuantError, match="contains no .txt, .jsonl or .parquet"):
        load_records(str(d))


@pytest.mark.parametrize("name", ["missing.txt", "missing.jsonl", "missing.parquet"])
def test_missing_file_is_a_clear_error(tmp_path, name):
    path = tmp_path / name
    with pytest.raises(GiftQuantError, match="does not exist") as ei:
        load_records(str(path))
    assert name in str(ei.value)
    with pytest.raises(GiftQuantError, match="does not exist"):
        load_documents(str(path))


def test_invalid_json_line_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(GiftQuantError) as ei:
        load_records(str(f))
    msg = str(ei.value)
    assert f"{f}:3" in msg and "not valid JSON" in msg
    assert "\n" not in msg


def test_empty_sources_have_no_text(tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text("", encoding="utf-8")
    with pytest.raises(GiftQuantError, match="no text found"):
        load_documents(str(f))
    g = _write_jsonl(tmp_path / "blank.jsonl", [{"text": "   "}, {"text": ""}])
    with pytest.raises(GiftQuantError, match="no text found"):
        load_documents(str(g))


# ---------------------------------------------------------------- calibration windows


def test_calibration_windows_shape_and_seed(tok):
    docs = corpus(1200, seed=1).split("\n")
    a = calibration_windows(tok, docs, 8, 24, seed=0)
    b = calibration_windows(tok, docs, 8, 24, seed=0)
    c = calibration_windows(tok, docs, 8, 24, seed=1)
    assert a.shape == (8, 24) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert int(a.min()) >= 0 and int(a.max()) < len(tok)


def test_calibration_windows_are_contiguous_slices_of_one_document(tok):
    doc = corpus(600, seed=2)
    stream = _stream(tok, [doc])
    w = calibration_windows(tok, [doc], 16, 32, seed=3)
    assert w.shape == (16, 32)
    for row in w.tolist():
        assert _is_slice(row, stream)


def test_calibration_windows_are_contiguous_slices_of_the_document_stream(tok):
    """With many documents each window is a piece of the EOS-joined stream of whole documents
    (in some order): between two EOS tokens lies one complete document, at the edges a suffix /
    prefix of one."""
    docs = [f"Document {i}: " + corpus(12, seed=10 + i) for i in range(12)]
    doc_ids = [tok(d, add_special_tokens=False)["input_ids"] for d in docs]
    eos = tok.eos_token_id
    w = calibration_windows(tok, docs, 20, 64, seed=5)
    assert w.shape == (20, 64)
    assert all(len(ids) < 64 for ids in doc_ids)  # so every window crosses a document boundary
    for row in w.tolist():
        pieces, cur = [], []
        for t in row:
            if t == eos:
                pieces.append(cur)
                cur = []
            else:
                cur.append(t)
        pieces.append(cur)
        assert len(pieces) >= 2
        assert any(ids[len(ids) - len(pieces[0]):] == pieces[0] for ids in doc_ids)  # suffix
        assert any(ids[: len(pieces[-1])] == pieces[-1] for ids in doc_ids)  # prefix
        for mid in pieces[1:-1]:
            assert mid in doc_ids  # a whole document


def test_calibration_windows_allow_more_samples_than_distinct_offsets(tok):
    doc = "the model and the layer of the block"
    n_tokens = len(_stream(tok, [doc]))
    w = calibration_windows(tok, [doc], 10, n_tokens - 1, seed=0)
    assert w.shape == (10, n_tokens - 1)


def test_calibration_text_too_short(tok):
    with pytest.raises(GiftQuantError, match="too short") as ei:
        calibration_windows(tok, ["the model"], 4, 32, seed=0, source="tiny.txt")
    assert "tiny.txt" in str(ei.value) and "--seq-len 32" in str(ei.value)


@pytest.mark.parametrize("n, seq", [(0, 16), (4, 0), (-1, 16)])
def test_calibration_bad_sizes(tok, n, seq):
    with pytest.raises(GiftQuantError, match="must be positive"):
        calibration_windows(tok, [corpus(200)], n, seq, seed=0)


# ---------------------------------------------------------------- evaluation windows


def test_eval_windows_are_consecutive_and_non_overlapping(tok):
    docs = [corpus(300, seed=s) for s in range(3)]
    stream = _stream(tok, docs)
    w = eval_windows(tok, docs, 32)
    n = len(stream) // 32
    assert w.shape == (n, 32)
    assert w.flatten().tolist() == stream[: n * 32]


def test_eval_windows_respect_max_windows(tok):
    docs = [corpus(300, seed=s) for s in range(3)]
    stream = _stream(tok, docs)
    assert len(stream) // 32 > 5
    w = eval_windows(tok, docs, 32, max_windows=5)
    assert w.shape == (5, 32)
    assert w.flatten().tolist() == stream[: 5 * 32]
    # more windows allowed than there are: all of them
    big = eval_windows(tok, docs, 32, max_windows=10_000)
    assert big.shape[0] == len(stream) // 32


def test_eval_text_too_short(tok):
    with pytest.raises(GiftQuantError, match="too short") as ei:
        eval_windows(tok, ["the model"], 64, source="ppl.txt")
    assert "ppl.txt" in str(ei.value)
