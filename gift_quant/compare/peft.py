"""``gift-quant compare --mode peft``: GIFT-SW as a PEFT method against LoRA, DoRA and full fine-tuning.

Every method trains the full-precision model for the same steps, batch and tokens on the training
split; its learning rate is the best of a small grid by loss on the validation split; the chosen run
is then scored on held-out test instructions (loss) and, when asked, on zero-shot tasks. LoRA's rank is
chosen so its trainable parameters match GIFT-SW's; LoRA and DoRA are peft's own implementations.
Runs are subprocesses with cached ``result.json`` files, like the quantization comparison (compare/jobs.py);
the methods are registered in ``PEFT_METHODS`` by name, each with how it makes a model trainable.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config.settings import QuantizeConfig, RecoverConfig, Runtime
from ..util.files import atomic_save_tensors
from ..util.seeds import derive_seed
from .jobs import run_cached_job
from .report import claim_settings, plot_loss_curves

__all__ = ["BASE", "PEFT_METHODS", "PeftMethod", "best_lr", "matched_lora_rank", "peft_baseline", "run_compare_peft",
           "peft_settings_doc", "run_peft_method", "salient_sets", "write_peft_report"]


@dataclass(frozen=True)
class PeftMethod:
    """A PEFT method: how it makes the full-precision model trainable, and its default learning-rate grid."""

    name: str
    prepare: Callable  # (model, salient, rank, targets, rcfg) -> the model to train
    lr_grid: tuple[float, ...] = (1e-4, 3e-4, 1e-3)


def _gift(noise_of: Callable[[RecoverConfig], str]):
    def prepare(model, salient, rank, targets, rcfg: RecoverConfig):
        from ..recover.model import prepare_dense

        noise = dataclasses.replace(rcfg, noise=noise_of(rcfg)).noise_spec(None)  # no quantization follows
        prepare_dense(model, salient, noise=noise, seed=rcfg.seed)
        return model
    return prepare


def _lora(dora: bool):
    def prepare(model, salient, rank, targets, rcfg: RecoverConfig):
        return peft_baseline(model, rank, targets, dora=dora, seed=rcfg.seed)
    return prepare


def _full(model, salient, rank, targets, rcfg):
    model.requires_grad_(True)
    return model


PEFT_METHODS: dict[str, PeftMethod] = {m.name: m for m in (
    PeftMethod("gift", _gift(lambda rcfg: rcfg.noise)),
    PeftMethod("gift-no-noise", _gift(lambda rcfg: "none")),
    PeftMethod("lora", _lora(dora=False)),
    PeftMethod("dora", _lora(dora=True)),
    PeftMethod("full", _full, lr_grid=(1e-5, 3e-5, 1e-4)),
)}
BASE = "base"  # the untrained model: evaluated only, the reference every method should beat


def salient_sets(model_dir, root: Path, qcfg: QuantizeConfig, runtime: Runtime = Runtime(progress=False)
                 ) -> dict[str, torch.Tensor]:
    """GIFT-SW's salient columns, selected once on calibration data and cached in ``root``."""
    from safetensors.torch import load_file

    from ..model.loading import load_model, load_tokenizer, resolve_model_dir
    from ..workflows.stages import calibration_set, select_salient

    path = root / "salient.safetensors"
    if not path.is_file():
        src = resolve_model_dir(model_dir)
        model = load_model(src)
        windows = calibration_set(load_tokenizer(src), qcfg)
        atomic_save_tensors(path, select_salient(model, windows, qcfg, runtime))
    return load_file(str(path))


def matched_lora_rank(model, salient: dict[str, torch.Tensor]) -> int:
    """Rank whose LoRA parameters on the same linears equal GIFT-SW's trainable salient columns."""
    gift = sum(model.get_submodule(n).out_features * idx.numel() for n, idx in salient.items())
    per_rank = sum(model.get_submodule(n).in_features + model.get_submodule(n).out_features for n in salient)
    return max(1, round(gift / per_rank))


def _windows(tokenizer, rcfg: RecoverConfig, split: str, n: int, seed: int):
    """Held-out windows: the named training set's ``split``; for other data, ``--eval-data`` (both splits)."""
    from ..data import named
    from ..data.examples import pack_examples
    from ..data.sources import load_records
    from ..util.errors import GiftQuantError

    if named.is_named(rcfg.train_data):
        spec = rcfg.train_data.split(":")[0] + f":{split}"
    elif rcfg.eval_data:
        spec = rcfg.eval_data
    else:
        raise GiftQuantError("compare --mode peft needs held-out data: a named --train-data or --eval-data")
    records = load_records(spec, split, limit=max(200, 8 * n))
    return pack_examples(tokenizer, records, rcfg.seq_len, n, seed, source=f"{spec} ({split})")


