"""The native gift-quant checkpoint: save and ``load``.

Layout of a checkpoint folder::

    config.json, generation_config.json, tokenizer files   (copied from the source model)
    model.safetensors        every tensor: QuantLinear buffers for quantized linears, the rest as is
    gift_quant_config.json   format version, the storage spec of every quantized linear ("spec": bits,
                             sym, group size, layout, salient dtype; written once, from the layers
                             themselves), the other quantize settings, per-layer K and effective bits,
                             provenance, and the sha256 of every file above ("files"); written last, so
                             its presence means the checkpoint is complete, and `load` refuses a file
                             that changed

Format versions: 1 kept the spec's values inside "quantize" (and bits / group_size again at the top);
2 writes them once, under "spec". `read_spec` (integrity.py) reads both, so older checkpoints still load.

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

from ..config.settings import GROUP_LAYOUTS, SALIENT_DTYPES, SPEC_FIELDS, SUPPORTED_BITS, QuantSpec
from ..model.arch import set_module
from ..model.loading import enable_kv_cache, parse_dtype
from ..util.errors import GiftQuantError, writing
from ..util.files import atomic_path, atomic_write_text, sha256_file
from .integrity import read_spec
from .qlinear import QuantLinear

__all__ = ["CONFIG_NAME", "FORMAT", "FORMAT_VERSION", "MANIFEST_REQUIRED", "MANIFEST_SINCE_VERSION", "WEIGHTS_NAME",
           "copy_tokenizer_files", "is_checkpoint", "load", "model_spec", "read_gift_config", "save_checkpoint",
           "verify_checkpoint", "verify_files"]

FORMAT = "gift-quant"
FORMAT_VERSION = 2
# Every format version from this one on records the sha256 manifest ("files"): a checkpoint of such a version
# whose manifest is missing, empty or incomplete is damaged, never "legacy" (integrity.py).
MANIFEST_SINCE_VERSION = 1
MANIFEST_REQUIRED = ("model.safetensors", "config.json")  # what every manifest names
CONFIG_NAME = "gift_quant_config.json"
WEIGHTS_NAME = "model.safetensors"
_COPY_PATTERNS = ("tokenizer*", "special_tokens_map.json", "vocab.*", "merges.txt", "chat_template*",
                  "generation_config.json", "*.model", "added_tokens.json")


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer and generation files of ``src`` into ``dst``; returns their names (sorted). The
    generation config's ``use_cache`` is set true: what gift-quant writes is for inference."""
    names = set()
    for pattern in _COPY_PATTERNS:
        for f in src.glob(pattern):
            if f.is_file():
                shutil.copy2(f, dst / f.name)
                names.add(f.name)
    gen = dst / "generation_config.json"
    if "generation_config.json" in names:
        try:
            doc = json.loads(gen.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            doc = None  # not ours to repair; transformers reports it when it reads the folder
        if isinstance(doc, dict) and doc.get("use_cache") is False:
            doc["use_cache"] = True
            atomic_write_text(gen, json.dumps(doc, indent=2) + "\n")
    return sorted(names)


def model_spec(model: nn.Module) -> QuantSpec:
    """The one QuantSpec the model's packed layers carry (a checkpoint stores one spec for all of them)."""
    specs = {m.spec for m in model.modules() if isinstance(m, QuantLinear)}
    if len(specs) != 1:
        raise ValueError(f"a checkpoint holds packed layers of exactly one spec; this model has {len(specs)}: "
                         f"{sorted(map(str, specs))[:3]}")
    return specs.pop()


def save_checkpoint(model: nn.Module, out_dir: Path, source_dir: Path, gift_config: dict) -> None:
    """Write the checkpoint files into ``out_dir``, each atomically, the gift config last.

    ``gift_config``: settings, per-layer metrics and provenance; the spec is taken from the model's layers
    and written once (any copy of its values among the settings is dropped).
    """
    spec = model_spec(model)
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
        copied = copy_tokenizer_files(source_dir, out_dir)
    # the format, spec and manifest are this writer's, never those of a config ``gift_config`` was copied from
    written_here = ("format", "format_version", "spec", "files", "copied_files", *SPEC_FIELDS)
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "spec": spec.to_json(),
           **{k: v for k, v in gift_config.items() if k not in written_here}}
    doc["quantize"] = {k: v for k, v in doc.get("quantize", {}).items() if k not in SPEC_FIELDS}
    doc["files"] = {name: sha256_file(out_dir / name) for name in (WEIGHTS_NAME, "config.json")}
    doc["copied_files"] = copied  # not verified (users edit chat templates); named so --overwrite knows them
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
    if version < 1:
        raise GiftQuantError(f"{f}: format_version {version} is not a version gift-quant ever wrote: the checkpoint "
                             "is damaged; re-create it")
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
    if doc["format_version"] >= 2:
        s, where = need(doc, "spec", (dict,), "", hint="an object"), "spec."
    else:
        s, where = q, "quantize."
    need(s, "bits", (int,), where, lambda b: b in SUPPORTED_BITS, f"one of {list(SUPPORTED_BITS)}")
    need(s, "sym", (bool,), where)
    need(s, "salient_dtype", (str,), where, lambda v: v in SALIENT_DTYPES, " or ".join(SALIENT_DTYPES))
    if doc["format_version"] >= 2:
        need(s, "group_size", (int,), where, lambda g: g == -1 or g > 0, "-1 or a positive integer")
        need(s, "group_layout", (str,), where, lambda v: v in GROUP_LAYOUTS, " or ".join(GROUP_LAYOUTS))
        for where_else, holder in (("", doc), ("quantize.", q)):  # written once: a second copy is an edit
            for key in SPEC_FIELDS:
                if key in holder:
                    raise GiftQuantError(f"{f}: {where_else}{key} = {holder[key]!r} is recorded outside spec (format "
                                         f"{doc['format_version']} keeps it in spec only): the checkpoint was edited; "
                                         "re-create it")
        unknown = set(s) - set(SPEC_FIELDS)
        if unknown:
            raise GiftQuantError(f"{f}: spec has unknown key(s) {sorted(unknown)}: the checkpoint is damaged or "
                                 "from a newer gift-quant")
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
    """Refuse a checkpoint whose manifest is incomplete for its format version, names a file outside the
    folder, or records a sha256 that a file no longer has."""
    f = Path(path) / CONFIG_NAME
    files = doc.get("files")
    if doc["format_version"] >= MANIFEST_SINCE_VERSION:
        if not files:
            raise GiftQuantError(f"{f} records no file manifest ('files' is {files!r}), which every {FORMAT} "
                                 f"v{doc['format_version']} checkpoint has: the checkpoint is damaged (edited); "
                                 "re-create it")
        lacking = [n for n in MANIFEST_REQUIRED if n not in files]
        if lacking:
            raise GiftQuantError(f"{f}: the file manifest does not name {lacking[0]}: the checkpoint is damaged "
                                 "(edited); re-create it")
    for name, digest in (files or {}).items():
        parts = Path(name).parts
        if not name or Path(name).is_absolute() or ".." in parts or "\\" in name or parts[:1] == (".",) \
                or str(Path(*parts)) != name:
            raise GiftQuantError(f"{f}: files names {name!r}, outside the checkpoint folder: the checkpoint is "
                                 "damaged; re-create it")
        target = Path(path) / name
        if not target.is_file():
            raise GiftQuantError(f"{target} is missing: the checkpoint is incomplete; re-create it")
        if sha256_file(target) != digest:
            raise GiftQuantError(f"{target} does not match the sha256 recorded when it was written (changed or "
                                 "corrupt on disk); re-create the checkpoint or restore the file")


