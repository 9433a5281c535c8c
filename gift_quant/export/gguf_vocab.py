"""The tokenizer of a model folder as GGUF metadata, read from its ``tokenizer.json`` (byte-level BPE only).

llama.cpp's BPE tokenizer (``tokenizer.ggml.model = "gpt2"``) takes the vocabulary as a token list
indexed by id, a token type per id, the merges as ``"left right"`` strings in rank order, the special
token ids, and a pre-tokenizer *name* (``tokenizer.ggml.pre``) that selects the regex it splits text
with before BPE. The name is chosen here from the pre-tokenizer that ``tokenizer.json`` itself
describes, so llama.cpp splits text as the Hugging Face tokenizer of the checkpoint does; a shape not
known here is refused rather than guessed (a wrong regex silently changes the tokens).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from gguf import TokenType

from ..util.errors import GiftQuantError

__all__ = ["Vocab", "pre_tokenizer_name", "read_vocab", "write_vocab"]

# Llama 3's split pattern (the "llama-bpe" pre-tokenizer of llama.cpp)
_LLAMA3_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                 "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")


@dataclass
class Vocab:
    """What llama.cpp reads about the tokenizer; ``special``: GGUF key suffix (bos, eos, ...) -> id."""

    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    special: dict[str, int] = field(default_factory=dict)
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None


def _is_byte_level(p: dict, regex: bool) -> bool:
    return p.get("type") == "ByteLevel" and bool(p.get("use_regex", True)) == regex


def pre_tokenizer_name(pre: dict | None, path: Path) -> str:
    """llama.cpp's name for the pre-tokenizer ``tokenizer.json`` describes, or a refusal."""
    pre = pre or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if len(steps) == 1 and _is_byte_level(steps[0], regex=True):
        return "gpt-2"  # GPT-2's regex, then bytes to unicode
    if (len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits")
            and _is_byte_level(steps[1], regex=True)):
        return "smollm"  # digits split one by one, then GPT-2's regex (SmolLM / SmolLM2 as published)
    if (len(steps) == 2 and steps[0].get("type") == "Split"
            and steps[0].get("pattern", {}).get("Regex") == _LLAMA3_SPLIT and _is_byte_level(steps[1], regex=False)):
        return "llama-bpe"
    raise GiftQuantError(
        f"{path}/tokenizer.json has a pre-tokenizer gift-quant cannot name for llama.cpp ({json.dumps(pre)[:120]}); "
        "--format gguf knows GPT-2, SmolLM and Llama-3 byte-level BPE tokenizers: use --format compressed-tensors "
        "or dense")


def _merges(model: dict) -> list[str]:
    # tokenizers writes merges as "a b" strings (older) or [a, b] pairs (newer)
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def _token_table(doc: dict, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and types by id; ids the tokenizer lacks (embedding rows padded past it) become unused pads."""
    by_id = {i: t for t, i in doc["model"]["vocab"].items()}
    added = {a["id"]: a for a in doc.get("added_tokens", [])}
    by_id.update({i: a["content"] for i, a in added.items()})
    n = max(vocab_size, max(by_id) + 1)
    tokens, types = [], []
    for i in range(n):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            # special added tokens are control tokens (never produced from text by BPE, rendered only on request)
            types.append(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def _specials(path: Path) -> tuple[dict[str, int], bool, bool, str | None]:
    """Special ids, whether encoding adds BOS / EOS, and the chat template, as transformers reads the folder."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    special = {k: getattr(tok, f"{k}_token_id") for k in ("bos", "eos", "unk", "pad")}
    special = {k: int(v) for k, v in special.items() if v is not None}
    ids = tok("x")["input_ids"]
    add_bos = "bos" in special and bool(ids) and ids[0] == special["bos"]
    add_eos = "eos" in special and bool(ids) and ids[-1] == special["eos"]
    template = tok.chat_template if isinstance(tok.chat_template, str) else None
    return special, add_bos, add_eos, template


def read_vocab(path: Path, vocab_size: int) -> Vocab:
    """The GGUF tokenizer metadata of the model folder ``path`` (a checkpoint keeps its source's tokenizer)."""
    file = path / "tokenizer.json"
    if not file.is_file():
        raise GiftQuantError(f"{path} has no tokenizer.json; --format gguf needs a fast (byte-level BPE) tokenizer")
    doc = json.loads(file.read_text())
    if doc.get("model", {}).get("type") != "BPE":
        raise GiftQuantError(f"{file}: a {doc.get('model', {}).get('type')} tokenizer; --format gguf writes "
                             "byte-level BPE tokenizers only (use --format compressed-tensors or dense)")
    pre = pre_tokenizer_name(doc.get("pre_tokenizer"), path)
    tokens, types = _token_table(doc, vocab_size)
    special, add_bos, add_eos, template = _specials(path)
    return Vocab(pre, tokens, types, _merges(doc["model"]), special, add_bos, add_eos, template)


def write_vocab(writer, v: Vocab) -> None:
    """Add the tokenizer keys to a ``gguf.GGUFWriter``."""
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(v.pre)
    writer.add_token_list(v.tokens)
    writer.add_token_types(v.types)
    writer.add_token_merges(v.merges)
    for key, i in v.special.items():
        getattr(writer, {"bos": "add_bos_token_id", "eos": "add_eos_token_id", "unk": "add_unk_token_id",
                         "pad": "add_pad_token_id"}[key])(i)
    writer.add_add_bos_token(v.add_bos)
    writer.add_add_eos_token(v.add_eos)
    if v.chat_template:
        writer.add_chat_template(v.chat_template)
