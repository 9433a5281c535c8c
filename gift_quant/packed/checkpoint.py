"""The native gift-quant checkpoint: save and ``load``.

Layout of a checkpoint folder::

    config.json, generation_config.json, tokenizer files   (copied from the source model)
    model.safetensors        every tensor: QuantLinear buffers for quantized linears, the rest as is
    gift_quant_config.json   format version, settings, per-layer K and effective bits, provenance, and
                             the sha256 of every file above ("files"); written last, so its presence
                             means the checkpoint is complete, and `load` refuses a file that changed

Only safetensors is read or written; nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_model
from torch import nn

from ..config.settings import SUPPORTED_BITS
from ..model.arch import set_module
from ..model.loading import enable_kv_cache, parse_dtype
from ..util.errors import GiftQuantError, writing
from ..util.files import atomic_path, atomic_write_text, sha256_file
from .qlinear import QuantLinear

FORMAT = "gift-quant"
FORMAT_VERSION = 1
CONFIG_NAME = "gift_quant_config.json"
WEIGHTS_NAME = "model.safetensors"
_COPY_PATTERNS = ("tokenizer*", "special_tokens_map.json", "vocab.*", "merges.txt", "chat_template*",
                  "generation_config.json", "*.model", "added_tokens.json")


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """The source's tokenizer and generation config files, copied into ``dst`` (the generation config's
    ``use_cache`` set true: what we write is for inference)."""
    for pattern in _COPY_PATTERNS:
        for f in src.glob(pattern):
            if f.is_file():
                shutil.copy2(f, dst / f.name)
    gen = dst / "generation_config.json"
    if gen.is_file():
        try:
            doc = json.loads(gen.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return  # not ours to repair; transformers reports it when it reads the folder
        if isinstance(doc, dict) and doc.get("use_cache") is False:
            doc["use_cache"] = True
            atomic_write_text(gen, json.dumps(doc, indent=2) + "\n")


def save_checkpoint(model: nn.Module, out_dir: Path, source_dir: Path, gift_config: dict) -> None:
    """Write the checkpoint files into ``out_dir``, each atomically, the gift config last."""
    need = sum(t.numel() * t.element_size() for t in model.state_dict().values())  # tied pairs counted twice
    with writing(out_dir / WEIGHTS_NAME, need):
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / CONFIG_NAME).unlink(missing_ok=True)  # incomplete until rewritten below
    with atomic_path(out_dir / WEIGHTS_NAME, need) as tmp:
        # save_model drops the duplicate of tied tensors (embeddings / lm_head) that save_file rejects
        save_model(model, str(tmp))
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    if "use_cache" in cfg:  # training and calibration run with use_cache false; the saved model generates with it
        cfg["use_cache"] = True
    atomic_write_text(out_dir / "config.json", json.dumps(cfg, indent=2, default=str))
    with writing(out_dir):
        copy_tokenizer_files(source_dir, out_dir)
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, **gift_config}
    doc["files"] = {name: sha256_file(out_dir / name) for name in (WEIGHTS_NAME, "config.json")}
    atomic_write_text(out_dir / CONFIG_NAME, json.dumps(doc, indent=1))


def read_gift_config(path: Path) -> dict:
    """The checkpoint's gift_quant_config.json, checked for the keys and types every reader relies on."""
    f = Path(path) / CONFIG_NAME
    if not f.is_file():
        raise GiftQuantError(f"{path} is not a gift-quant checkpoint (no {CONFIG_NAME})")
    try:
        doc = json.loads(f.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GiftQuantError(f"{f} is not valid JSON ({str(exc).splitlines()[0][:120]}): the checkpoint is damaged "
                             "(truncated or edited); re-create it") from None
    if not isinstance(doc, dict):
        raise GiftQuantError(f"{f} holds a JSON {type(doc).__name__}, not an object: the checkpoint is damaged")
    version = doc.get("format_version")
    if doc.get("format") != FORMAT:
        raise GiftQuantError(f"{f}: format {doc.get('format')!r} is not {FORMAT!r}; not a gift-quant checkpoint")
    if type(version) is not int:
        raise GiftQuantError(f"{f}: format_version must be an integer, got {version!r}: the checkpoint is damaged")
    if version > FORMAT_VERSION:
        raise GiftQuantError(
            f"{f}: format {FORMAT} v{version} is not readable by this gift-quant (reads {FORMAT} v{FORMAT_VERSION}); "
            "upgrade gift-quant")
    _check_doc(f, doc)
    return doc


def _check_doc(f: Path, doc: dict) -> None:
    """Refuse a config whose keys a reader needs are missing or of the wrong type, naming the key and value."""
    def need(obj: dict, key: str, types: tuple, where: str, check=None, hint: str = ""):
        if key not in obj:
            raise GiftQuantError(f"{f}: key {where}{key} is missing: the checkpoint is damaged; re-create it")
        value = obj[key]
        if isinstance(value, bool) and bool not in types or not isinstance(value, types) or (
                check is not None and not check(value)):
            wanted = hint or " or ".join(t.__name__ for t in types)
            raise GiftQuantError(f"{f}: {where}{key} = {value!r} is not {wanted}: the checkpoint is damaged; "
                                 "re-create it")
        return value

    q = need(doc, "quantize", (dict,), "", hint="an object")
    need(q, "bits", (int,), "quantize.", lambda b: b in SUPPORTED_BITS, f"one of {list(SUPPORTED_BITS)}")
    need(q, "sym", (bool,), "quantize.")
    need(q, "salient_dtype", (str,), "quantize.", lambda v: v in ("float16", "bfloat16", "float32"),
         "float16, bfloat16 or float32")
    if "dtype" in doc:
        need(doc, "dtype", (str,), "")
    if "effective_bits" in doc:  # written by every command; minimal configs (tools/gpu_check.py) leave it out
        need(doc, "effective_bits", (int, float), "")
    layers = need(doc, "layers", (dict,), "", hint="an object")
    for name, info in layers.items():
        need(layers, name, (dict,), "layers.", hint="an object")
        for key in ("in_features", "out_features", "groups"):
            need(info, key, (int,), f"layers.{name}.", lambda v: v > 0, "a positive integer")
        n_in = info["in_features"]
        need(info, "salient", (int,), f"layers.{name}.", lambda v, n=n_in: 0 <= v < n, f"an integer in 0..{n_in - 1}")
    files = doc.get("files")
    if files is not None and not (isinstance(files, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in files.items())):
        raise GiftQuantError(f"{f}: files must map file names to sha256 digests: the checkpoint is damaged")


def verify_files(path: Path, doc: dict) -> None:
    """Refuse a checkpoint whose files differ from the sha256 its config recorded (older ones record none)."""
    for name, digest in (doc.get("files") or {}).items():
        f = Path(path) / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise GiftQuantError(f"{Path(path) / CONFIG_NAME}: files names {name!r}, outside the checkpoint")
        if not f.is_file():
            raise GiftQuantError(f"{f} is missing: the checkpoint is incomplete; re-create it")
        if sha256_file(f) != digest:
            raise GiftQuantError(f"{f} does not match the sha256 recorded when it was written (changed or corrupt "
                                 "on disk); re-create the checkpoint or restore the file")


def check_loaded(model: nn.Module, path: Path) -> None:
    """Non-finite scales, zeros or salient columns make a silently wrong model: refuse them, naming the layer."""
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            for buf in ("scales", "salient_weight", "bias"):
                t = getattr(m, buf, None)
                if t is not None and t.is_floating_point() and not torch.isfinite(t).all():
                    raise GiftQuantError(f"{path / WEIGHTS_NAME}: layer {name} has non-finite {buf}; "
                                         "the checkpoint is corrupt: re-create it")


def build_quant_skeleton(model: nn.Module, layers: dict, bits: int, sym: bool, salient_dtype: torch.dtype) -> None:
    """Swap the linears named in ``layers`` (name -> per-layer info) for empty QuantLinears."""
    for name, info in layers.items():
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            lin = None
        if not isinstance(lin, nn.Linear):
            raise GiftQuantError(f"{CONFIG_NAME} names layer {name!r}, which is not a linear layer of the model in "
                                 "config.json: the checkpoint is damaged; re-create it")
        set_module(model, name, QuantLinear.empty_like(lin, bits, sym, info["groups"], info["salient"], salient_dtype))


def _share_tied(model: nn.Module, missing: list[str]) -> list[str]:
    """Give both modules of a tied embedding pair the one stored tensor; ``missing`` without the other's name."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if inp is None or out is None:
        return missing
    names = {id(m): n for n, m in model.named_modules()}
    pair = {f"{names[id(inp)]}.weight", f"{names[id(out)]}.weight"}
    stored = out.weight if inp.weight.is_meta else inp.weight
    if stored.is_meta:
        return missing  # neither was stored: reported as missing
    inp.weight = out.weight = stored
    model.tie_weights()
    return [m for m in missing if m not in pair]


def load(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         trust_remote_code: bool = False):
    """A transformers model whose quantized linears are QuantLinear modules, ready for inference."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    path = Path(path)
    doc = read_gift_config(path)
    verify_files(path, doc)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    model_dtype = dtype or parse_dtype(doc.get("dtype", "float32"))
    # parameters on the meta device (no memory): the stored tensors are assigned in place of them below, so a
    # load never holds a dense fp32 copy of the model it does not keep (buffers such as rotary inv_freq stay real)
    with init_empty_weights(include_buffers=False), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=model_dtype, trust_remote_code=trust_remote_code)
    q = doc["quantize"]
    build_quant_skeleton(model, doc["layers"], q["bits"], q["sym"], parse_dtype(q["salient_dtype"]))
    try:
        state = load_file(str(path / WEIGHTS_NAME))
        # assign keeps the stored dtype: cast to the module's, as a copying load would (a dtype= request included)
        current = model.state_dict(keep_vars=True)
        state = {k: v.to(current[k].dtype) if k in current and v.is_floating_point() and v.dtype != current[k].dtype
                 else v for k, v in state.items()}
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except (RuntimeError, ValueError, OSError) as exc:  # shape mismatch (e.g. bits vs packed words), bad file
        raise GiftQuantError(f"{path / WEIGHTS_NAME} does not match {CONFIG_NAME} (bits, groups or salient "
                             f"counts): {str(exc).splitlines()[0][:200]}") from None
    if getattr(config, "tie_word_embeddings", False):
        missing = _share_tied(model, missing)  # save_model stored one tensor of the tied pair
    # rotary inv_freq and similar non-persistent buffers are rebuilt by the constructor, not stored
    missing = [m for m in missing if not m.endswith("inv_freq")]
    if missing or unexpected:
        raise GiftQuantError(
            f"{path / WEIGHTS_NAME} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    check_loaded(model, path)
    model.eval()
    # inference: generate() with the KV cache (training passes use_cache=False); checkpoints written before
    # 2026-12 record use_cache false, and from_config derives generation_config from it
    enable_kv_cache(model, path)
    return model.to(device)
