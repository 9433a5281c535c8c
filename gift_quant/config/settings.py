"""Frozen configuration per stage, YAML recipes, and CLI overrides.

A recipe is a YAML mapping with one section per stage (``quantize``, ``recover``, ``eval``) whose keys
are the dataclass fields below; unknown sections or keys are errors (a typo must not silently fall
back to a default). Precedence: dataclass defaults < recipe < flags given on the command line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..util.errors import GiftQuantError

# Widths a checkpoint can store (packed/bits.py packs these); the one list every setting is checked against.
SUPPORTED_BITS = (2, 3, 4, 8)
# How input columns form groups (quant/groups.py): natural (j // group_size) or compact (non-salient runs).
GROUP_LAYOUTS = ("natural", "compact")
# Widths a grid can be computed at (the noise step may use any of them).
GRID_BITS = range(2, 17)

DEFAULT_CALIB_DATA = "sotu"
DEFAULT_PPL_DATA = "boolq-passages:test"
# Recovery trains by distillation on plain text (the recovery study, results/recovery-study/); PEFT
# fine-tuning of a full-precision model has no teacher to distil from and trains on instructions.
DEFAULT_TRAIN_DATA = "sotu"
DEFAULT_PEFT_TRAIN_DATA = "natural-instructions"


@dataclass(frozen=True)
class QuantizeConfig:
    bits: int = 3
    algorithm: str = "gptq"  # gptq | rtn (round-to-nearest baseline on the same grid)
    group_size: int = -1  # <= 0: one grid per output row (the paper's per-row setting)
    sym: bool = True
    act_order: bool = False
    static_groups: bool = False  # compact layout: fit grids before act-order permutes columns
    group_layout: str = "natural"  # natural: group j // g (servable without g_idx); compact (quant/groups.py)
    clip: str = "mse"
    damp: float = 0.01
    block_size: int = 128
    metric: str = "gift"
    metric_bits: int | None = None  # bits of Q_b in the metric; None = the target bits
    salient: int | None = None  # columns per linear; None -> salient_fraction
    salient_fraction: float = 0.03125  # the paper: 128 of 4096 columns (LLaMA-2-7B)
    salient_dtype: str = "float16"
    calib_data: str = DEFAULT_CALIB_DATA
    calib_samples: int = 128
    seq_len: int = 256
    calib_batch_size: int = 8  # windows per forward pass while calibrating (memory vs. speed)
    seed: int = 0
    dtype: str = "float32"
    device: str = "auto"

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            widths = ", ".join(map(str, SUPPORTED_BITS))
            raise GiftQuantError(f"--bits {self.bits} is not supported: use one of {widths}")
        if self.salient is not None and self.salient < 0:
            raise GiftQuantError(f"--salient must be >= 0 (got {self.salient})")
        if not 0.0 <= self.salient_fraction < 1.0:
            raise GiftQuantError(f"--salient-fraction must be in [0, 1) (got {self.salient_fraction})")
        if self.algorithm not in ("gptq", "rtn"):
            raise GiftQuantError(f"algorithm must be gptq or rtn (got {self.algorithm!r})")
        if self.clip not in ("mse", "minmax"):
            raise GiftQuantError(f"clip must be mse or minmax (got {self.clip!r})")
        if not 0 <= self.damp < 1:
            raise GiftQuantError(f"damp must be in [0, 1) (got {self.damp})")
        if self.calib_samples <= 0 or self.seq_len <= 1:
            raise GiftQuantError("--calib-samples must be > 0 and --seq-len > 1")
        if self.calib_batch_size <= 0:
            raise GiftQuantError(f"--calib-batch-size must be > 0 (got {self.calib_batch_size})")
        if self.group_layout not in GROUP_LAYOUTS:
            raise GiftQuantError(
                f"--group-layout must be one of {', '.join(GROUP_LAYOUTS)} (got {self.group_layout!r})")
        if self.group_size == 0 or self.group_size < -1:
            raise GiftQuantError(f"--group-size must be -1 (per row) or a positive count (got {self.group_size})")

    def salient_count(self, in_features: int, layer: str = "") -> int:
        k = self.salient if self.salient is not None else round(self.salient_fraction * in_features)
        if k >= in_features:
            raise GiftQuantError(
                f"salient count {k} >= in_features {in_features} of layer {layer}: choose a smaller --salient "
                "(at most in_features - 1) or --salient-fraction")
        return k


NOISE_KINDS = ("normal", "uniform", "none")


@dataclass(frozen=True)
class NoiseSpec:
    """The noise injected into the frozen non-salient weights while training (docs/method.md, [Noise]).

    ``normal``: 0.5 * Delta_i * N(0, 1); ``uniform``: Delta_i * U(-1/2, 1/2); ``none``: plain salient
    fine-tuning. ``bits``: the grid whose per-row step Delta_i scales the noise. Validated here only.
    """

    kind: str = "normal"
    bits: int = 4

    def __post_init__(self):
        if self.kind not in NOISE_KINDS:
            raise GiftQuantError(f"noise must be one of {', '.join(NOISE_KINDS)} (got {self.kind!r})")
        if self.bits not in GRID_BITS:
            raise GiftQuantError(f"--noise-bits must be in {GRID_BITS.start}..{GRID_BITS.stop - 1} (got {self.bits})")


@dataclass(frozen=True)
class EvalConfig:
    ppl_data: str = DEFAULT_PPL_DATA
    seq_len: int = 512
    max_windows: int | None = 40


@dataclass(frozen=True)
class RecoverConfig:
    """Noise-injected fine-tuning of the salient columns (GIFT-SW, docs/method.md sections 4-5)."""

    variant: str = "post"  # post: quantize then train; pre: train with noise at the target bits, then quantize
    noise: str = "normal"  # normal | uniform | none (--no-noise: plain salient fine-tuning)
    noise_bits: int | None = None  # None: 4 for post (the paper), the target bits for pre
    loss: str = "kd"  # ce | kd | kd+ce (recover/objective.py); kd won the recovery study
    kd_temperature: float = 1.0
    ce_weight: float = 1.0  # weight of the CE term in kd+ce
    teacher_device: str = "auto"  # where the full-precision teacher runs: auto (the training device) or cpu
    steps: int = 100
    lr: float = 3e-4
    batch_size: int = 2
    grad_accum: int = 1
    seq_len: int = 256
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    train_data: str = DEFAULT_TRAIN_DATA
    eval_data: str | None = None  # held-out text for periodic eval; None: the train data's validation split
    eval_every: int = 25
    eval_windows: int = 8
    save_every: int = 10
    seed: int = 0
    gradient_checkpointing: bool = False
    # on a CPU, each micro-batch's sequences in this many parts trained in parallel threads (recover/lanes.py);
    # the result depends on it (at rounding level) but not on how many run at once; 1: the micro-batch in one pass
    cpu_lanes: int = 2
    # memory (MB) for training's speed caches (recover/caches.py): None = a quarter of the free memory, 0 = none.
    # Training is bit-identical with any value, so it is no part of a run's identity (identity()).
    cache_mb: int | None = None
    # block-wise reconstruction (recover/blockwise.py): right after GPTQ of each block, train its salient
    # columns (same noise) to match the full-precision block's outputs on the calibration windows
    blockwise_steps: int = 0  # 0: off
    blockwise_lr: float = 1e-3  # one step = one calibration batch (--calib-batch-size windows)
    blockwise_target: str = "fp-prefix"  # fp-prefix: fp block on fp inputs; quant-prefix: fp block on quantized inputs

    def __post_init__(self):
        if self.variant not in ("post", "pre"):
            raise GiftQuantError(f"--variant must be post or pre (got {self.variant!r})")
        NoiseSpec(self.noise, 4 if self.noise_bits is None else self.noise_bits)  # validates both
        if self.loss not in ("ce", "kd", "kd+ce"):
            raise GiftQuantError(f"--loss must be ce, kd or kd+ce (got {self.loss!r})")
        if self.teacher_device not in ("auto", "cpu"):
            raise GiftQuantError(f"--teacher-device must be auto or cpu (got {self.teacher_device!r})")
        if self.blockwise_target not in ("fp-prefix", "quant-prefix"):
            raise GiftQuantError(f"blockwise_target must be fp-prefix or quant-prefix (got {self.blockwise_target!r})")
        for name in ("batch_size", "grad_accum", "seq_len", "save_every", "cpu_lanes"):
            if getattr(self, name) <= 0:
                raise GiftQuantError(f"{name} must be positive (got {getattr(self, name)})")
        for name in ("lr", "kd_temperature", "blockwise_lr"):
            if getattr(self, name) <= 0:
                raise GiftQuantError(f"{name} must be positive (got {getattr(self, name)})")
        if self.steps < 0 or self.blockwise_steps < 0 or self.ce_weight < 0 or self.eval_every < 0:
            raise GiftQuantError("steps, blockwise_steps, ce_weight and eval_every must be >= 0 "
                                 f"(got {self.steps}, {self.blockwise_steps}, {self.ce_weight}, {self.eval_every})")
        if self.steps == 0 and self.variant == "pre":
            raise GiftQuantError("--variant pre trains the full-precision model first: give --steps > 0")
        if self.steps == 0 and self.blockwise_steps == 0:
            raise GiftQuantError("nothing to train: give --steps > 0 (end-to-end) and/or --blockwise-steps > 0")
        if not 0 <= self.warmup_ratio < 1:
            raise GiftQuantError(f"warmup_ratio must be in [0, 1) (got {self.warmup_ratio})")
        if self.cache_mb is not None and self.cache_mb < 0:
            raise GiftQuantError(f"--cache-mb must be >= 0 (got {self.cache_mb}); 0 turns the training caches off")

    def identity(self) -> dict[str, Any]:
        """The settings that decide the trained result (what a resumed run must match): all but cache_mb."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "cache_mb"}

    def noise_spec(self, target_bits: int | None) -> NoiseSpec:
        """The noise of this run when quantizing to ``target_bits``; built once, handed to every training layer.

        ``target_bits`` None: nothing is quantized afterwards (PEFT fine-tuning of a full-precision model),
        so the post variant's default step applies.
        """
        return NoiseSpec(self.noise, self.resolved_noise_bits(target_bits))

    def resolved_noise_bits(self, target_bits: int | None) -> int:
        if self.noise_bits is not None:
            return self.noise_bits
        return 4 if self.variant == "post" or target_bits is None else target_bits


