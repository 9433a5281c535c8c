"""The training stage shared by ``recover``, ``finetune`` and both ``compare`` modes.

It turns the recovery settings into training and held-out windows, loads the full-precision teacher
when the objective needs one, and runs `train`. The training text may be a mix of sources (``a+b``,
even shares); plain text is cut at random offsets across all of a source's documents. Plain text from
the same source as the calibration set is trained on with the calibration documents left out, so the
two never share text.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config.settings import QuantizeConfig, RecoverConfig, Runtime
from ..data.examples import pack_examples
from ..data.sources import load_documents, load_records
from ..data.windows import calibration_documents, random_windows
from ..util.errors import GiftQuantError
from ..util.precision import resolve_precision
from ..util.seeds import derive_seed
from .loop import train
from .objective import Teacher

__all__ = ["load_teacher", "train_stage", "training_windows"]


def _same_source(a: str, b: str, default_a: str, default_b: str) -> bool:
    from ..data import named

    if named.is_named(a) and named.is_named(b):
        return named.parse_spec(a, default_a) == named.parse_spec(b, default_b)
    return a == b


def _mix_parts(spec: str) -> list[str]:
    """The sources of a training mix: ``"sotu+boolq-passages:train"`` -> both; an existing path is one source."""
    if Path(spec).exists():
        return [spec]
    parts = [p.strip() for p in spec.split("+")]
    if not all(parts):
        raise GiftQuantError(f"--train-data {spec!r}: an empty source in the mix; join sources with +, "
                             "e.g. sotu+boolq-passages:train")
    return parts


def _even_shares(n: int, k: int) -> list[int]:
    """``n`` split into ``k`` near-equal counts (the first ones one larger when it does not divide)."""
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def _is_plain_text(records: list[dict]) -> bool:
    return all("text" in r and not ({"prompt", "response", "messages"} & set(r)) for r in records)


def _source_windows(tokenizer, spec: str, n_windows: int, rcfg: RecoverConfig, seed: int,
                    qcfg: QuantizeConfig | None):
    """(ids, labels) of one source: plain text at random offsets across every document, instructions packed."""
    records = load_records(spec, default_split="train", limit=max(20_000, 8 * n_windows))
    if qcfg is not None and _same_source(spec, qcfg.calib_data, "train", "train"):
        calib = set(calibration_documents(tokenizer, load_documents(qcfg.calib_data, default_split="train"),
                                          qcfg.calib_samples, qcfg.seq_len, qcfg.seed))
        records = [r for r in records if r.get("text") not in calib]
        if not records:
            raise GiftQuantError(f"--train-data {spec}: every document is used for calibration; "
                                 "train on another source or split")
    if records and _is_plain_text(records):  # every token trains: cut windows anywhere in the source
        docs = [str(r["text"]) for r in records if str(r["text"]).strip()]
        ids = random_windows(tokenizer, docs, n_windows, rcfg.seq_len, seed, source=spec)
        return ids, ids.clone()
    return pack_examples(tokenizer, records, rcfg.seq_len, n_windows, seed, source=spec)


def training_windows(tokenizer, rcfg: RecoverConfig, n_windows: int, qcfg: QuantizeConfig | None = None):
    """((ids, labels), (held-out ids, labels) or None) for the recovery settings.

    ``rcfg.train_data`` may be a mix (``a+b``): each source gives an even share of the windows. Plain text
    is cut at seeded random offsets across all its documents; instruction records are packed with their
    prompts masked. With ``qcfg``, documents of its calibration draw are removed from training text of the
    same source. Held-out windows come from ``rcfg.eval_data``, else from each named source's validation split.
    """
    from ..data import named

    parts = _mix_parts(rcfg.train_data)
    pieces = [_source_windows(tokenizer, spec, n, rcfg, derive_seed(rcfg.seed, "train-windows", k), qcfg)
              for k, (spec, n) in enumerate(zip(parts, _even_shares(n_windows, len(parts)))) if n > 0]
    train = torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces])
    limit = max(200, 8 * rcfg.eval_windows)
    if rcfg.eval_data is not None:
        held_parts = [(rcfg.eval_data, rcfg.eval_windows)]
    elif all(named.is_named(p) for p in parts):
        held_parts = [(p.split(":")[0] + ":validation", n)
                      for p, n in zip(parts, _even_shares(rcfg.eval_windows, len(parts))) if n > 0]
    else:
        return train, None
    held = [pack_examples(tokenizer, load_records(spec, default_split="validation", limit=limit), rcfg.seq_len, n,
                          derive_seed(rcfg.seed, "held-out-windows", k), source="held-out data")
            for k, (spec, n) in enumerate(held_parts)]
    return train, (torch.cat([h[0] for h in held]), torch.cat([h[1] for h in held]))


def load_teacher(src: Path | None, rcfg: RecoverConfig, device: torch.device,
                 trust_remote_code: bool = False) -> Teacher | None:
    """The full-precision source model as a frozen teacher, or None for ``--loss ce``.

    It holds bf16 weights when training computes in bf16 (``--precision``) and it runs where that autocast
    reaches (the training device) or where bf16 is native anyway (a ``--teacher-device cpu`` that has it):
    half the memory, and no cast of its weights at every forward pass. Otherwise float32.
    """
    if rcfg.loss == "ce":
        return None
    if src is None:
        raise GiftQuantError(f"--loss {rcfg.loss} needs the full-precision source model as teacher")
    from ..model.loading import load_model

    where = torch.device("cpu") if rcfg.teacher_device == "cpu" else torch.device(device)
    train_bf16 = resolve_precision(rcfg.precision, device).bf16
    here = where.type == torch.device(device).type
    dtype = torch.bfloat16 if train_bf16 and (here or resolve_precision("auto", where).bf16) else torch.float32
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
