"""``gift-quant compare --mode peft``: GIFT-SW as a PEFT method against LoRA, DoRA and full fine-tuning.

Every method trains the full-precision model for the same steps, batch and tokens on the training
split; its learning rate is the best of a small grid by loss on the validation split; the chosen run
is then scored on held-out test instructions (loss) and, when asked, on zero-shot tasks. LoRA's rank is
chosen so its trainable parameters match GIFT-SW's; LoRA and DoRA are peft's own implementations.
Runs are subprocesses with cached ``result.json`` files, like the quantization comparison.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from .config import QuantizeConfig, RecoverConfig

PEFT_METHODS = ("gift", "gift-no-noise", "lora", "dora", "full")
LR_GRID = {"gift": (1e-4, 3e-4, 1e-3), "gift-no-noise": (1e-4, 3e-4, 1e-3), "lora": (1e-4, 3e-4, 1e-3),
           "dora": (1e-4, 3e-4, 1e-3), "full": (1e-5, 3e-5, 1e-4)}


def salient_sets(model_dir, root: Path, qcfg: QuantizeConfig) -> dict[str, torch.Tensor]:
    """GIFT-SW's salient columns, selected once on calibration data and cached in ``root``."""
    from safetensors.torch import load_file, save_file

    from .models import load_model, load_tokenizer, resolve_device, resolve_model_dir
    from .pipeline import calibration_set
    from .quant.engine import quantize_model

    path = root / "salient.safetensors"
    if not path.is_file():
        src = resolve_model_dir(model_dir)
        model = load_model(src)
        windows = calibration_set(load_tokenizer(src), qcfg)
        report = quantize_model(model, windows, qcfg, resolve_device(qcfg.device), None, progress=False,
                                score_only=True)
        root.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in report.salient.items()}, str(path))
    return load_file(str(path))


def matched_lora_rank(model, salient: dict[str, torch.Tensor]) -> int:
    """Rank whose LoRA parameters on the same linears equal GIFT-SW's trainable salient columns."""
    gift = sum(model.get_submodule(n).out_features * idx.numel() for n, idx in salient.items())
    per_rank = sum(model.get_submodule(n).in_features + model.get_submodule(n).out_features for n in salient)
    return max(1, round(gift / per_rank))


def _windows(tokenizer, rcfg: RecoverConfig, split: str, n: int, seed: int):
    """Held-out windows: the named training set's ``split``; for other data, ``--eval-data`` (both splits)."""
    from . import datasets as named
    from .data import load_records
    from .errors import GiftQuantError
    from .recover.data import pack_examples

    if named.is_named(rcfg.train_data):
        spec = rcfg.train_data.split(":")[0] + f":{split}"
    elif rcfg.eval_data:
        spec = rcfg.eval_data
    else:
        raise GiftQuantError("compare --mode peft needs held-out data: a named --train-data or --eval-data")
    records = load_records(spec, split, limit=max(200, 8 * n))
    return pack_examples(tokenizer, records, rcfg.seq_len, n, seed, source=f"{spec} ({split})")


def run_peft_method(method: str, lr: float, model_dir, root: Path, qcfg: QuantizeConfig, rcfg: RecoverConfig,
                    tasks: list[str], limit: int | None, final: bool) -> dict:
    from peft import LoraConfig, get_peft_model

    from .models import load_model, load_tokenizer, resolve_device, resolve_model_dir
    from .pipeline import _train_stage
    from .recover.model import prepare_dense
    from .recover.train import eval_loss

    src = resolve_model_dir(model_dir)
    device = resolve_device(qcfg.device)
    tok = load_tokenizer(src)
    model = load_model(src)
    salient = salient_sets(model_dir, root, qcfg)
    targets = sorted({n.rsplit(".", 1)[-1] for n in salient})
    rank = matched_lora_rank(model, salient)
    if method in ("gift", "gift-no-noise"):
        prepare_dense(model, salient, noise="none" if method == "gift-no-noise" else rcfg.noise,
                      noise_bits=rcfg.noise_bits or 4, seed=rcfg.seed)
    elif method in ("lora", "dora"):
        for p in model.parameters():
            p.requires_grad_(False)
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=targets,
                                                 use_dora=method == "dora"))
    elif method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        raise ValueError(f"unknown PEFT method {method!r}; choose from {', '.join(PEFT_METHODS)}")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # the final phase reuses the search run of the chosen learning rate: its finished state is loaded
    # (train() resumes at the last step), then the model is scored on the test split instead
    work = root / f"{method}-lr{lr:g}"
    summary = _train_stage(model, tok, dataclasses.replace(rcfg, lr=lr), work / "train", device, progress=False)
    model.eval()
    split = "test" if final else "validation"
    ids, labels = _windows(tok, rcfg, split, rcfg.eval_windows * (4 if final else 1), rcfg.seed + 7)
    row = {"method": method, "lr": lr, "trainable_params": trainable, "lora_rank": rank,
           f"{split}_loss": eval_loss(model, ids, labels, device),
           "loss_curve": [h["loss"] for h in summary["history"]]}
    if final and tasks:
        from .eval.zeroshot import evaluate_tasks

        row["zeroshot"] = evaluate_tasks(model, tok, tasks, limit=limit, batch_size=8, device=device, seed=0)
    return row


def best_lr(rows: list[dict]) -> float:
    ok = [r for r in rows if "validation_loss" in r]
    return min(ok, key=lambda r: r["validation_loss"])["lr"]


def peft_settings_doc(qcfg: QuantizeConfig, rcfg: RecoverConfig) -> dict:
    return {"quantize": dataclasses.asdict(qcfg), "recover": dataclasses.asdict(rcfg)}


def write_peft_report(report_dir: Path, rows: list[dict], command: str) -> None:
    from .cache import atomic_write_text

    final = [r for r in rows if r.get("final")]
    lines = ["# gift-quant compare --mode peft", "", f"Command: `{command}`", "",
             "| method | trainable params | lr (picked on validation) | test loss | zero-shot mean |",
             "|---|---|---|---|---|"]
    for r in sorted(final, key=lambda r: PEFT_METHODS.index(r["method"])):
        if "failed" in r:
            lines.append(f"| {r['method']} | failed: {r['failed'][:80]} | | | |")
            continue
        zs = (r.get("zeroshot") or {}).get("mean")
        lines.append(f"| {r['method']} | {r['trainable_params']:,} | {r['lr']:g} | {r['test_loss']:.4f} | "
                     f"{'' if zs is None else f'{zs:.4f}'} |")
    lines += ["", "Validation loss per learning rate:", "", "| method | lr | validation loss |", "|---|---|---|"]
    for r in rows:
        if not r.get("final") and "validation_loss" in r:
            lines.append(f"| {r['method']} | {r['lr']:g} | {r['validation_loss']:.4f} |")
    lines += ["", "![training loss](peft_loss_curves.png)", ""]
    atomic_write_text(report_dir / "report_peft.md", "\n".join(lines))
    atomic_write_text(report_dir / "report_peft.json", json.dumps({"command": command, "rows": rows}, indent=1))
    from .compare import plot_loss_curves

    plot_loss_curves(report_dir / "peft_loss_curves.png",
                     {f"{r['method']} (lr {r['lr']:g})": r["loss_curve"] for r in final if r.get("loss_curve")})
