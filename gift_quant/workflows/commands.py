"""The commands' orchestration: ``quantize``, ``eval`` and ``recover`` built from the stages in stages.py.

``recover`` runs calibrate -> sensitivity -> quantize (-> block-wise reconstruction) -> train -> pack ->
eval, each stage recorded in ``OUT/run/stages.json`` so a rerun resumes from the first unfinished one
(run folders: packed/run_folder.py).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

from ..config.settings import E2E_TRAINABLE, EvalConfig, QuantizeConfig, RecoverConfig, Runtime, trainable_sets
from ..model.loading import check_lengths, load_model, load_tokenizer, parse_dtype, resolve_device, resolve_model_dir
from ..packed.any_model import evaluable, load_any
from ..packed.checkpoint import is_checkpoint, load, read_gift_config, save_checkpoint, verify_checkpoint
from ..packed.run_folder import (
    RUN_DIR,
    RunFiles,
    Stages,
    check_stage_checkpoint,
    claim_run,
    prepare_output,
    remove_intermediate,
    warn,
)
from ..util.errors import GiftQuantError, writing
from ..util.files import atomic_save_tensors, atomic_write_text
from .stages import (
    blockwise_reconstructor,
    check_data,
    convert_recovered,
    evaluate_perplexity,
    load_source,
    prepare_recovery,
    quantize_stage,
    quantize_to_checkpoint,
    run_inputs,
    select_salient,
    source_perplexity,
    train_stage,
)

__all__ = ["run_eval_ppl", "run_quantize", "run_recover"]


def run_quantize(model_dir: str | None, out: str | Path, cfg: QuantizeConfig, overwrite: bool = False,
                 runtime: Runtime = Runtime()) -> dict:
    """quantize: calibrate -> sensitivity -> salient-aware GPTQ -> native checkpoint in ``out``."""
    return quantize_to_checkpoint(model_dir, out, cfg, overwrite, runtime)[1]


def run_eval_ppl(path: str | None, cfg: EvalConfig, runtime: Runtime = Runtime()) -> dict:
    """Perplexity of what ``path`` serves; the target, window length and text are checked before any model loads."""
    device, trust = resolve_device(runtime.device), runtime.trust_remote_code
    folder, kind = evaluable(path)
    verified = verify_checkpoint(folder, trust) if kind == "gift-quant checkpoint" else None
    check_lengths(folder, {"--seq-len": cfg.seq_len}, trust)
    check_data(load_tokenizer(folder, trust), ecfg=cfg)
    model, tokenizer, bits, kind = load_any(path, device=device, trust_remote_code=trust, verified=verified)
    result = evaluate_perplexity(model, tokenizer, cfg, runtime)
    return {"model": str(path) if path else "default", "kind": kind, "effective_bits": bits,
            "ppl_data": cfg.ppl_data, **result}


def run_recover(model_dir: str | None, out: str | Path, qcfg: QuantizeConfig, rcfg: RecoverConfig,
                ecfg: EvalConfig, overwrite: bool = False, runtime: Runtime = Runtime(),
                keep_intermediate: bool = False) -> dict:
    """recover: calibrate -> sensitivity -> quantize -> recover -> pack -> eval, resumable by stage.

    post: GPTQ with salient columns, then noise-injected training of those columns (noise at
    ``noise_bits``, 4 by default). pre: train the salient columns of the full-precision model with
    noise at the target bits, then quantize with the same columns. After success, ``run/`` keeps only its
    record and training curve (run_folder.KEPT_AFTER_SUCCESS) unless ``keep_intermediate``.
    """
    summary = _RecoverRun(model_dir, Path(out), qcfg, rcfg, ecfg, overwrite, runtime).run()
    from accelerate import PartialState

    if not keep_intermediate and PartialState().is_main_process:
        remove_intermediate(Path(out) / RUN_DIR)
    return summary


def _check_source_model(src: Path, rcfg: RecoverConfig) -> None:
    """Refuse a gift-quant checkpoint as ``recover``'s model before any work, saying where its source model is.

    The block stage re-runs GPTQ block by block against the full-precision block's outputs, and the
    distillation teacher is the full-precision model: both need the source model, which a checkpoint is not.
    """
    if not is_checkpoint(src):
        return
    try:
        provenance = read_gift_config(src).get("provenance")
        source = provenance.get("source_model") if isinstance(provenance, dict) else None
    except (OSError, GiftQuantError):
        source = None
    where = (f"pass its source model folder {source}" if source and Path(source).is_dir()
             else "its source model (provenance.source_model in its gift_quant_config.json"
                  f"{': ' + str(source) if source else ''}) is not recorded or no longer exists: pass the "
                  "full-precision model folder it was made from")
    stage = (f"the block stage (--blockwise-steps {rcfg.blockwise_steps}) trains against the full-precision model"
             if rcfg.blockwise_steps > 0 else "recover starts from the full-precision model")
    raise GiftQuantError(f"{src} is a gift-quant checkpoint: {stage}; {where}")


class _RecoverRun:
    """One ``recover`` run: its settings, run folder and stage record, and one method per stage."""

    def __init__(self, model_dir, out: Path, qcfg, rcfg, ecfg, overwrite, runtime: Runtime):
        from accelerate import PartialState

        self.out, self.qcfg, self.rcfg, self.ecfg = out, qcfg, rcfg, ecfg
        self.overwrite, self.runtime, self.trust = overwrite, runtime, runtime.trust_remote_code
        self.src = resolve_model_dir(model_dir)
        _check_source_model(self.src, rcfg)
        self.device = resolve_device(runtime.device)
        check_lengths(self.src, {"--seq-len": qcfg.seq_len, "recover.seq_len": rcfg.seq_len,
                                 "--ppl-seq-len": ecfg.seq_len}, self.trust)
        self.dtype = parse_dtype(qcfg.dtype)
        self.noise = rcfg.noise_spec(qcfg.bits)  # built once; every training layer carries this object
        self.blockwise = rcfg.variant == "post" and rcfg.blockwise_steps > 0
        # Under torchrun / accelerate launch there is one process per rank: rank 0 alone claims the run and
        # runs every stage before training (the others wait, then find those stages finished and only load);
        # all ranks train; rank 0 alone writes the trained model, packs and evaluates.
        self.dist = PartialState(cpu=self.device.type == "cpu")

    def run(self) -> dict:
        with self.dist.main_process_first():
            main = self.dist.is_main_process  # rank 0 alone owns (and locks) the output folder
            # training and perplexity text are read now: a bad file must not surface after quantization
            check_data(load_tokenizer(self.src, self.trust), self.qcfg, self.rcfg, self.ecfg)
            prepare_output(self.out, self.overwrite and main, lock=main,
                           inputs=run_inputs(self.src, self.qcfg, self.rcfg, self.ecfg))
            self.tokenizer, model, self.windows, self.identity = load_source(self.src, self.qcfg, self.dtype,
                                                                              self.runtime)
            # the precision as resolved here: a run trained in bf16 does not resume where auto means fp32
            self.identity.update(recover=self.rcfg.identity(self.device), eval=dataclasses.asdict(self.ecfg))
            self.run_dir = claim_run(self.out, self.identity)
            self.stages = Stages(self.run_dir)
            self._check_artifacts()
            self.salient = None if self.rcfg.variant == "post" else self._select(model)
            if self.blockwise:  # the study's "before": GPTQ + salient columns with no recovery at all
                self._quantize("start", self._fresh(), blockwise=False)
            self._quantize("quantized", model if self.rcfg.variant == "post" else self._fresh(),
                           blockwise=self.rcfg.variant == "post")
            del model
            self._evaluate("eval_before", self.run_dir / ("start" if self.blockwise else "quantized"), "ppl before")
            if self.blockwise:
                self._evaluate("eval_blockwise", self.run_dir / "quantized", "ppl after block stage")
            self._evaluate("eval_fp", None, "ppl full precision")
            self._say_before()
        trained = self._train()
        if not self.dist.is_main_process:
            self.dist.wait_for_everyone()  # rank 0 packs and evaluates
            return json.loads((self.out / "summary.json").read_text())
        final = self.run_dir / "recovered"
        if self.rcfg.variant == "pre":
            final = self._quantize("recovered", trained, blockwise=True)
        self._pack(final)
        self._evaluate("eval_after", self.out, "ppl after")
        summary = self._summary()
        self.dist.wait_for_everyone()
        return summary

    def _check_artifacts(self) -> None:
        """Recompute a finished stage whose artifact a pending stage needs and which fails its sha256 check.

        run/ is a cache of deterministic stages (packed/run_folder.py): recomputing gives what an uninterrupted run
        gives; loading a changed artifact would give a silently different final checkpoint.
        """
        done, post = self.stages.finished, self.rcfg.variant == "post"
        files = RunFiles(self.run_dir)
        checks = []  # (stage that made it, why it is unusable or None)
        if not post and done("select"):
            checks.append(("select", files.problem([self.run_dir / "salient.safetensors"])))
        if done("quantized") and not (done("eval_before") and (not post or done("recover"))):
            checks.append(("quantized", check_stage_checkpoint(self.run_dir / "quantized")))
        if self.blockwise and done("start") and not done("eval_before"):
            checks.append(("start", check_stage_checkpoint(self.run_dir / "start")))
        if not done("pack"):
            if post and done("recover"):
                checks.append(("recover", check_stage_checkpoint(self.run_dir / "recovered")))
            if not post and done("recovered"):
                checks.append(("recovered", check_stage_checkpoint(self.run_dir / "recovered")))
            if not post and done("recover") and not done("recovered"):
                trained = sorted(p for p in (self.run_dir / "trained").glob("*") if p.is_file())
                why = files.problem(trained) if trained else f"{self.run_dir / 'trained'} is empty"
                checks.append(("recover", why))
        for stage, why in checks:
            if why is not None and self.dist.is_main_process:
                warn(f"{why}; recomputing the {stage} stage")
                self.stages.drop(stage)

    def _fresh(self):
        return load_model(self.src, self.dtype, self.trust)

    def _select(self, model):
        """pre: the salient columns, chosen on the full-precision model (then trained, then quantized)."""
        from safetensors.torch import load_file

        path = self.run_dir / "salient.safetensors"
        if not self.stages.finished("select"):
            salient = select_salient(model, self.windows, self.qcfg, self.runtime)
            atomic_save_tensors(path, salient)
            RunFiles(self.run_dir).record([path])
            self.stages.mark("select", {"layers": len(salient)})
        return load_file(str(path))

    def _quantize(self, name: str, source_model, blockwise: bool) -> Path:
        """Quantize ``source_model`` into run/<name> (a native checkpoint); resumable per block."""
        path = self.run_dir / name
        if not self.stages.finished(name):
            t0 = time.perf_counter()
            noise = self.rcfg.blockwise_noise_spec(self.qcfg.bits)
            rec = blockwise_reconstructor(self.rcfg, noise) if blockwise else None
            report = quantize_stage(source_model, self.windows, self.qcfg, self.src, self.identity, path,
                                    self.runtime, fixed_salient=self.salient, reconstruct=rec,
                                    reconstruct_target=self.rcfg.blockwise_target)
            self.stages.mark(name, {"seconds": time.perf_counter() - t0,
                                    "effective_bits": report.mean_effective_bits()})
        return path

    def _evaluate(self, name: str, path: Path | None, desc: str) -> None:
        """Perplexity of the checkpoint at ``path`` (None: the full-precision source) on the held-out text."""
        if self.stages.finished(name):
            return
        if path is None:  # the source's depends only on it and the evaluation settings: cached across runs
            result = source_perplexity(self._fresh, self.identity["model"], self.tokenizer, self.ecfg, self.dtype,
                                       self.runtime, desc)
            if result["cached"] and self.dist.is_main_process:
                print(f"gift-quant: {desc} {result['perplexity']:.3f}, cached from an earlier run ({result['cached']})",
                      file=sys.stderr, flush=True)
        else:
            result = evaluate_perplexity(load(path), self.tokenizer, self.ecfg, self.runtime, desc)
        self.stages.mark(name, result)

    def _say_before(self) -> None:
        """The first number a user waits for, as soon as it is known (training takes most of the run)."""
        if self.dist.is_main_process:
            before, fp = self.stages.done["eval_before"]["perplexity"], self.stages.done["eval_fp"]["perplexity"]
            block = ""
            if self.blockwise:
                block = f", {self.stages.done['eval_blockwise']['perplexity']:.3f} after the block stage"
            print(f"gift-quant: perplexity {before:.3f} quantized, before any recovery{block} (full precision "
                  f"{fp:.3f}); now training {self.rcfg.steps} steps ({self.rcfg.loss})", file=sys.stderr, flush=True)

    def _train(self):
        """post: train the packed model's salient columns; pre: the full-precision model's. Returns the latter."""
        from ..recover.model import convert_to_dense, prepare_dense

        rcfg, qpath = self.rcfg, self.run_dir / "quantized"
        if self.stages.finished("recover"):
            pending = rcfg.variant == "pre" and not self.stages.finished("recovered")
            return load_model(self.run_dir / "trained", self.dtype) if pending else None
        if rcfg.steps == 0:  # block-wise reconstruction only: the quantized model is the result
            if self.dist.is_main_process:
                with writing(self.run_dir / "recovered"):
                    shutil.copytree(qpath, self.run_dir / "recovered", dirs_exist_ok=True,
                                    ignore=shutil.ignore_patterns(RUN_DIR))
                self.stages.mark("recover", {"seconds": 0.0, "noise_bits": self.noise.bits, "final_loss": None})
            return None
        t0 = time.perf_counter()
        if rcfg.variant == "post":
            model = prepare_recovery(qpath, self.src, self.noise, rcfg.seed, self.dtype, self.runtime,
                                     fit_device=self.device, train=trainable_sets(rcfg.train, E2E_TRAINABLE, "--train"))
        else:
            model = prepare_dense(self._fresh(), self.salient, noise=self.noise, seed=rcfg.seed)
        summary = train_stage(model, self.tokenizer, rcfg, self.run_dir / "recover", self.runtime,
                              teacher_src=self.src, qcfg=self.qcfg)
        if not self.dist.is_main_process:
            return None
        if rcfg.variant == "post":
            convert_recovered(model)
            save_checkpoint(model, self.run_dir / "recovered", self.src,
                            {**read_gift_config(qpath), "recover": self._recover_record()})
        else:
            convert_to_dense(model.cpu())
            with writing(self.run_dir / "trained"):
                model.save_pretrained(self.run_dir / "trained")
            RunFiles(self.run_dir).record(sorted(p for p in (self.run_dir / "trained").glob("*") if p.is_file()))
        history = summary["history"]
        self.stages.mark("recover", {"seconds": time.perf_counter() - t0, "noise_bits": self.noise.bits,
                                     "final_loss": history[-1]["loss"] if history else None,
                                     "train_tokens": summary.get("train_tokens"),
                                     "teacher_mb": summary.get("teacher_mb")})
        return model if rcfg.variant == "pre" else None

    def _recover_record(self) -> dict:
        """The recovery settings a checkpoint records: as given, with the precision training computed in."""
        return {**dataclasses.asdict(self.rcfg), "precision": self.identity["recover"]["precision"]}

    def _pack(self, final_src: Path) -> None:
        if self.stages.finished("pack"):
            return
        t0 = time.perf_counter()
        doc = read_gift_config(final_src)
        doc.update({"recover": self._recover_record(), "variant": self.rcfg.variant})
        doc.pop("format", None)
        doc.pop("format_version", None)
        save_checkpoint(load(final_src), self.out, self.src, doc)
        self.stages.mark("pack", {"seconds": time.perf_counter() - t0})

    def _summary(self) -> dict:
        done = self.stages.done
        timings = {k: v.get("seconds") for k, v in done.items() if isinstance(v, dict) and "seconds" in v}
        summary = {"out": str(self.out), "variant": self.rcfg.variant, "bits": self.qcfg.bits,
                   "noise": self.noise.kind, "noise_bits": self.noise.bits, "loss": self.rcfg.loss,
                   "blockwise_steps": self.rcfg.blockwise_steps,
                   "effective_bits": read_gift_config(self.out)["effective_bits"],
                   "ppl_before": done["eval_before"]["perplexity"], "ppl_after": done["eval_after"]["perplexity"],
                   "ppl_fp": done["eval_fp"]["perplexity"], "ppl_data": self.ecfg.ppl_data, "seconds": timings}
        fp, before, after = summary["ppl_fp"], summary["ppl_before"], summary["ppl_after"]
        summary["gap_closed"] = (before - after) / (before - fp) if before > fp else None
        if self.blockwise:  # the block stage's share of the gap, on its own
            block = summary["ppl_after_blockwise"] = done["eval_blockwise"]["perplexity"]
            summary["gap_closed_blockwise"] = (before - block) / (before - fp) if before > fp else None
        atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=1))
        atomic_write_text(self.out / "summary.md", _summary_markdown(summary, self.qcfg, self.rcfg))
        return summary


def _summary_markdown(s: dict, qcfg: QuantizeConfig, rcfg: RecoverConfig) -> str:
    """The run's result in a few lines a person reads: settings, size, perplexity and the gap closed."""
    gap = "" if s["gap_closed"] is None else f" ({100 * s['gap_closed']:.1f} % of the gap to full precision closed)"
    before = "quantized (GPTQ + salient columns), before any recovery"
    block = []
    if "ppl_after_blockwise" in s:
        share = s.get("gap_closed_blockwise")
        block = [f"| after the block stage | {s['ppl_after_blockwise']:.3f}"
                 + ("" if share is None else f" ({100 * share:.1f} % of the gap closed by the block stage alone)")
                 + " |"]
    noise = "" if s["noise"] == "none" else f" at {s['noise_bits']} bits" + (
        ", annealed to 0" if rcfg.noise_schedule == "anneal" else "")
    lines = [f"# gift-quant recover: {s['out']}", "",
             f"- {s['bits']}-bit {'symmetric' if qcfg.sym else 'asymmetric'} "
             f"{'per-row' if qcfg.group_size <= 0 else f'group-{qcfg.group_size}'} GPTQ with salient columns, "
             f"{s['effective_bits']:.3f} effective bits per weight (scales and fp16 salient columns included)",
             f"- recovery: GIFT-SW {s['variant']}, loss {rcfg.loss} on {rcfg.train_data}, {rcfg.steps} steps of "
             f"{rcfg.batch_size * rcfg.grad_accum} x {rcfg.seq_len} tokens, lr {rcfg.lr:g}, noise {s['noise']}"
             f"{noise}"
             + (f", block-wise {s['blockwise_steps']} steps per block ({rcfg.blockwise_train})"
                if s["blockwise_steps"] else "")
             + (f", end to end {rcfg.train} (scales lr {rcfg.scales_lr:g})" if "scales" in rcfg.train else ""),
             "", f"Perplexity on {s['ppl_data']} (lower is better):", "",
             "| model | perplexity |", "|---|---|",
             f"| full precision (the source model) | {s['ppl_fp']:.3f} |",
             f"| {before} | {s['ppl_before']:.3f} |", *block,
             f"| recovered | {s['ppl_after']:.3f}{gap} |", "",
             "Seconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in s["seconds"].items() if v is not None), ""]
    return "\n".join(lines)
