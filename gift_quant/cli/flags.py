"""The command line's flags: one function per group of flags, so a subcommand lists what it takes."""

from __future__ import annotations

import argparse

from ..config.settings import NOISE_KINDS, NOISE_SCHEDULES
from ..util.precision import PRECISIONS

__all__ = ["add_clean_flags", "add_common", "add_compare_flags", "add_eval_flags", "add_export_flags",
           "add_inspect_flags", "add_quantize_flags", "add_recover_flags"]


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--json", dest="json_out", default=None, metavar="FILE", help="also write the result as JSON")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model folder")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="CPU threads (default: the cores idle at start, see gift_quant/util/cpu_policy.py; "
                        "OMP_NUM_THREADS, when set, is kept)")


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return n


def add_quantize_flags(p: argparse.ArgumentParser, multi_bits: bool = False) -> None:
    p.add_argument("model_dir", nargs="?", default=None,
                   help="local Hugging Face model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", required=True, help="output folder (created; resumable)")
    p.add_argument("--recipe", default=None, help="YAML recipe (see recipes/); flags override it")
    if multi_bits:
        p.add_argument("--bits", type=int, nargs="+", default=None, help="bit widths to sweep (default 3)")
    else:
        p.add_argument("--bits", type=int, default=None, help="2, 3, 4 or 8 (default 3)")
    p.add_argument("--group-size", type=int, default=None, help="columns per grid; -1 = per row (default)")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=None, help="symmetric grid (default)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric grid with zero points")
    p.add_argument("--act-order", action="store_true", default=None, help="GPTQ act-order among non-salient columns")
    p.add_argument("--static-groups", action="store_true", default=None,
                   help="compact layout: fit groups before act-order (natural groups always are)")
    p.add_argument("--group-layout", choices=["natural", "compact"], default=None,
                   help="natural (default): group = column // group size, salient columns included, servable by "
                        "compressed-tensors/vLLM/GGUF; compact: runs of non-salient columns (GPTQ format only)")
    p.add_argument("--clip", choices=["mse", "minmax"], default=None, help="grid range search (default mse)")
    p.add_argument("--damp", type=float, default=None, help="GPTQ dampening fraction (default 0.01)")
    sal = p.add_mutually_exclusive_group()
    sal.add_argument("--salient", type=int, default=None, metavar="K", help="salient columns per linear")
    sal.add_argument("--salient-fraction", type=float, default=None, metavar="F",
                     help="salient columns as a fraction of in_features")
    p.add_argument("--metric", default=None,
                   help="gift (default), owq, quik, wanda, or tau=..,rho=..,gamma=..,d=quant|weight")
    p.add_argument("--calib-data", default=None, help="named dataset, .txt/.jsonl/.parquet file or folder, or HF name")
    p.add_argument("--calib-samples", type=int, default=None, help="calibration windows (default 128)")
    p.add_argument("--seq-len", type=int, default=None, help="calibration window length (default 256)")
    p.add_argument("--calib-batch-size", type=int, default=None, help="windows per calibration forward (default 8)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default=None, help="compute dtype of the model: float32 (default) or bfloat16")
    p.add_argument("--overwrite", action="store_true", help="discard an earlier gift-quant run in --out")


def add_recover_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variant", choices=["post", "pre"], default=None,
                   help="post: quantize then train (default, best at 2-3 bits); pre: train then quantize")
    p.add_argument("--no-noise", dest="noise", action="store_const", const="none", default=None,
                   help="plain salient fine-tuning (ablation)")
    p.add_argument("--noise", dest="noise", choices=NOISE_KINDS, help="noise distribution")
    p.add_argument("--noise-bits", type=int, default=None, help="bits of the noise step (post default 4)")
    p.add_argument("--noise-schedule", choices=NOISE_SCHEDULES, default=None,
                   help="the noise's scale over the training steps: constant (default, the paper) or anneal "
                        "(linear from 1 to 0 at the last step)")
    p.add_argument("--loss", choices=["ce", "kd", "kd+ce"], default=None,
                   help="objective: kd (KL to the full-precision model; recover's default), ce (next-token "
                        "cross-entropy; finetune's default), kd+ce")
    p.add_argument("--kd-temperature", type=float, default=None, help="distillation temperature (default 1)")
    p.add_argument("--ce-weight", type=float, default=None, help="weight of CE in kd+ce (default 1)")
    p.add_argument("--teacher-device", choices=["auto", "cpu"], default=None,
                   help="where the full-precision teacher runs (cpu keeps it off the accelerator)")
    p.add_argument("--blockwise-steps", type=int, default=None,
                   help="block-wise reconstruction steps per block right after its GPTQ (0 = off)")
    p.add_argument("--blockwise-lr", type=float, default=None,
                   help="block-wise learning rate of the salient columns (default 1e-3)")
    p.add_argument("--blockwise-target", choices=["fp-prefix", "quant-prefix"], default=None,
                   help="block-wise targets: fp block on fp inputs (default) or on the quantized prefix's")
    p.add_argument("--blockwise-train", default=None, metavar="SETS",
                   help="what the block stage trains: a comma list of salient, scales, rounding "
                        "(default all three)")
    p.add_argument("--blockwise-scales-lr", type=float, default=None,
                   help="block-stage lr of the scale multipliers (and asymmetric zeros; default 5e-3)")
    p.add_argument("--blockwise-rounding-lr", type=float, default=None,
                   help="block-stage signed-gradient lr of the rounding offsets (default 1 / --blockwise-steps)")
    p.add_argument("--blockwise-warmup-ratio", type=float, default=None,
                   help="block-stage linear warm-up share of the steps (default 0.05)")
    p.add_argument("--blockwise-holdout", type=float, default=None,
                   help="share of the calibration batches held out of block training, loss logged (default 0.125)")
    p.add_argument("--blockwise-noise", choices=NOISE_KINDS, default=None,
                   help="the block stage's noise on the non-salient weights (default: as --noise)")
    p.add_argument("--blockwise-noise-schedule", choices=NOISE_SCHEDULES, default=None,
                   help="the block stage's noise schedule over each block's steps (default: as --noise-schedule)")
    p.add_argument("--train", default=None, metavar="SETS",
                   help="what end-to-end training trains: salient (default) or salient,scales")
    p.add_argument("--scales-lr", type=float, default=None,
                   help="end-to-end lr of the scale multipliers (default 1e-4)")
    p.add_argument("--steps", type=int, default=None,
                   help="end-to-end optimizer steps (default 100; 0 = block-wise only)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 3e-4)")
    p.add_argument("--batch-size", type=int, default=None, help="windows per micro-batch per process")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per step")
    p.add_argument("--warmup-ratio", type=float, default=None)
    p.add_argument("--train-data", default=None,
                   help="named dataset, file or HF name (default sotu for recover, natural-instructions for "
                        "finetune); join several with + for an even mix, e.g. sotu+boolq-passages:train")
    p.add_argument("--eval-data", default=None, help="held-out text for periodic eval during training")
    p.add_argument("--save-every", type=int, default=None, help="save resumable state every N steps")
    p.add_argument("--gradient-checkpointing", action="store_true", default=None)
    p.add_argument("--cache-mb", type=int, default=None, metavar="MB",
                   help="memory for training's speed caches (noisy weights kept for backward, dense base); "
                        "default: a quarter of the free memory; 0: off. The trained result is the same either way")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="training's compute precision: auto (default: bf16 where the GPU or CPU multiplies bf16 "
                        "natively, else fp32), fp32, or bf16 (autocast; trained weights and optimizer stay fp32)")
    p.add_argument("--ppl-data", default=None, help="perplexity text (default boolq-passages:test)")
    p.add_argument("--ppl-seq-len", type=int, default=None, help="perplexity window (default 512)")
    p.add_argument("--max-windows", type=int, default=None, help="perplexity windows (default 40)")