SECTIONS = {"quantize": QuantizeConfig, "eval": EvalConfig, "recover": RecoverConfig}


def register_section(name: str, cls: type) -> None:
    """Later stages (recover, compare) add their own recipe sections."""
    SECTIONS[name] = cls


def read_recipe(path: str | Path | None) -> dict[str, dict[str, Any]]:
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise GiftQuantError(f"recipe {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise GiftQuantError(f"recipe {p} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise GiftQuantError(f"recipe {p} must be a mapping of sections ({', '.join(SECTIONS)})")
    data = {k: v for k, v in data.items() if k not in ("description", "source", "notes")}
    for section, values in data.items():
        if section not in SECTIONS:
            raise GiftQuantError(f"recipe {p}: unknown section {section!r}; known: {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise GiftQuantError(f"recipe {p}: section {section!r} must be a mapping")
        known = {f.name for f in dataclasses.fields(SECTIONS[section])}
        unknown = set(values) - known
        if unknown:
            raise GiftQuantError(
                f"recipe {p}: unknown key(s) {sorted(unknown)} in section {section!r}; known: {sorted(known)}")
    return data


_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def check_type(section: str, key: str, value: Any, annotation: str) -> Any:
    """``value`` if it has the field's declared type (``int``, ``float``, ``str | None`` ...), else a clear error.

    YAML and JSON give real booleans and numbers; a string "false" or a float where a count is meant is
    a mistake to report, not to coerce (``"false"`` would be true). An int is accepted as a float.
    """
    names = [n.strip() for n in annotation.split("|")]
    if value is None and "None" in names:
        return value
    for name in names:
        t = _TYPES.get(name)
        if t is None:
            continue
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is str and isinstance(value, str):
            return value
    wanted = " or ".join("null" if n == "None" else n for n in names)
    raise GiftQuantError(f"{section}.{key} must be {wanted}, got {value!r} ({type(value).__name__}); "
                         f"fix the recipe or flag")


def build(cls: type, recipe: dict[str, dict[str, Any]], section: str, overrides: dict[str, Any]):
    """Defaults < recipe section < overrides whose value is not None; every value type-checked first."""
    values: dict[str, Any] = dict(recipe.get(section, {}))
    values.update({k: v for k, v in overrides.items() if v is not None})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    typed = {k: check_type(section, k, v, str(fields[k].type)) for k, v in values.items() if k in fields}
    try:
        return cls(**typed)
    except TypeError as exc:
        raise GiftQuantError(f"bad {section} settings: {exc}") from exc


def as_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


__all__ = ["NOISE_KINDS", "EvalConfig", "NoiseSpec", "QuantizeConfig", "RecoverConfig", "as_dict", "build",
           "read_recipe", "register_section"]
