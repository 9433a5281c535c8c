"""Tiny random Hugging Face models and a tiny tokenizer, built inside the tests (no downloads)."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from gift_quant.config.settings import Runtime

# how tests run the commands: on the CPU, without progress bars
QUIET_CPU = Runtime(device="cpu", progress=False)

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt_neox"]

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "a",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "they",
    "you",
    "were",
    "her",
    "she",
    "there",
    "been",
    "one",
    "all",
    "we",
    "their",
    "has",
    "would",
    "when",
    "if",
    "so",
    "no",
    "will",
    "more",
    "can",
    "model",
    "weight",
    "column",
    "quantize",
    "salient",
    "noise",
    "gradient",
    "layer",
    "block",
    "token",
    "window",
    "matrix",
    "error",
    "scale",
]


def corpus(n_words: int = 6000, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_words // 12):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + ".")
    return "\n".join(lines)


def make_tokenizer(path: Path):
    """A byte-level BPE tokenizer trained on the corpus, saved as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([corpus()], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    fast.save_pretrained(path)
    return fast


def tiny_config(arch: str, vocab_size: int = 320):
    from transformers import AutoConfig

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    if arch == "gpt_neox":
        return AutoConfig.for_model("gpt_neox", **common, rotary_pct=0.5)
    extra = dict(num_key_value_heads=2, head_dim=16)
    if arch in ("gemma2", "gemma3_text"):
        extra.update(sliding_window=16, query_pre_attn_scalar=16)
    if arch == "phi3":
        extra.pop("head_dim")
        extra.update(pad_token_id=0, bos_token_id=0, eos_token_id=0)
    return AutoConfig.for_model(arch, **common, **extra)


def make_model_dir(arch: str, path: Path, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(path)
    cfg = tiny_config(arch, vocab_size=max(320, len(tok)))
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(path)
    return path


def write_instruction_jsonl(path: Path, n: int = 60) -> Path:
    """A small {"prompt", "response"} training file for recovery / fine-tuning tests."""
    import json

    path.write_text("\n".join(json.dumps({"prompt": corpus(20, seed=i), "response": corpus(12, seed=99 + i)})
                               for i in range(n)))
    return path


def cli_world(root: Path, n_train: int = 40) -> dict:
    """A tiny Llama plus calibration, perplexity and instruction files for tests that drive the CLI."""
    import json

    w = {"root": root, "src": make_model_dir("llama", root / "src")}
    w["calib"], w["ppl"], w["train"] = root / "calib.txt", root / "ppl.txt", root / "train.jsonl"
    w["calib"].write_text(corpus(), encoding="utf-8")
    w["ppl"].write_text(corpus(2000, seed=3), encoding="utf-8")
    rng = random.Random(5)
    w["train"].write_text("".join(json.dumps({"prompt": " ".join(rng.choices(WORDS, k=6)),
                                              "response": " ".join(rng.choices(WORDS, k=14))}) + "\n"
                                  for _ in range(n_train)), encoding="utf-8")
    return w


def rtn_llama_world(root: Path, *, hidden: int, intermediate: int, heads: int, head_dim: int, tied: bool,
                    salient: int, ids_len: int) -> dict:
    """A 2-layer Llama in ``root/src`` quantized (3-bit RTN, float32 salient columns) to ``root/q``, and 8 fixed
    id sequences of ``ids_len``: the start of the tiny training tests that compare runs bit for bit."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from gift_quant.config.settings import QuantizeConfig
    from gift_quant.workflows.stages import quantize_to_checkpoint

    src = root / "src"
    src.mkdir()
    tok = make_tokenizer(src)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=max(320, len(tok)), hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=2, head_dim=head_dim,
                      max_position_embeddings=128, tie_word_embeddings=tied)
    LlamaForCausalLM(cfg).save_pretrained(src)
    calib = root / "calib.txt"
    calib.write_text(corpus(2000, seed=1))
    quantize_to_checkpoint(str(src), root / "q", QuantizeConfig(bits=3, salient=salient, algorithm="rtn",
                                                                calib_data=str(calib), calib_samples=4, seq_len=32,
                                                                salient_dtype="float32"),
                           runtime=QUIET_CPU)
    ids = torch.randint(0, 300, (8, ids_len), generator=torch.Generator().manual_seed(3))
    return {"root": root, "src": src, "ids": ids}