def peft_baseline(model, rank: int, targets: list[str], dora: bool, seed: int):
    """peft's own LoRA (or DoRA) of ``rank`` on ``targets``, alpha = rank, the base frozen, seeded init."""
    from peft import LoraConfig, get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    # LoRA's A is drawn from the global generator: seed it for reruns
    torch.manual_seed(derive_seed(seed, "lora-init"))
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=targets,
                                            use_dora=dora))


def run_peft_method(method: str, lr: float, model_dir, root: Path, qcfg: QuantizeConfig, rcfg: RecoverConfig,
                    tasks: list[str], limit: int | None, final: bool,
                    runtime: Runtime = Runtime(progress=False)) -> dict:

    from ..model.loading import load_model, load_tokenizer, resolve_device, resolve_model_dir
    from ..recover.loop import eval_loss
    from ..recover.training import train_stage

    src = resolve_model_dir(model_dir)
    device = resolve_device(runtime.device)
    tok = load_tokenizer(src)
    model = load_model(src)
    salient = salient_sets(model_dir, root, qcfg, runtime)
    targets = sorted({n.rsplit(".", 1)[-1] for n in salient})
    rank = matched_lora_rank(model, salient)
    if method == BASE:
        model.requires_grad_(False)
    elif method in PEFT_METHODS:
        model = PEFT_METHODS[method].prepare(model, salient, rank, targets, rcfg)
    else:
        raise ValueError(f"unknown PEFT method {method!r}; choose from {', '.join(PEFT_METHODS)}")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # the final phase reuses the search run of the chosen learning rate: its finished state is loaded
    # (train() resumes at the last step), then the model is scored on the test split instead
    work = root / f"{method}-lr{lr:g}"
    summary = {"history": []}
    if method != BASE:
        summary = train_stage(model, tok, dataclasses.replace(rcfg, lr=lr), work / "train", runtime,
                              teacher_src=src, qcfg=qcfg)
    model.eval()
    split = "test" if final else "validation"
    ids, labels = _windows(tok, rcfg, split, rcfg.eval_windows * (4 if final else 1),
                          derive_seed(rcfg.seed, "eval-windows", split))
    row = {"method": method, "lr": lr, "trainable_params": trainable, "lora_rank": rank,
           f"{split}_loss": eval_loss(model, ids, labels, device),
           "loss_curve": [h["loss"] for h in summary["history"]]}
    if final and tasks:
        from ..eval.zeroshot import evaluate_tasks

        row["zeroshot"] = evaluate_tasks(model, tok, tasks, limit=limit, batch_size=8, device=device, seed=0)
    return row


def best_lr(rows: list[dict]) -> float:
    ok = [r for r in rows if "validation_loss" in r]
    return min(ok, key=lambda r: r["validation_loss"])["lr"]


def peft_settings_doc(qcfg: QuantizeConfig, rcfg: RecoverConfig) -> dict:
    return {"quantize": dataclasses.asdict(qcfg), "recover": dataclasses.asdict(rcfg)}


REPORT_ORDER = (BASE, *PEFT_METHODS)


def write_peft_report(report_dir: Path, rows: list[dict], command: str) -> None:
    from ..util.files import atomic_write_text

    final = sorted((r for r in rows if r.get("final")), key=lambda r: REPORT_ORDER.index(r["method"]))
    tasks = sorted({t for r in final for t in (r.get("zeroshot") or {}).get("tasks", {})})
    lines = ["# gift-quant compare --mode peft", "", f"Command: `{command}`", "",
             "| method | trainable params | lr (picked on validation) | test loss | zero-shot mean |"
             + "".join(f" {t} |" for t in tasks),
             "|---|---|---|---|---|" + "---|" * len(tasks)]
    for r in final:
        if "failed" in r:
            lines.append(f"| {r['method']} | failed: {r['failed'][:80]} | | | |" + " |" * len(tasks))
            continue
        zs = r.get("zeroshot") or {}
        mean = zs.get("mean")
        per_task = "".join(f" {_headline(zs, t)} |" for t in tasks)
        lr = "-" if r["method"] == BASE else f"{r['lr']:g}"
        lines.append(f"| {r['method']} | {r['trainable_params']:,} | {lr} | {r['test_loss']:.4f} | "
                     f"{'' if mean is None else f'{mean:.4f}'} |{per_task}")
    lines += ["", "`base` is the untrained model on the same test windows and tasks.", "",
              "Validation loss per learning rate:", "", "| method | lr | validation loss |", "|---|---|---|"]
    for r in rows:
        if not r.get("final") and "validation_loss" in r:
            lines.append(f"| {r['method']} | {r['lr']:g} | {r['validation_loss']:.4f} |")
    lines += ["", "![test loss and zero-shot accuracy](peft_results.png)", "",
              "![training loss](peft_loss_curves.png)", ""]
    atomic_write_text(report_dir / "report_peft.md", "\n".join(lines))
    atomic_write_text(report_dir / "report_peft.json", json.dumps({"command": command, "rows": rows}, indent=1))
    _plot_results(report_dir / "peft_results.png", [r for r in final if "failed" not in r])
    plot_loss_curves(report_dir / "peft_loss_curves.png",
                     {f"{r['method']} (lr {r['lr']:g})": r["loss_curve"] for r in final if r.get("loss_curve")})


