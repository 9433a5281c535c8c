"""What each ``compare`` method is: a composition of the shared stages (workflows/stages.py), registered by name.

A method's ``build`` takes the shared `Job` and returns ``(model, effective bits, deployable path)``:
the model is then evaluated like every other. Trained methods start from the ``owq`` checkpoint
(GPTQ + salient columns, untrained) so that they differ only in what training does; a method says so
with ``needs``, and the comparison runs what it needs first. Adding a method is one ``@register``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config.settings import (
    E2E_TRAINABLE,
    EvalConfig,
    NoiseSpec,
    QuantizeConfig,
    RecoverConfig,
    Runtime,
    trainable_sets,
)
from ..model.loading import load_model, resolve_device
from ..packed.checkpoint import load, read_gift_config, save_checkpoint
from ..util.seeds import derive_seed
from ..workflows.stages import convert_recovered, prepare_recovery, quantize_to_checkpoint, train_stage

__all__ = ["METHODS", "REFERENCE", "SALIENT_START", "Job", "Method", "fp", "gift_pre", "gptq_peer",
           "matched_group_size", "quantized", "quik_lora", "register", "run_order", "ste"]

REFERENCE = "fp"  # the full-precision model every gap is measured against
SALIENT_START = "owq"  # GPTQ + salient columns, untrained: where the trained methods start


@dataclass(frozen=True)
class Method:
    """One comparison method: how it is built and what the comparison must know about it."""

    name: str
    summary: str
    build: Callable[[Job], tuple]
    trains: bool = False  # a trained method: its row gets a "gap closed" against SALIENT_START
    per_bit_width: bool = True  # False: the same model whatever --bits (run once)
    needs: tuple[str, ...] = ()  # methods whose outputs it starts from (run first, added when missing)
    size_includes: tuple[str, ...] = ()  # other methods' folders counted in its deployable size


METHODS: dict[str, Method] = {}  # registration order is the report order


def register(name: str, summary: str, **traits):
    """Decorator: register ``build`` under ``name``."""
    def add(build: Callable[[Job], tuple]):
        METHODS[name] = Method(name, summary, build, **traits)
        return build
    return add


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
    runtime: Runtime
    row: dict
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def work(self) -> Path:
        return self.root / self.method

    @property
    def device(self) -> torch.device:
        return resolve_device(self.runtime.device)

    @property
    def salient_base(self) -> Path:
        return self.root / SALIENT_START / "ckpt"

    @property
    def k0(self) -> QuantizeConfig:
        return dataclasses.replace(self.qcfg, salient=0, salient_fraction=0.0)

    def timed(self, stage: str, fn: Callable, *a, **k):
        s = time.perf_counter()
        r = fn(*a, **k)
        self.timings[stage] = time.perf_counter() - s
        return r

    def train(self, model) -> dict:
        return self.timed("train", train_stage, model, self.tokenizer, self.rcfg, self.work / "train", self.runtime,
                          teacher_src=self.src, qcfg=self.qcfg)

    def save(self, model, extra: dict) -> tuple[float, Path]:
        ckpt = self.work / "ckpt"
        save_checkpoint(model, ckpt, self.src, {**read_gift_config(self.salient_base), **extra})
        return read_gift_config(ckpt)["effective_bits"], ckpt


def quantized(job: Job, out: Path, qcfg: QuantizeConfig) -> float:
    """Quantize into ``out`` unless a checkpoint is there; its effective bits."""
    if not (out / "gift_quant_config.json").is_file():
        job.timed("quantize", quantize_to_checkpoint, job.model_dir, out, qcfg, runtime=job.runtime)
    return read_gift_config(out)["effective_bits"]


# ------------------------------------------------------------------ the methods


@register("fp", "full-precision reference (no quantization)", per_bit_width=False)
def fp(job: Job):
    return load_model(job.src), 32.0, job.src


def _quantized_method(qcfg_of: Callable[[Job], QuantizeConfig]):
    def build(job: Job):
        ckpt = job.work / "ckpt"
        bits = quantized(job, ckpt, qcfg_of(job))
        return load(ckpt), bits, ckpt
    return build


register("rtn", "round-to-nearest, K = 0")(_quantized_method(lambda job: dataclasses.replace(job.k0, algorithm="rtn")))
register("gptq", "gift-quant GPTQ, K = 0")(_quantized_method(lambda job: job.k0))


@register("gptq-peer", "GPTQModel's GPTQ (the peer; needs the [peers] extra), K = 0")
def gptq_peer(job: Job):
    from .gptqmodel_peer import quantize_with_gptqmodel

    ckpt = job.work / "ckpt"
    model, bits = job.timed("quantize", quantize_with_gptqmodel, job.src, ckpt, job.k0, job.runtime)
    return model, bits, ckpt


def _matched_qcfg(job: Job) -> QuantizeConfig:
    target = json.loads((job.root / SALIENT_START / "result.json").read_text())["effective_bits"]
    layers = read_gift_config(job.salient_base)["layers"]
    g = matched_group_size(target, job.qcfg.bits, layers)
    job.row["group_size"] = g
    return dataclasses.replace(job.k0, group_size=g)


register("gptq-matched", "GPTQ, K = 0, with the smallest group size whose effective bits reach GIFT-SW's",
         needs=(SALIENT_START,))(_quantized_method(_matched_qcfg))
register(SALIENT_START, "GPTQ + salient columns, no training (OWQ / QUIK style)")(
    _quantized_method(lambda job: job.qcfg))


def _salient_training(noise_of: Callable[[Job], str]):
    """Post-training recovery of the salient columns (GIFT-SW post; without noise: salient fine-tuning)."""
    def build(job: Job):
        quantized(job, job.salient_base, job.qcfg)
        rcfg = dataclasses.replace(job.rcfg, noise=noise_of(job))
        model = prepare_recovery(job.salient_base, job.src, rcfg.noise_spec(job.qcfg.bits), rcfg.seed,
                                 runtime=job.runtime, train=trainable_sets(rcfg.train, E2E_TRAINABLE, "--train"))
        job.train(model)
        convert_recovered(model)
        return (model, *job.save(model, {"method": job.method}))
    return build


register("salient-ft", "post-quantization salient fine-tuning without noise (ablation)", trains=True,
         needs=(SALIENT_START,))(_salient_training(lambda job: "none"))
register("gift-post", "GIFT-SW post (noise at --noise-bits, 4 by default)", trains=True,
         needs=(SALIENT_START,))(_salient_training(lambda job: job.rcfg.noise))


@register("gift-pre", "GIFT-SW pre (train with noise at the target bits, then quantize)", trains=True)
def gift_pre(job: Job):
    from ..workflows.commands import run_recover

    # the same settings as `recover --variant pre`: RecoverConfig.noise_spec gives the pre variant's noise
    pre = dataclasses.replace(job.rcfg, variant="pre")
    job.row["noise_bits"] = pre.noise_spec(job.qcfg.bits).bits
    ckpt = job.work / "ckpt"
    summary = job.timed("recover", run_recover, job.model_dir, ckpt, job.qcfg, pre, job.ecfg, runtime=job.runtime)
    return load(ckpt), summary["effective_bits"], ckpt


@register("ste", "STE quantization-aware training of all weights, salient columns in full precision", trains=True,
          needs=(SALIENT_START,))
def ste(job: Job):
    from ..recover.qat import convert_qat, prepare_qat

    quantized(job, job.salient_base, job.qcfg)
    model = prepare_qat(load(job.salient_base))
    job.train(model)
    convert_qat(model.cpu())
    return (model, *job.save(model, {"method": job.method}))


@register("quik-lora", "LoRA rank 64 on the frozen GPTQ + salient model", trains=True, needs=(SALIENT_START,),
          size_includes=(SALIENT_START,))
def quik_lora(job: Job):
    from peft import LoraConfig, get_peft_model

    from ..recover.model import convert_to_dense, prepare_quantized

    base_bits = quantized(job, job.salient_base, job.qcfg)
    model = convert_to_dense(prepare_quantized(load(job.salient_base), noise=NoiseSpec("none")))
    model.requires_grad_(False)
    layers = read_gift_config(job.salient_base)["layers"]
    targets = sorted({n.rsplit(".", 1)[-1] for n in layers})
    # LoRA's A is drawn from the global generator: seed it for reruns
    torch.manual_seed(derive_seed(job.rcfg.seed, "lora-init"))
    model = get_peft_model(model, LoraConfig(r=64, lora_alpha=64, lora_dropout=0.0, target_modules=targets))
    job.train(model)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    quant_w = sum(v["in_features"] * v["out_features"] for v in layers.values())
    model.save_pretrained(job.work / "adapter")
    return model, base_bits + 16 * lora / quant_w, job.work / "adapter"


def run_order(requested: list[str]) -> list[str]:
    """``requested`` plus what they need, each after its needs, otherwise in registration order."""
    wanted: list[str] = []

    def add(name: str) -> None:
        for dep in METHODS[name].needs:
            add(dep)
        if name not in wanted:
            wanted.append(name)

    for name in sorted(requested, key=list(METHODS).index):
        add(name)
    return wanted


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
