"""Frozen configuration per stage, YAML recipes, and CLI overrides.

A recipe is a YAML mapping with one section per stage (``quantize``, ``recover``, ``eval``) whose keys
are the dataclass fields below; unknown sections or keys are errors (a typo must not silently fall
back to a default). Precedence: dataclass defaults < recipe < flags given on the command line.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..util.errors import GiftQuantError
from ..util.precision import PRECISIONS, resolve_precision

# Widths a checkpoint can store (packed/bits.py packs these); the one list every setting is checked against.
SUPPORTED_BITS = (2, 3, 4, 8)
# How input columns form groups (quant/groups.py): natural (j // group_size) or compact (non-salient runs).
GROUP_LAYOUTS = ("natural", "compact")
# Widths a grid can be computed at (the noise step may use any of them).
GRID_BITS = range(2, 17)

# Compute and storage dtypes a setting may name (model/loading.parse_dtype reads the same names).
DTYPE_NAMES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
SALIENT_DTYPES = ("float16", "bfloat16", "float32")
MAX_SEED = 2**63 - 1  # torch.manual_seed takes a 64-bit seed; other streams use util/seeds.derive_seed


def _number(flag: str, value, low: float, high: float = math.inf, low_open: bool = False,
            high_open: bool = False, hint: str = "") -> None:
    """Refuse a non-finite ``value`` or one outside [low, high] (open ends where asked), naming the flag."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
        value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        lo, hi = ("(" if low_open else "[") + f"{low:g}", f"{high:g}" + (")" if high_open else "]")
        where = f"a finite number in {lo}, {hi}" if math.isfinite(high) else (
            f"a finite number {'>' if low_open else '>='} {low:g}")
        raise GiftQuantError(f"{flag} {value!r} is not {where}" + (f"; {hint}" if hint else ""))