def _headline(zs: dict, task: str) -> str:
    """The task's headline score as the zero-shot mean uses it (see eval/zeroshot.py), or blank."""
    t = zs.get("tasks", {}).get(task) or {}
    v = t.get("headline", t.get("acc"))
    return "" if v is None else f"{v:.3f}"


def _plot_results(path: Path, final: list[dict]) -> None:
    """Two panels: held-out instruction loss and zero-shot mean per method, the untrained model dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not final:
        return
    base = next((r for r in final if r["method"] == BASE), None)
    trained = [r for r in final if r["method"] != BASE]
    panels = [("test_loss", "held-out instruction loss (lower is better)")]
    if any((r.get("zeroshot") or {}).get("mean") is not None for r in final):
        panels.append(("zeroshot", "zero-shot mean accuracy (higher is better)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 0.5 * len(trained) + 1.6), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        def value(r, key=key):
            return (r.get("zeroshot") or {}).get("mean") if key == "zeroshot" else r.get(key)

        rs = [r for r in trained if value(r) is not None]
        ys = list(range(len(rs)))
        colors = ["tab:green" if r["method"].startswith("gift") else "tab:gray" for r in rs]
        ref = value(base) if base is not None else None
        if ref is not None:  # lollipops from the untrained model: the change each method bought
            ax.hlines(ys, ref, [value(r) for r in rs], colors=colors, lw=2)
        ax.scatter([value(r) for r in rs], ys, color=colors, s=40, zorder=3)
        ax.set_yticks(ys, [f"{r['method']} ({r['trainable_params'] / 1e6:.1f}M)" for r in rs])
        ax.set_ylim(len(rs) - 0.5, -0.5)  # first method on top, half a row of margin
        for y, r in zip(ys, rs):
            ax.text(value(r), y - 0.25, f"{value(r):.3f}", ha="center", fontsize=8)
        if base is not None and value(base) is not None:
            ax.axvline(value(base), color="k", ls="--", lw=1, label=f"untrained {value(base):.3f}")
            ax.legend(fontsize=7, loc="best")
        vals = [value(r) for r in rs] + ([value(base)] if base and value(base) is not None else [])
        if vals:
            lo, hi = min(vals), max(vals)
            pad = (hi - lo) * 0.6 + 1e-3
            ax.set_xlim(lo - pad, hi + pad)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_compare_peft(model_dir: str | None, report_dir: Path, methods: list[str], qcfg: QuantizeConfig,
                     rcfg: RecoverConfig, tasks: list[str], limit: int | None, runtime: Runtime = Runtime(),
                     lr_grid: list[float] | dict[str, tuple[float, ...]] | None = None) -> dict:
    """PEFT comparison: learning-rate grid on validation, then the best run of each method on test."""
    from tqdm.auto import tqdm

    report_dir = Path(report_dir)
    root = report_dir / "runs" / "peft"
    root.mkdir(parents=True, exist_ok=True)
    if isinstance(lr_grid, dict):  # per method; the others keep their default grid
        grid = {m: tuple(lr_grid.get(m, PEFT_METHODS[m].lr_grid)) for m in methods}
    else:
        grid = {m: tuple(lr_grid) if lr_grid else PEFT_METHODS[m].lr_grid for m in methods}
    settings = {"model_dir": model_dir, **peft_settings_doc(qcfg, rcfg), "lr_grid": grid, "tasks": tasks,
                "limit": limit}
    claim_settings(report_dir / "settings_peft.json", settings, report_dir)
    def job(method: str, lr: float, final: bool) -> dict:
        spec = {"mode": "peft", "method": method, "lr": lr, "final": final, "root": str(root), "model_dir": model_dir,
                **peft_settings_doc(qcfg, rcfg), "tasks": tasks, "limit": limit,
                "runtime": dataclasses.asdict(dataclasses.replace(runtime, progress=False))}
        return run_cached_job(spec, root / f"peft_{method}_{lr:g}_{'final' if final else 'search'}")

    # the untrained model on the same test split and tasks: the reference every method should beat
    rows = [{**job(BASE, 0.0, final=True), "final": True}]
    bar = tqdm(total=sum(len(grid[m]) + 1 for m in methods), desc="compare peft", disable=not runtime.progress)
    for method in methods:
        grid_rows = []
        for lr in grid[method]:
            grid_rows.append(job(method, lr, final=False))
            bar.update()
        rows += grid_rows
        try:
            lr = best_lr(grid_rows)
        except ValueError:
            rows.append({"method": method, "final": True, "failed": "every learning rate failed"})
            bar.update()
            continue
        final = job(method, lr, final=True)
        rows.append({**final, "final": True})
        bar.update()
    write_peft_report(report_dir, rows, " ".join(sys.argv))
    return {"rows": rows}
