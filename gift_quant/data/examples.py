"""Training examples -> packed (input_ids, labels) windows for recovery, prompts masked out of the loss.

Instruction records (``prompt``/``response``) and chat records (``messages``) are rendered with the
tokenizer's chat template when it has one (else ``prompt\\nresponse``); every token up to the start of
the answer gets label -100. Plain text trains on every token. Examples are concatenated with EOS and
cut into ``seq_len`` windows, the labels travelling with their tokens. (Calibration and perplexity
windows, which carry no labels, are data/windows.py's.)
"""

from __future__ import annotations

import random

import torch

from ..util.errors import GiftQuantError

__all__ = ["IGNORE", "encode_record", "pack_examples"]

IGNORE = -100


def _chat_parts(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of a conversation whose last message is the assistant's answer."""
    try:
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=True)
    except Exception as exc:  # jinja2's TemplateError, a template that reads fields the record lacks
        where = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        raise GiftQuantError(f"{where}: the tokenizer's chat_template cannot render a training record "
                             f"({type(exc).__name__}: {' '.join(str(exc).split())[:160]}); fix chat_template in "
                             "tokenizer_config.json or train on plain text") from None
    prompt = list(prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt)
    full = list(full["input_ids"] if isinstance(full, dict) or hasattr(full, "keys") else full)
    if full[:len(prompt)] != prompt:  # templates that re-render earlier turns: mask nothing rather than wrongly
        return [], full
    return prompt, full[len(prompt):]


def encode_record(tokenizer, record: dict) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one record."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if "messages" in record or ("prompt" in record and "response" in record):
        messages = record.get("messages") or [{"role": "user", "content": str(record["prompt"])},
                                              {"role": "assistant", "content": str(record["response"])}]
        if has_template:
            prompt, answer = _chat_parts(tokenizer, messages)
        else:
            context = "\n".join(m["content"] for m in messages[:-1]) + "\n"
            prompt = tokenizer(context, add_special_tokens=False)["input_ids"]
            answer = tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"]
        return prompt + answer, [IGNORE] * len(prompt) + answer
    if "text" in record:
        ids = tokenizer(str(record["text"]), add_special_tokens=False)["input_ids"]
        return ids, list(ids)
    raise GiftQuantError(f"training record has none of text, prompt/response, messages: {sorted(record)[:8]}")


def pack_examples(tokenizer, records: list[dict], seq_len: int, n_windows: int, seed: int,
                  source: str = "training data") -> tuple[torch.Tensor, torch.Tensor]:
    """(n_windows, seq_len) input ids and labels from seeded-shuffled records (fewer if data runs out)."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    labels: list[int] = []
    windows, window_labels = [], []
    for i in order:
        x, y = encode_record(tokenizer, records[i])
        if eos is not None:
            x, y = [*x, eos], [*y, eos]
        if IGNORE in y:
            # an example longer than a window keeps its end: the answer (what is trained) and the prompt's
            # tail; plain text (every token trained) is kept whole and spans several windows
            x, y = x[-seq_len:], y[-seq_len:]
        ids.extend(x)
        labels.extend(y)
        while len(ids) >= seq_len:
            w, lab = ids[:seq_len], labels[:seq_len]
            ids, labels = ids[seq_len:], labels[seq_len:]
            if any(t != IGNORE for t in lab):  # a window of prompt tokens only would train nothing
                windows.append(w)
                window_labels.append(lab)
        if len(windows) >= n_windows:
            break
    if not windows:
        raise GiftQuantError(f"{source}: no window of {seq_len} tokens holds an unmasked token "
                             "(too little text, or prompts only); nothing to train on")
    return torch.tensor(windows[:n_windows]), torch.tensor(window_labels[:n_windows])