def _count(flag: str, value, low: int = 1, hint: str = "") -> None:
    """Refuse an integer setting below ``low`` (window counts, lengths, batch sizes), naming the flag."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise GiftQuantError(f"{flag} {value!r} must be a whole number >= {low}" + (f"; {hint}" if hint else ""))


def _text(flag: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, str) or not value.strip():
        raise GiftQuantError(f"{flag} {value!r} is empty: give a named dataset, a file or folder, or a dataset name")


DEFAULT_CALIB_DATA = "sotu"
DEFAULT_PPL_DATA = "boolq-passages:test"
# Recovery trains by distillation on plain text (the recovery study, results/recovery-study/); PEFT
# fine-tuning of a full-precision model has no teacher to distil from and trains on instructions.
DEFAULT_TRAIN_DATA = "sotu"
DEFAULT_PEFT_TRAIN_DATA = "natural-instructions"


@dataclass(frozen=True)
class QuantSpec:
    """How every quantized linear of a checkpoint is stored: bits, symmetry, groups, layout, salient dtype.

    Made once from the settings (``QuantizeConfig.spec``), carried by the packed layer (QuantLinear) and the
    training layer (SalientLinear), written once into gift_quant_config.json ("spec"); every value is
    validated here and nowhere else.
    """

    bits: int = 3
    sym: bool = True
    group_size: int = -1  # <= 0 (-1): one grid per output row
    group_layout: str = "natural"
    salient_dtype: str = "float16"

    def __post_init__(self):
        if isinstance(self.bits, bool) or self.bits not in SUPPORTED_BITS:
            widths = ", ".join(map(str, SUPPORTED_BITS))
            raise GiftQuantError(f"--bits {self.bits!r} is not supported: use one of {widths}")
        if not isinstance(self.sym, bool):
            raise GiftQuantError(f"sym must be true or false (got {self.sym!r})")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or (
                self.group_size == 0 or self.group_size < -1):
            raise GiftQuantError(f"--group-size must be -1 (per row) or a positive count (got {self.group_size!r})")
        if self.group_layout not in GROUP_LAYOUTS:
            raise GiftQuantError(
                f"--group-layout must be one of {', '.join(GROUP_LAYOUTS)} (got {self.group_layout!r})")
        if self.salient_dtype not in SALIENT_DTYPES:
            raise GiftQuantError(f"quantize.salient_dtype {self.salient_dtype!r}: use one of "
                                 f"{', '.join(SALIENT_DTYPES)}")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(QuantSpec))


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

    def __post_init__(self):
        self.spec  # noqa: B018  (validates bits, sym, groups, layout and salient dtype, once)
        if self.salient is not None and self.salient < 0:
            raise GiftQuantError(f"--salient must be >= 0 (got {self.salient})")
        _number("--salient-fraction", self.salient_fraction, 0, 1, high_open=True,
                hint="a fraction of each layer's input columns, e.g. 0.03125")
        if self.algorithm not in ("gptq", "rtn"):
            raise GiftQuantError(f"algorithm must be gptq or rtn (got {self.algorithm!r})")
        if self.clip not in ("mse", "minmax"):
            raise GiftQuantError(f"clip must be mse or minmax (got {self.clip!r})")
        _number("--damp", self.damp, 0, 1, high_open=True, hint="the default is 0.01")
        if self.calib_batch_size <= 0:
            raise GiftQuantError(f"--calib-batch-size must be > 0 (got {self.calib_batch_size})")
        _count("--seq-len", self.seq_len, 2, "a calibration window needs at least 2 tokens")
        _count("--calib-samples", self.calib_samples, 1)
        _count("quantize.block_size", self.block_size, 1)
        _count("--seed", self.seed, 0)
        if self.seed > MAX_SEED:
            raise GiftQuantError(f"--seed {self.seed} is too large: use 0..{MAX_SEED}")
        if self.metric_bits is not None and self.metric_bits not in GRID_BITS:
            raise GiftQuantError(f"quantize.metric_bits {self.metric_bits!r} must be in {GRID_BITS.start}.."
                                 f"{GRID_BITS.stop - 1} or null (the target bits)")
        if self.dtype not in DTYPE_NAMES:
            raise GiftQuantError(f"--dtype {self.dtype!r} is not supported: use float32 (default) or bfloat16")
        _text("--calib-data", self.calib_data)

    @property
    def spec(self) -> QuantSpec:
        """The storage spec of every quantized linear these settings make."""
        return QuantSpec(self.bits, self.sym, self.group_size, self.group_layout, self.salient_dtype)

    def salient_count(self, in_features: int, layer: str = "") -> int:
        k = self.salient if self.salient is not None else round(self.salient_fraction * in_features)
        if k >= in_features:
            raise GiftQuantError(
                f"salient count {k} >= in_features {in_features} of layer {layer}: choose a smaller --salient "
                "(at most in_features - 1) or --salient-fraction")
        return k


NOISE_KINDS = ("normal", "uniform", "none")
# How the noise's scale moves over a training stage (recover/noise_schedule.py): constant (the paper), or
# annealed linearly from 1 at the first step to 0 at the last, so the last steps train the weights as served.
NOISE_SCHEDULES = ("constant", "anneal")


@dataclass(frozen=True)
class NoiseSpec:
    """The noise injected into the frozen non-salient weights while training (docs/method.md, [Noise]).

    ``normal``: 0.5 * Delta_i * N(0, 1); ``uniform``: Delta_i * U(-1/2, 1/2); ``none``: plain salient
    fine-tuning. ``bits``: the grid whose per-row step Delta_i scales the noise. ``schedule``: the factor on
    that scale over the stage's steps (NOISE_SCHEDULES). Validated here only.
    """

    kind: str = "normal"
    bits: int = 4
    schedule: str = "constant"

    def __post_init__(self):
        if self.kind not in NOISE_KINDS:
            raise GiftQuantError(f"noise must be one of {', '.join(NOISE_KINDS)} (got {self.kind!r})")
        if self.bits not in GRID_BITS:
            raise GiftQuantError(f"--noise-bits must be in {GRID_BITS.start}..{GRID_BITS.stop - 1} (got {self.bits})")
        if self.schedule not in NOISE_SCHEDULES:
            raise GiftQuantError(f"--noise-schedule must be one of {', '.join(NOISE_SCHEDULES)} "
                                 f"(got {self.schedule!r})")


@dataclass(frozen=True)
class EvalConfig:
    ppl_data: str = DEFAULT_PPL_DATA
    seq_len: int = 512
    max_windows: int | None = 40

    def __post_init__(self):
        # eval's --seq-len / --max-windows are recover's and compare's --ppl-seq-len / --max-windows
        _count("--seq-len (eval) / --ppl-seq-len (recover, compare)", self.seq_len, 2,
               "a window of one token has nothing to predict")
        if self.max_windows is not None:
            _count("--max-windows", self.max_windows, 1, "omit it to score every window")
        _text("--ppl-data", self.ppl_data)


@dataclass(frozen=True)
class Runtime:
    """How a command runs, not what it computes: never part of a run's identity or of a checkpoint.

    One object from the command line (or a recipe's ``runtime`` section) to every stage, instead of
    device, progress and remote-code flags threaded through each signature.
    """

    device: str = "auto"  # auto: cuda when available, else cpu
    progress: bool = True  # progress bars (tqdm) on the terminal
    trust_remote_code: bool = False  # run a model folder's own Python code (only when asked)

    def __post_init__(self):
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(self.device)):
            raise GiftQuantError(f"--device {self.device!r} is not a device: use cpu, cuda, cuda:N or auto")
        for name in ("progress", "trust_remote_code"):
            if not isinstance(getattr(self, name), bool):
                raise GiftQuantError(f"runtime.{name} must be true or false (got {getattr(self, name)!r})")


@dataclass(frozen=True)
class RecoverConfig:
    """Noise-injected fine-tuning of the salient columns (GIFT-SW, docs/method.md sections 4-5)."""

    variant: str = "post"  # post: quantize then train; pre: train with noise at the target bits, then quantize
    noise: str = "normal"  # normal | uniform | none (--no-noise: plain salient fine-tuning)
    noise_bits: int | None = None  # the post variant's noise grid; None: 4 (the paper). pre: always the target bits
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
    # training's compute precision (util/precision.py): auto (bf16 where the device multiplies it natively, else
    # fp32), fp32, or bf16 (autocast; the trained columns and the optimizer stay float32). The identity holds
    # the resolved one: a run trained in bf16 does not resume where auto means fp32
    precision: str = "auto"
    # block-wise reconstruction (recover/blockwise.py): right after GPTQ of each block, train its salient
    # columns (same noise) to match the full-precision block's outputs on the calibration windows
    blockwise_steps: int = 0  # 0: off
    blockwise_lr: float = 1e-3  # one step = one calibration batch (--calib-batch-size windows)
    blockwise_target: str = "fp-prefix"  # fp-prefix: fp block on fp inputs; quant-prefix: fp block on quantized inputs
    # --- recovery v2 (issue 21): what trains in each stage, each group at its own learning rate ---
    train: str = "salient"  # end-to-end trainable sets, comma-separated from E2E_TRAINABLE
    scales_lr: float = 1e-4  # end-to-end lr of the scale multipliers (scale = stored scale x multiplier)
    blockwise_train: str = "salient,scales,rounding"  # block-stage trainable sets, from BLOCKWISE_TRAINABLE
    blockwise_scales_lr: float = 5e-3  # block-stage lr (AdamW) of the scale multipliers and asymmetric zeros
    blockwise_rounding_lr: float | None = None  # signed-gradient lr of the rounding offsets; None: 1 / steps
    blockwise_warmup_ratio: float = 0.05  # linear warm-up share of the block steps, then cosine decay
    blockwise_holdout: float = 0.125  # share of the calibration batches held out of block training (loss logged)
    blockwise_noise: str | None = None  # the block stage's noise (normal | uniform | none); None: --noise
    # the noise's scale over the steps (NOISE_SCHEDULES): constant, or anneal (1 -> 0, linear); the block stage's
    # None: as noise_schedule (its steps are each block's)
    noise_schedule: str = "constant"
    blockwise_noise_schedule: str | None = None

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
        for flag, value in (("--batch-size", self.batch_size), ("--grad-accum", self.grad_accum),
                            ("--save-every", self.save_every), ("recover.eval_windows", self.eval_windows),
                            ("recover.cpu_lanes", self.cpu_lanes)):
            _count(flag, value, 1)
        for flag, value in (("--steps", self.steps), ("--blockwise-steps", self.blockwise_steps),
                            ("recover.eval_every", self.eval_every)):
            _count(flag, value, 0)
        _count("--seq-len", self.seq_len, 2, "a training window needs at least 2 tokens")
        fields = type(self).__dataclass_fields__
        for name in ("lr", "kd_temperature", "blockwise_lr", "max_grad_norm", "ce_weight", "weight_decay",
                     "warmup_ratio"):
            flag = f"recover.{name}" if name in ("max_grad_norm", "weight_decay") else f"--{name.replace('_', '-')}"
            _number(flag, getattr(self, name), 0, 1 if name == "warmup_ratio" else math.inf,
                    low_open=name not in ("ce_weight", "weight_decay", "warmup_ratio"),
                    high_open=name == "warmup_ratio", hint=f"the default is {fields[name].default:g}")
        _count("--seed", self.seed, 0)
        if self.seed >= MAX_SEED:
            raise GiftQuantError(f"--seed {self.seed} is too large: use 0..{MAX_SEED - 1}")
        _text("--train-data", self.train_data)
        _text("--eval-data", self.eval_data, allow_none=True)
        if self.steps == 0 and self.variant == "pre":
            raise GiftQuantError("--variant pre trains the full-precision model first: give --steps > 0")
        if self.steps == 0 and self.blockwise_steps == 0:
            raise GiftQuantError("nothing to train: give --steps > 0 (end-to-end) and/or --blockwise-steps > 0")
        if self.precision not in PRECISIONS:
            raise GiftQuantError(f"--precision {self.precision!r} is not a precision: use one of "
                                 f"{', '.join(PRECISIONS)}")
        if self.cache_mb is not None and self.cache_mb < 0:
            raise GiftQuantError(f"--cache-mb must be >= 0 (got {self.cache_mb}); 0 turns the training caches off")
        check_recovery_v2(self)

    def identity(self, device) -> dict[str, Any]:
        """The settings that decide the trained result (what a resumed run must match) when training on ``device``:
        all but cache_mb, with the precision resolved (auto -> what it means there: util/precision.py)."""
        ident = {k: v for k, v in dataclasses.asdict(self).items() if k != "cache_mb"}
        ident["precision"] = resolve_precision(self.precision, device).name
        return ident

    def noise_spec(self, target_bits: int | None) -> NoiseSpec:
        """The noise of this run when quantizing to ``target_bits``: the one place it is decided.

        post: ``noise_bits`` (the paper: always 4). pre: the target bits, whatever ``noise_bits`` says
        (pre-GIFT-SW trains the full-precision model to withstand the quantization it will get), so
        ``recover --variant pre`` and compare's ``gift-pre`` inject the same noise under any recipe.
        ``target_bits`` None: nothing is quantized afterwards (PEFT fine-tuning of a full-precision model),
        so the post variant's rule applies.
        """
        return NoiseSpec(self.noise, self.resolved_noise_bits(target_bits), self.noise_schedule)

    def blockwise_noise_spec(self, target_bits: int | None) -> NoiseSpec:
        """The block stage's noise: ``blockwise_noise`` (the run's noise when unset) on the run's noise grid,
        with ``blockwise_noise_schedule`` (the run's schedule when unset) over each block's steps."""
        return NoiseSpec(self.blockwise_noise or self.noise, self.resolved_noise_bits(target_bits),
                         self.blockwise_noise_schedule or self.noise_schedule)

    def resolved_noise_bits(self, target_bits: int | None) -> int:
        if self.variant == "pre" and target_bits is not None:
            return target_bits
        return 4 if self.noise_bits is None else self.noise_bits


# What can train in each stage (recover/grid_params.py): the salient columns, the grid's scales (and zero
# points when asymmetric), and the rounding of the non-salient weights (block stage only: end to end the codes
# stay fixed, as in EfficientQAT's E2E-QP).
E2E_TRAINABLE = ("salient", "scales")
BLOCKWISE_TRAINABLE = ("salient", "scales", "rounding")


def trainable_sets(text: str, known: tuple[str, ...], flag: str) -> frozenset[str]:
    """``"salient,scales"`` -> its names, each checked against ``known``; an empty list or unknown name is an error."""
    names = [n.strip() for n in str(text).split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        got = f"unknown trainable {unknown[0]!r}" if unknown else "no trainable set given"
        raise GiftQuantError(f"{flag} {text!r}: {got}; choose a comma list of {', '.join(known)}")
    return frozenset(names)


def check_recovery_v2(cfg: RecoverConfig) -> None:
    """Recovery v2's settings (issue 21): trainable names, learning rates, hold-out share; one-line errors."""
    train = trainable_sets(cfg.train, E2E_TRAINABLE, "--train")
    trainable_sets(cfg.blockwise_train, BLOCKWISE_TRAINABLE, "--blockwise-train")
    for name in ("lr", "blockwise_lr", "scales_lr", "blockwise_scales_lr", "blockwise_rounding_lr"):
        v = getattr(cfg, name)
        if v is not None and not (math.isfinite(v) and v > 0):
            raise GiftQuantError(f"--{name.replace('_', '-')} must be a positive finite learning rate (got {v})")
    if not 0 <= cfg.blockwise_warmup_ratio < 1:
        raise GiftQuantError(f"--blockwise-warmup-ratio must be in [0, 1) (got {cfg.blockwise_warmup_ratio})")
    if cfg.blockwise_noise is not None and cfg.blockwise_noise not in NOISE_KINDS:
        raise GiftQuantError(f"--blockwise-noise must be one of {', '.join(NOISE_KINDS)} (got {cfg.blockwise_noise!r})")
    for flag, value in (("--noise-schedule", cfg.noise_schedule),
                        ("--blockwise-noise-schedule", cfg.blockwise_noise_schedule)):
        if value not in NOISE_SCHEDULES and not (value is None and flag.startswith("--blockwise")):
            raise GiftQuantError(f"{flag} must be one of {', '.join(NOISE_SCHEDULES)} (got {value!r})")
    if not 0 <= cfg.blockwise_holdout <= 0.5:
        raise GiftQuantError(f"--blockwise-holdout must be in [0, 0.5] (got {cfg.blockwise_holdout})")
    if "scales" in train and cfg.variant == "pre":
        raise GiftQuantError("--train scales needs a quantized model to train: --variant pre trains the "
                             "full-precision model, which has no grid yet; use --variant post")


SECTIONS = {"quantize": QuantizeConfig, "eval": EvalConfig, "recover": RecoverConfig, "runtime": Runtime}


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


__all__ = ["BLOCKWISE_TRAINABLE", "DEFAULT_CALIB_DATA", "DEFAULT_PEFT_TRAIN_DATA", "DEFAULT_PPL_DATA",
           "DEFAULT_TRAIN_DATA", "DTYPE_NAMES", "E2E_TRAINABLE", "GRID_BITS", "GROUP_LAYOUTS", "NOISE_KINDS",
           "NOISE_SCHEDULES", "SALIENT_DTYPES", "SECTIONS", "SPEC_FIELDS", "SUPPORTED_BITS", "EvalConfig", "NoiseSpec",
           "QuantSpec", "QuantizeConfig", "RecoverConfig", "Runtime", "build", "check_recovery_v2", "check_type",
           "read_recipe", "trainable_sets"]
