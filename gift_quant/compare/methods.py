"""What each ``compare`` method is: a composition of the stages (stages.py), in one table.

A method function takes the shared `Job` and returns ``(model, effective bits, checkpoint path)``:
the model is then evaluated like every other. Trained methods start from the ``owq`` checkpoint
(GPTQ + salient columns, untrained) so that they differ only in what training does.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config.settings import EvalConfig, NoiseSpec, QuantizeConfig, RecoverConfig
from ..model.loading import load_model
from ..packed.checkpoint import load, read_gift_config, save_checkpoint
from ..workflows.stages import convert_recovered, prepare_recovery, quantize_to_checkpoint, train_stage


@dataclass
class Job:
    """Everything one method run needs; ``timed`` records each stage's seconds in ``timings``."""

    method: str
    model_dir: str | None
    src: Path
    root: Path
    qcfg: QuantizeConfig
    rcfg: RecoverConfig
    ecfg: EvalConfig
    tokenizer: object
    device: torch.device
    row: dict
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def work(self) -> Path:
        return self.root / self.method

    @property
    def salient_base(self) -> Path:
        return self.root / "owq" / "ckpt"

    @property
    def k0(self) -> QuantizeConfig:
        return dataclasses.replace(self.qcfg, salient=0, salient_fraction=0.0)

    def timed(self, stage: str, fn: Callable, *a, **k):
        s = time.perf_counter()
        r = fn(*a, **k)
        self.timings[stage] = time.perf_counter() - s
        return r

    def train(self, model) -> dict:
        return self.timed("train", train_stage, model, self.tokenizer, self.rcfg, self.work / "train", self.device,
                          progress=False, teacher_src=self.src, qcfg=self.qcfg)

    def save(self, model, extra: dict) -> tuple[float, Path]:
        ckpt = self.work / "ckpt"
        save_checkpoint(model, ckpt, self.src, {**read_gift_config(self.salient_base), **extra})
        return read_gift_config(ckpt)["effective_bits"], ckpt


def quantized(job: Job, out: Path, qcfg: QuantizeConfig) -> float:
    """Quantize into ``out`` unless a checkpoint is there; its effective bits."""
    if not (out / "gift_quant_config.json").is_file():
        job.timed("quantize", quantize_to_checkpoint, job.model_dir, out, qcfg, progress=False)
    return read_gift_config(out)["effective_bits"]


# ------------------------------------------------------------------ the methods


def fp(job: Job):
    return load_model(job.src), 32.0, job.src


def _quantize_with(qcfg_of: Callable[[Job], QuantizeConfig]):
    def method(job: Job):
        ckpt = job.work / "ckpt"
        bits = quantized(job, ckpt, qcfg_of(job))
        return load(ckpt), bits, ckpt
    return method


def _matched_qcfg(job: Job) -> QuantizeConfig:
    target = json.loads((job.root / "owq" / "result.json").read_text())["effective_bits"]
    layers = read_gift_config(job.salient_base)["layers"]
    g = matched_group_size(target, job.qcfg.bits, layers)
    job.row["group_size"] = g
    return dataclasses.replace(job.k0, group_size=g)


def gptq_peer(job: Job):
    from .gptqmodel_peer import quantize_with_gptqmodel

    ckpt = job.work / "ckpt"
    model, bits = job.timed("quantize", quantize_with_gptqmodel, job.src, ckpt, job.k0)
    return model, bits, ckpt


def _salient_training(noise_of: Callable[[Job], str]):
    """Post-training recovery of the salient columns (GIFT-SW post; without noise: salient fine-tuning)."""
    def method(job: Job):
        quantized(job, job.salient_base, job.qcfg)
        rcfg = dataclasses.replace(job.rcfg, noise=noise_of(job))
        model = prepare_recovery(job.salient_base, job.src, rcfg.noise_spec(job.qcfg.bits), rcfg.seed)
        job.train(model)
        convert_recovered(model)
        return (model, *job.save(model, {"method": job.method}))
    return method


def ste(job: Job):
    from ..recover.qat import convert_qat, prepare_qat

    quantized(job, job.salient_base, job.qcfg)
    model = prepare_qat(load(job.salient_base))
    job.train(model)
    convert_qat(model.cpu())
    return (model, *job.save(model, {"method": job.method}))


def quik_lora(job: Job):
    from peft import LoraConfig, get_peft_model

    from ..recover.model import convert_to_dense, prepare_quantized

    base_bits = quantized(job, job.salient_base, job.qcfg)
    model = convert_to_dense(prepare_quantized(load(job.salient_base), noise=NoiseSpec("none")))
    model.requires_grad_(False)
    layers = read_gift_config(job.salient_base)["layers"]
    targets = sorted({n.rsplit(".", 1)[-1] for n in layers})
    torch.manual_seed(job.rcfg.seed)  # LoRA's A is drawn from the global generator: seed it for reruns
    model = get_peft_model(model, LoraConfig(r=64, lora_alpha=64, lora_dropout=0.0, target_modules=targets))
    job.train(model)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    quant_w = sum(v["in_features"] * v["out_features"] for v in layers.values())
    model.save_pretrained(job.work / "adapter")
    return model, base_bits + 16 * lora / quant_w, job.work / "adapter"


def gift_pre(job: Job):
    from ..workflows.commands import run_recover

    # the pre variant injects noise at the target bits (the paper); rcfg.noise_bits is the post variant's
    pre = dataclasses.replace(job.rcfg, variant="pre", noise_bits=job.qcfg.bits)
    job.row["noise_bits"] = job.qcfg.bits
    ckpt = job.work / "ckpt"
    summary = job.timed("recover", run_recover, job.model_dir, ckpt, job.qcfg, pre, job.ecfg, progress=False)
    return load(ckpt), summary["effective_bits"], ckpt


METHOD_TABLE: dict[str, Callable[[Job], tuple]] = {
    "fp": fp,
    "rtn": _quantize_with(lambda job: dataclasses.replace(job.k0, algorithm="rtn")),
    "gptq": _quantize_with(lambda job: job.k0),
    "gptq-peer": gptq_peer,
    "gptq-matched": _quantize_with(_matched_qcfg),
    "owq": _quantize_with(lambda job: job.qcfg),
    "salient-ft": _salient_training(lambda job: "none"),
    "gift-post": _salient_training(lambda job: job.rcfg.noise),
    "gift-pre": gift_pre,
    "ste": ste,
    "quik-lora": quik_lora,
}


def matched_group_size(target_bits: float, bits: int, layers: dict) -> int:
    """Largest group size whose K = 0 effective bits (over the same layers) reach ``target_bits``."""
    from ..packed.qlinear import effective_bits

    def mean_bits(g: int) -> float:
        num = den = 0.0
        for v in layers.values():
            i, o = v["in_features"], v["out_features"]
            num += effective_bits(i, o, bits, -(-i // g), 0, True) * i * o
            den += i * o
        return num / den

    for g in (1024, 512, 256, 128, 64, 32, 16, 8):
        if mean_bits(g) >= target_bits:
            return g
    return 8