def add_compare_flags(c: argparse.ArgumentParser) -> None:
    c.add_argument("--mode", choices=["quant", "peft"], default="quant",
                   help="quant: recovery after quantization (default); peft: GIFT-SW vs LoRA/DoRA/full FT")
    c.add_argument("--lr-grid", default=None,
                   help="peft mode: learning rates to try, for every method ('1e-4,3e-4') or per method "
                        "('gift=3e-4,1e-3;full=3e-5,1e-4'; unnamed methods keep their default grid)")
    c.add_argument("--methods", default=None, help="comma-separated subset (default: all methods)")
    c.add_argument("--tasks", default=None, help="zero-shot tasks, e.g. gift6 (needs the [eval] extra)")
    c.add_argument("--limit", type=int, default=None, help="zero-shot examples per task")


def add_eval_flags(e: argparse.ArgumentParser) -> None:
    e.add_argument("path", nargs="?", default=None, help="model folder or checkpoint (default: embedded model)")
    e.add_argument("--ppl-data", default=None, help="named dataset, file or HF name (default boolq-passages:test)")
    e.add_argument("--seq-len", type=int, default=None, help="window length (default 512)")
    e.add_argument("--max-windows", type=int, default=None, help="score at most N windows (default 40)")
    e.add_argument("--recipe", default=None)
    e.add_argument("--tasks", default=None,
                   help="zero-shot accuracy with lm-eval instead of perplexity: gift6 (ARC-e, ARC-c, BoolQ, "
                        "HellaSwag, PIQA, WinoGrande), all (+ lambada), or a comma list (needs the [eval] extra)")
    e.add_argument("--limit", type=int, default=None, metavar="N", help="first N documents of each task")
    e.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size (default 8)")
    e.add_argument("--seed", type=int, default=0)


