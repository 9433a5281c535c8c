"""``gift-quant finetune``: GIFT-SW as a PEFT method for full-precision models.

Stages, resumable like ``recover`` (``OUT/run/``): select the salient columns of every block linear
with the sensitivity metric on calibration data (no quantization), train them with noise injected
into the frozen rest (or without, ``--no-noise``), then save

* ``OUT/``: the merged model as an ordinary Hugging Face folder in the input's dtype, and
* ``OUT/adapter/``: the salient deltas alone as a PEFT LoRA adapter (lora_A one-hot rows selecting
  the salient inputs, lora_B the deltas, alpha = r), which peft applies to the untouched base model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..config.settings import QuantizeConfig, RecoverConfig, Runtime
from ..model.loading import check_lengths, enable_kv_cache, load_tokenizer, resolve_device, resolve_model_dir
from ..packed.checkpoint import copy_tokenizer_files
from ..packed.run_folder import RunFiles, Stages, claim_run, prepare_output, warn
from ..recover.loop import state_problem
from ..recover.model import convert_to_dense, prepare_dense, salient_layers
from ..recover.training import train_stage
from ..util.errors import writing
from ..util.files import atomic_save_tensors, atomic_write_text
from .stages import check_data, load_source, run_inputs, select_salient

__all__ = ["run_finetune", "source_dtype"]


def source_dtype(model_dir: Path) -> torch.dtype:
    cfg = json.loads((model_dir / "config.json").read_text())
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return getattr(torch, name) if isinstance(name, str) and hasattr(torch, name) else torch.float32


def run_finetune(model_dir: str | None, out: str | Path, qcfg: QuantizeConfig, rcfg: RecoverConfig,
                 overwrite: bool = False, runtime: Runtime = Runtime()) -> dict:
    from ..export.adapter import lora_rank, write_adapter

    out = Path(out)
    src = resolve_model_dir(model_dir)
    resolve_device(runtime.device)  # an unavailable --device is refused before the output folder is touched
    check_lengths(src, {"--seq-len": qcfg.seq_len, "recover.seq_len": rcfg.seq_len}, runtime.trust_remote_code)
    check_data(load_tokenizer(src, runtime.trust_remote_code), qcfg, rcfg)  # the training text, before any stage
    prepare_output(out, overwrite, inputs=run_inputs(src, qcfg, rcfg))
    in_dtype = source_dtype(src)
    # train in fp32, save in the input's dtype
    tokenizer, model, windows, identity = load_source(src, qcfg, torch.float32, runtime)
    identity["finetune"] = rcfg.identity(resolve_device(runtime.device))  # the precision as resolved here
    run_dir = claim_run(out, identity)
    stages = Stages(run_dir)
    # run/ is a cache (packed/run_folder.py): a finished stage whose artifact fails its sha256 check is recomputed
    files, salient_path = RunFiles(run_dir), run_dir / "salient.safetensors"
    for stage, why in (("select", stages.finished("select") and files.problem([salient_path])),
                       ("train", stages.finished("train") and state_problem(run_dir / "train" / "state"))):
        if why:
            warn(f"{why}; recomputing the {stage} stage")
            stages.drop(stage)
    if not stages.finished("select"):
        salient = select_salient(model, windows, qcfg, runtime)
        atomic_save_tensors(salient_path, salient)
        files.record([salient_path])
        stages.mark("select", {"layers": len(salient)})
    salient = load_file(str(run_dir / "salient.safetensors"))
    originals = {n: model.get_submodule(n).weight.detach()[:, salient[n].long()].clone() for n in salient}
    noise = rcfg.noise_spec(None)  # fine-tuning: nothing is quantized afterwards
    prepare_dense(model, salient, noise=noise, seed=rcfg.seed)
    summary = {}
    if not stages.finished("train"):
        summary = train_stage(model, tokenizer, rcfg, run_dir / "train", runtime, teacher_src=src, qcfg=qcfg)
        stages.mark("train", {"final_loss": summary["history"][-1]["loss"] if summary["history"] else None})
    else:  # training finished earlier: its final state holds the trained columns
        tensors = load_file(str(run_dir / "train" / "state" / "trainable.safetensors"))
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, t in tensors.items():
                params[n].copy_(t)
    layers = salient_layers(model)
    deltas = {n: (s.salient_idx.cpu(), (s.gift_salient.detach().cpu() - originals[n]), s.in_features)
              for n, s in layers.items()}
    max_k = max(v[0].numel() for v in deltas.values())
    r = lora_rank(max_k)
    convert_to_dense(model.cpu(), dtype=in_dtype)
    model.to(in_dtype)
    write_adapter(out / "adapter", deltas, r, sorted({n.rsplit(".", 1)[-1] for n in deltas}),
                  base_model=str(src.resolve()))
    enable_kv_cache(model)  # the merged model is for inference: its config.json and generation config say so
    with writing(out):
        model.save_pretrained(out)
        copied = copy_tokenizer_files(src, out)
    trainable = sum(v[1].numel() for v in deltas.values())
    result = {"out": str(out), "adapter": str(out / "adapter"), "lora_rank": r, "trainable_params": trainable,
              "noise": noise.kind, "noise_bits": noise.bits, "dtype": str(in_dtype).replace("torch.", ""),
              "final_loss": stages.done["train"].get("final_loss"), "copied_files": copied}
    atomic_write_text(out / "finetune_summary.json", json.dumps(result, indent=1))
    return result