def verify_checkpoint(path: str | os.PathLike, trust_remote_code: bool = False):
    """The one integrity check of every reader (load, eval, export, inspect, resume; integrity.py says what
    it checks): returns an ``integrity.Verified`` (the config and the facts measured from the tensors)."""
    from .integrity import Verified, verify_model, verify_tensors

    path = Path(path)
    doc = read_gift_config(path)
    q = doc["quantize"]
    for key in ("bits", "group_size"):  # the top-level copies readers show must be the settings readers use
        if key in doc and key in q and doc[key] != q[key]:
            raise GiftQuantError(f"{path / CONFIG_NAME}: {key} {doc[key]!r} disagrees with quantize.{key} "
                                 f"{q[key]!r}: the checkpoint is damaged (edited); re-create it")
    verify_files(path, doc)
    layers, other = verify_tensors(path, doc)
    verify_model(path, doc, other, trust_remote_code)
    return Verified(doc, layers)


def _check_loaded(model: nn.Module, path: Path) -> None:
    """Non-finite scales, zeros or salient columns make a silently wrong model: refuse them, naming the layer."""
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            for buf in ("scales", "salient_weight", "bias"):
                t = getattr(m, buf, None)
                if t is not None and t.is_floating_point() and not torch.isfinite(t).all():
                    raise GiftQuantError(f"{path / WEIGHTS_NAME}: layer {name} has non-finite {buf}; "
                                         "the checkpoint is corrupt: re-create it")


def _build_quant_skeleton(model: nn.Module, layers: dict, spec: QuantSpec) -> None:
    """Swap the linears named in ``layers`` (name -> per-layer info) for empty QuantLinears."""
    for name, info in layers.items():
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            lin = None
        if not isinstance(lin, nn.Linear):
            raise GiftQuantError(f"{CONFIG_NAME} names layer {name!r}, which is not a linear layer of the model in "
                                 "config.json: the checkpoint is damaged; re-create it")
        set_module(model, name, QuantLinear.empty_like(lin, spec, info["groups"], info["salient"]))


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
         trust_remote_code: bool = False, verified=None):
    """A transformers model whose quantized linears are QuantLinear modules, ready for inference.

    The checkpoint passes integrity.verify_checkpoint first (``verified``: its result, when the caller ran it).
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    path = Path(path)
    doc = (verified or verify_checkpoint(path, trust_remote_code)).doc
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    model_dtype = dtype or parse_dtype(doc.get("dtype", "float32"))
    # parameters on the meta device (no memory): the stored tensors are assigned in place of them below, so a
    # load never holds a dense fp32 copy of the model it does not keep (buffers such as rotary inv_freq stay real)
    with init_empty_weights(include_buffers=False), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=model_dtype, trust_remote_code=trust_remote_code)
    _build_quant_skeleton(model, doc["layers"], read_spec(doc))
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
    _check_loaded(model, path)
    model.eval()
    # inference: generate() with the KV cache (training passes use_cache=False); checkpoints written before
    # 2026-12 record use_cache false, and from_config derives generation_config from it
    enable_kv_cache(model, path)
    return model.to(device)