def add_export_flags(x: argparse.ArgumentParser) -> None:
    x.add_argument("ckpt", help="gift-quant checkpoint folder (quantize / recover output)")
    x.add_argument("--out", required=True, help="export folder (created; an earlier export needs --overwrite)")
    x.add_argument("--format", choices=["auto", "compressed-tensors", "gptq-lora", "dense", "gguf"], default="auto",
                   help="auto (default): compressed-tensors when it carries the checkpoint exactly, else gptq-lora, "
                        "else dense; compressed-tensors: pack-quantized base (vLLM: 2-8 bits on GPUs, 4 on CPUs; "
                        "transformers) + PEFT adapter in OUT/adapter; gptq-lora: GPTQ base (transformers/GPTQModel; "
                        "vLLM at 4/8 bits) + the same adapter; dense: merged model; "
                        "gguf: llama.cpp OUT/model.gguf (Q4_0/Q8_0) + OUT/salient-lora.gguf")
    x.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype of the unquantized tensors (dense: of all; compressed-tensors: also of the scales); "
                        "default the checkpoint's; vLLM's GPTQ kernels want float16")
    x.add_argument("--checkpoint-format", choices=["auto", "gptq", "gptq_v2"], default="auto",
                   help="GPTQ zero-point layout: gptq (v1, widest support), gptq_v2, auto (v1 unless it cannot)")
    x.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    _add_json(x)


def add_inspect_flags(i: argparse.ArgumentParser) -> None:
    i.add_argument("path", help="native checkpoint, gptq-lora / GPTQ / compressed-tensors export, or dense model "
                                "folder")
    i.add_argument("--layers", action="store_true", help="add the per-layer table")
    _add_json(i)


def add_clean_flags(k: argparse.ArgumentParser) -> None:
    k.add_argument("out", help="an output folder of quantize, recover or finetune")
    k.add_argument("--discard-progress", action="store_true", help="also clean an unfinished run (it restarts)")
    _add_json(k)


def _add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", dest="json_out", default=None, metavar="FILE", help="also write the result as JSON")
