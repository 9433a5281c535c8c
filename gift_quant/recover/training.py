"""The training stage shared by ``recover``, ``finetune`` and both ``compare`` modes.

It turns the recovery settings into training and held-out windows, loads the full-precision teacher
when the objective needs one, and runs `train`. Plain text from the same source as the calibration
set is trained on with the calibration documents left out, so the two never share text.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config.settings import QuantizeConfig, RecoverConfig, Runtime
from ..data.examples import pack_examples
from ..data.sources import load_documents, load_records
from ..data.windows import calibration_documents
from ..util.errors import GiftQuantError
from .loop import train
from .objective import Teacher


def _same_source(a: str, b: str, default_a: str, default_b: str) -> bool:
    from ..data import named

    if named.is_named(a) and named.is_named(b):
        return named.parse_spec(a, default_a) == named.parse_spec(b, default_b)
    return a == b


def training_windows(tokenizer, rcfg: RecoverConfig, n_windows: int, qcfg: QuantizeConfig | None = None):
    """((ids, labels), (held-out ids, labels) or None) for the recovery settings.

    With ``qcfg``, documents of its calibration draw are removed from training text of the same source.
    """
    from ..data import named

    # a few records per window is plenty for instructions; named sets are stored shuffled, so the
    # first N are a fair sample (plain-text documents give many windows each)
    records = load_records(rcfg.train_data, default_split="train", limit=max(2000, 8 * n_windows))
    if qcfg is not None and _same_source(rcfg.train_data, qcfg.calib_data, "train", "train"):
        calib = set(calibration_documents(tokenizer, load_documents(qcfg.calib_data, default_split="train"),
                                          qcfg.calib_samples, qcfg.seq_len, qcfg.seed))
        records = [r for r in records if r.get("text") not in calib]
        if not records:
            raise GiftQuantError(f"--train-data {rcfg.train_data}: every document is used for calibration; "
                                 "train on another source or split")
    train = pack_examples(tokenizer, records, rcfg.seq_len, n_windows, rcfg.seed, source=rcfg.train_data)
    if rcfg.eval_data is not None:
        held = load_records(rcfg.eval_data, default_split="validation", limit=max(200, 8 * rcfg.eval_windows))
    elif named.is_named(rcfg.train_data):
        held = load_records(rcfg.train_data.split(":")[0] + ":validation", default_split="validation",
                            limit=max(200, 8 * rcfg.eval_windows))
    else:
        return train, None
    held_out = pack_examples(tokenizer, held, rcfg.seq_len, rcfg.eval_windows, rcfg.seed + 1, source="held-out data")
    return train, held_out


def load_teacher(src: Path | None, rcfg: RecoverConfig, device: torch.device,
                 trust_remote_code: bool = False) -> Teacher | None:
    """The full-precision source model as a frozen teacher (bf16 on a GPU), or None for ``--loss ce``."""
    if rcfg.loss == "ce":
        return None
    if src is None:
        raise GiftQuantError(f"--loss {rcfg.loss} needs the full-precision source model as teacher")
    from ..model.loading import load_model

    where = torch.device("cpu") if rcfg.teacher_device == "cpu" else torch.device(device)
    dtype = torch.bfloat16 if where.type == "cuda" else torch.float32
    return Teacher(load_model(Path(src), dtype, trust_remote_code), where)


def train_stage(model, tokenizer, rcfg: RecoverConfig, run_dir: Path, runtime: Runtime = Runtime(), *,
                teacher_src: Path | None = None, qcfg: QuantizeConfig | None = None) -> dict:
    """Train ``model``'s trainable parameters per ``rcfg`` (resumable in ``run_dir``); returns the summary."""
    from accelerate import PartialState

    from ..model.loading import resolve_device

    device = resolve_device(runtime.device)
    # every process takes batch_size * grad_accum windows a step: the global batch is that times the processes
    n_windows = rcfg.steps * rcfg.batch_size * rcfg.grad_accum * PartialState().num_processes
    (ids, labels), held = training_windows(tokenizer, rcfg, n_windows, qcfg)
    teacher = load_teacher(teacher_src, rcfg, device, runtime.trust_remote_code)
    if teacher is not None and PartialState().is_main_process:
        import sys

        print(f"gift-quant: teacher (the full-precision source model) on {teacher.device}: "
              f"{teacher.bytes() / 2**20:.0f} MB", file=sys.stderr, flush=True)
    summary = train(model, ids, labels, rcfg, run_dir, held[0] if held else None, held[1] if held else None,
                    device=device, progress=runtime.progress, teacher=teacher)
    summary["train_tokens"] = int(ids.numel())
    if teacher is not None:
        summary["teacher_mb"] = teacher.bytes() / 2**20
        summary["teacher_device"] = str(teacher.device)
    return summary
