"""``inspect``: what a checkpoint folder holds, for the native format and for gift-quant's exports.

``inspect_checkpoint(path)`` returns a JSON-able dict; ``format_report(info)`` renders it for people.
Metadata, tensor headers, the (small) LoRA ``A`` matrices and, for a native checkpoint, the files' sha256
and its index and floating buffers (the integrity check) are read; no model weights are materialized.

Kinds recognised:

* ``gift-quant``: the native checkpoint (``gift_quant_config.json``): its health is the integrity check
  that load, eval and export run (packed/integrity.py: never "verified" where they refuse); bits, groups,
  salient columns and effective bits per layer as measured from the packed tensors, provenance.
* ``gptq-lora`` / ``gptq``: a GPTQ folder (``quantize_config.json`` or ``config.json``'s
  ``quantization_config``) with or without a PEFT adapter in ``adapter/``; the salient count of a layer
  is the number of non-zero rows of its ``lora_A``; effective bits are what the files store (padded
  LoRA rank and one-hot ``A`` included).
* ``compressed-tensors-lora`` / ``compressed-tensors``: a folder whose ``config.json`` names
  ``quant_method: compressed-tensors`` (e.g. ``gift-quant export --format compressed-tensors``), with or
  without a PEFT adapter in ``adapter/``: bits, strategy, group size and salient counts as for GPTQ;
  the layer shapes come from the ``weight_shape`` tensors.
* ``dense``: a plain Hugging Face folder: dtype and parameter count.

Any of them written by ``gift-quant export`` also carries ``gift_quant_export.json``, whose provenance
and native effective bits are reported.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from statistics import mean

from ..packed.served import DTYPE_BITS as _DTYPE_BITS
from ..packed.served import adapter_rows, ct_layers, gptq_layers, tensor_headers
from ..util.errors import GiftQuantError
from .vllm_command import vllm_command

__all__ = ["EXPORT_INFO", "NATIVE_CONFIG", "format_report", "inspect_checkpoint"]

NATIVE_CONFIG = "gift_quant_config.json"  # checkpoint.CONFIG_NAME, repeated to keep this module light
EXPORT_INFO = "gift_quant_export.json"  # export.EXPORT_INFO
_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _dir_size(path: Path, skip: tuple[str, ...] = ()) -> int:
    total = 0
    for f in path.rglob("*"):
        rel = f.relative_to(path).parts
        if f.is_file() and not (rel and rel[0] in skip):
            total += f.stat().st_size
    return total


def _salient_summary(counts: dict[str, int]) -> dict:
    vals = list(counts.values())
    if not vals:
        return {"layers": 0}
    return {"layers": len(vals), "min": min(vals), "mean": mean(vals), "max": max(vals), "total_columns": sum(vals)}


def _read_json(path: Path) -> dict | None:
    """A JSON object file, None when absent; a damaged one is refused in one line naming it."""
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise GiftQuantError(f"{path} is not valid JSON ({str(exc).splitlines()[0][:120]}): the folder is damaged "
                             "(truncated or edited); re-create it") from None
    return doc if isinstance(doc, dict) else None


# ---------------------------------------------------------------------------- kinds


def _native_health(path: Path) -> tuple[str, object]:
    """("verified ..." or "broken: why", the verification or None): the very check load, eval and export run
    (packed/integrity.py), so inspect never says verified where they refuse."""
    from ..packed.checkpoint import verify_checkpoint

    try:
        verified = verify_checkpoint(path)
    except GiftQuantError as exc:
        return f"broken: {exc}", None
    return ("verified (sha256 of " + ", ".join(sorted(verified.doc["files"])) + "; bits, groups and salient "
            "counts measured from the packed tensors match the config; the model in config.json has exactly "
            "the stored tensors)"), verified


def _inspect_native(path: Path) -> dict:
    from ..packed.checkpoint import read_gift_config, read_spec

    doc = read_gift_config(path)
    q, spec = doc.get("quantize", {}), read_spec(doc)
    health, verified = _native_health(path)
    measured = verified.layers if verified is not None else {}
    layers = []
    for n, i in doc.get("layers", {}).items():
        m = measured.get(n, {})  # facts from the tensors once verified; the config's record otherwise
        layers.append({"name": n, "in_features": m.get("in_features", i["in_features"]),
                       "out_features": m.get("out_features", i["out_features"]),
                       "salient": m.get("salient", i["salient"]), "groups": m.get("groups", i.get("groups")),
                       "bits": m.get("bits", spec.bits),
                       "effective_bits": m.get("effective_bits", i.get("effective_bits")),
                       "relative_error": i.get("relative_error")})
    config = _read_json(path / "config.json") or {}
    return {
        "kind": "gift-quant", "path": str(path), "model_type": config.get("model_type"),
        "health": health,
        "format_version": doc.get("format_version"), "tool": doc.get("tool"), "version": doc.get("version"),
        "bits": spec.bits, "group_size": spec.group_size, "sym": spec.sym, "act_order": q.get("act_order"),
        "static_groups": q.get("static_groups"), "group_layout": spec.group_layout,
        "metric": doc.get("metric", q.get("metric")), "salient_dtype": spec.salient_dtype,
        "compute_dtype": doc.get("dtype"),
        "salient": _salient_summary({row["name"]: row["salient"] for row in layers}),
        # measured from the stored tensors when they verify; the recorded figure is shown only beside a refusal
        "effective_bits": verified.effective_bits if verified is not None else None,
        "recorded_effective_bits": doc.get("effective_bits"), "layers": layers,
        "size_on_disk": _dir_size(path, skip=("run",)), "run_artifacts_size": _dir_size(path / "run"),
        "recovery": ({"variant": doc.get("variant"), **doc["recover"]} if doc.get("recover") else None),
        "provenance": doc.get("provenance"),
    }


def _gptq_config(path: Path) -> dict | None:
    qc = _read_json(path / "quantize_config.json")
    if qc is None:
        qc = (_read_json(path / "config.json") or {}).get("quantization_config")
    if qc and str(qc.get("quant_method", "gptq")).lower() == "gptq" and "bits" in qc:
        return qc
    return None


def _adapter_summary(path: Path, acfg: dict | None, a_rows: dict[str, int]) -> dict | None:
    if acfg is None:
        return None
    return {"rank": acfg.get("r"), "lora_alpha": acfg.get("lora_alpha"), "target_modules": acfg.get("target_modules"),
            "modules": len(a_rows), "size_on_disk": _dir_size(path / "adapter")}


def _inspect_gptq(path: Path, qc: dict) -> dict:
    acfg, a_rows, adapter_bits = adapter_rows(path)
    layers = gptq_layers(path, adapter_bits, a_rows)
    info_doc = _read_json(path / EXPORT_INFO) or {}
    total_w = sum(row["in_features"] * row["out_features"] for row in layers if row["in_features"])
    total_bits = sum(row["effective_bits"] * row["in_features"] * row["out_features"]
                     for row in layers if row["effective_bits"] is not None)
    return {
        "kind": "gptq-lora" if acfg is not None else "gptq", "path": str(path),
        "model_type": (_read_json(path / "config.json") or {}).get("model_type"),
        "bits": qc.get("bits"), "group_size": qc.get("group_size"), "sym": qc.get("sym"),
        "desc_act": qc.get("desc_act"),
        "checkpoint_format": qc.get("checkpoint_format", qc.get("format", "gptq")),
        **_export_common(path, acfg, a_rows, layers, total_bits, total_w, info_doc),
    }


def _ct_config(path: Path) -> dict | None:
    qc = (_read_json(path / "config.json") or {}).get("quantization_config")
    if qc and str(qc.get("quant_method", "")).lower() == "compressed-tensors":
        return qc
    return None


def _inspect_ct(path: Path, qc: dict) -> dict:
    acfg, a_rows, adapter_bits = adapter_rows(path)
    layers = ct_layers(path, adapter_bits, a_rows)
    groups = list((qc.get("config_groups") or {}).values())
    weights = (groups[0].get("weights") or {}) if groups and isinstance(groups[0], dict) else {}
    strategy = weights.get("strategy")
    info_doc = _read_json(path / EXPORT_INFO) or {}
    total_w = sum(row["in_features"] * row["out_features"] for row in layers)
    total_bits = sum(row["effective_bits"] * row["in_features"] * row["out_features"] for row in layers
                     if row["effective_bits"] is not None)
    return {
        "kind": "compressed-tensors-lora" if acfg is not None else "compressed-tensors", "path": str(path),
        "model_type": (_read_json(path / "config.json") or {}).get("model_type"),
        "bits": weights.get("num_bits"), "group_size": weights.get("group_size") if strategy == "group" else -1,
        "sym": weights.get("symmetric"), "strategy": strategy, "checkpoint_format": qc.get("format"),
        "config_groups": len(groups), "ignore": qc.get("ignore"),
        **_export_common(path, acfg, a_rows, layers, total_bits, total_w, info_doc),
    }


def _inspect_dense(path: Path) -> dict:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise GiftQuantError(f"{path} has no .safetensors weights to inspect")
    headers = tensor_headers(files)
    params = Counter()
    for dtype, shape in headers.values():
        n = 1
        for d in shape:
            n *= d
        params[dtype] += n
    floating = {d: n for d, n in params.items() if d in _DTYPE_NAMES}
    main = max(floating, key=floating.get) if floating else None
    info_doc = _read_json(path / EXPORT_INFO) or {}
    return {
        "kind": "dense", "path": str(path), "model_type": (_read_json(path / "config.json") or {}).get("model_type"),
        "dtype": _DTYPE_NAMES.get(main, main), "parameters": sum(params.values()),
        "bits_per_weight": _DTYPE_BITS.get(main) if main else None,
        "native_effective_bits": info_doc.get("native_effective_bits"),
        "salient": _salient_summary(info_doc.get("salient_per_layer") or {}) if info_doc else None,
        "size_on_disk": _dir_size(path),
        "provenance": info_doc.get("provenance"), "source_checkpoint": info_doc.get("source_checkpoint"),
    }


def _with_vllm(info: dict) -> dict:
    command, note = vllm_command(info)
    return {**info, "vllm": {"command": command, "note": note}}


def inspect_checkpoint(path: str | Path) -> dict:
    """A description of the checkpoint folder ``path`` (see the module docstring for the kinds)."""
    p = Path(path)
    if not p.is_dir():
        raise GiftQuantError(f"{p} is not a folder; inspect takes a checkpoint or export folder")
    if (p / NATIVE_CONFIG).is_file():
        return _inspect_native(p)
    qc = _gptq_config(p)
    if qc is not None:
        return _with_vllm(_inspect_gptq(p, qc))
    qc = _ct_config(p)
    if qc is not None:
        return _with_vllm(_inspect_ct(p, qc))
    if (p / "config.json").is_file():
        return _inspect_dense(p)
    if (p / "run" / "run.json").is_file():
        raise GiftQuantError(f"{p} is an unfinished gift-quant run: rerun the same command to finish it")
    raise GiftQuantError(f"{p} is neither a gift-quant checkpoint, a GPTQ or compressed-tensors folder nor a Hugging "
                         "Face model folder")


# ---------------------------------------------------------------------------- pretty printer


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _fmt_bits(b) -> str:
    return "?" if b is None else f"{b:.3f}"


def _provenance_lines(info: dict) -> list[str]:
    prov = info.get("provenance") or {}
    lines = []
    if info.get("source_checkpoint"):
        lines.append(f"  exported from {info['source_checkpoint']}")
    if prov.get("source_model"):
        lines.append(f"  source model  {prov['source_model']} (fingerprint {prov.get('model_fingerprint', '?')})")
    if prov.get("calibration_data"):
        lines.append(f"  calibration   {prov['calibration_data']} ({prov.get('calibration_tokens', '?')} tokens, "
                     f"fingerprint {prov.get('calibration_fingerprint', '?')})")
    for k, v in prov.items():
        if k not in ("source_model", "model_fingerprint", "calibration_data", "calibration_tokens",
                     "calibration_fingerprint"):
            lines.append(f"  {k:<13} {v}")
    return lines


def format_report(info: dict, layers: bool = True) -> str:
    """Human-readable text of ``inspect_checkpoint``'s dict; ``layers`` adds the per-layer table."""
    kind = info["kind"]
    out = [f"{kind} checkpoint: {info['path']}"]
    if info.get("health"):
        out.append(f"  health        {info['health']}")
    if info.get("model_type"):
        out.append(f"  model         {info['model_type']}")
    if kind == "dense":
        out.append(f"  weights       {info['parameters']:,} parameters, {info['dtype']}")
        if info.get("native_effective_bits") is not None:
            out.append(f"  merged from   a {info['native_effective_bits']:.3f} bits/weight gift-quant checkpoint")
    else:
        gs = info.get("group_size")
        grid = ["sym" if info.get("sym") else "asym", f"group size {gs}" if gs and gs > 0 else "per-row groups"]
        if gs and gs > 0 and info.get("group_layout"):
            grid.append(f"{info['group_layout']} layout")
        if info.get("act_order") or info.get("desc_act"):
            grid.append("act-order" if kind == "gift-quant" else "desc_act")
        if info.get("static_groups"):
            grid.append("static groups")
        if info.get("strategy"):
            grid.append(f"{info['strategy']} strategy")
        if info.get("checkpoint_format"):
            grid.append(f"format {info['checkpoint_format']}")
        out.append(f"  bits          {info['bits']} ({', '.join(grid)})")
        sal = info.get("salient")
        if sal and sal.get("layers"):
            out.append(f"  salient       per layer min {sal['min']} / mean {sal['mean']:.1f} / max {sal['max']} "
                       f"({sal['total_columns']} columns in {sal['layers']} layers)")
        if info.get("adapter"):
            a = info["adapter"]
            out.append(f"  adapter       LoRA rank {a['rank']}, alpha {a['lora_alpha']}, {a['modules']} modules, "
                       f"{_size(a['size_on_disk'])}")
        exported = kind.startswith(("gptq", "compressed-tensors"))
        if kind == "gift-quant":
            measured = info.get("effective_bits")
            out.append(f"  eff. bits     {_fmt_bits(measured)} bits/weight, measured from the stored tensors"
                       if measured is not None else f"  eff. bits     not measured (the checkpoint is broken; its "
                       f"config records {_fmt_bits(info.get('recorded_effective_bits'))})")
        else:
            out.append(f"  eff. bits     {_fmt_bits(info.get('effective_bits'))} bits/weight"
                       + (" as stored (padded LoRA included)" if exported else ""))
        if exported and info.get("native_effective_bits") is not None:
            out.append(f"  native bits   {info['native_effective_bits']:.3f} bits/weight in the source checkpoint")
    rec = info.get("recovery")
    if rec:
        noise = f"noise {rec.get('noise')}" + (f" at {rec['noise_bits']} bits" if rec.get("noise_bits") else "")
        out.append(f"  recovered     GIFT-SW {rec.get('variant') or 'post'}, {rec.get('steps')} steps, "
                   f"lr {rec.get('lr')}, {noise}")
    size = f"  size on disk  {_size(info.get('size_on_disk'))}"
    if info.get("run_artifacts_size"):
        size += f" (+ {_size(info['run_artifacts_size'])} of run/ artifacts)"
    out.append(size)
    out.extend(_provenance_lines(info))
    if info.get("vllm"):
        v = info["vllm"]
        out.append(f"  vllm serve    {v['command']}" if v["command"] else f"  vllm          not servable: {v['note']}")
        if v["command"] and v["note"]:
            out.append(f"                ({v['note']})")
    if layers and info.get("layers"):
        rows = info["layers"]
        width = max(len(r["name"]) for r in rows)
        out.append("")
        out.append(f"  {'layer':<{width}}  {'in':>6} {'out':>6} {'K':>5} {'groups':>6} {'bits/w':>7}")
        for r in rows:
            out.append(f"  {r['name']:<{width}}  {r['in_features'] or '?':>6} {r['out_features']:>6} "
                       f"{r['salient']:>5} {r['groups'] if r['groups'] is not None else '?':>6} "
                       f"{_fmt_bits(r['effective_bits']):>7}")
    return "\n".join(out)


def _export_common(path: Path, acfg, a_rows, layers: list[dict], total_bits: float, total_w: int,
                   info_doc: dict) -> dict:
    """The report fields every export kind shares: adapter, salient counts, bits, size, provenance."""
    return {
        "adapter": _adapter_summary(path, acfg, a_rows),
        "salient": _salient_summary({row["name"]: row["salient"] for row in layers}) if acfg is not None else None,
        "effective_bits": total_bits / total_w if total_w else None,
        "native_effective_bits": info_doc.get("native_effective_bits"),
        "layers": layers, "size_on_disk": _dir_size(path),
        "provenance": info_doc.get("provenance"), "source_checkpoint": info_doc.get("source_checkpoint"),
    }
