"""Training's compute precision (``--precision auto | fp32 | bf16``): which one a run uses, and why.

Training in bf16 runs the forward pass and the loss's matmuls under ``torch.autocast`` in bfloat16, which
halves the bytes every matmul reads and, where the hardware multiplies bf16 natively, doubles its
throughput. What trains stays float32: the salient columns (master weights), the optimizer's moments, the
gradients handed to it. ``auto`` picks bf16 only where it is native:

* CUDA: when ``torch.cuda.is_bf16_supported()`` (Ampere and newer);
* CPU: when torch's oneDNN reports bf16 support *and* the CPU flags name ``avx512_bf16`` or ``amx_bf16``
  (native bf16 dot products). Elsewhere oneDNN emulates bf16 by converting every operand: on an AVX2
  Zen 3 a (512 x 576) @ (576 x 1536) matmul, one thread, took 6x longer in bf16 than in float32;
* otherwise fp32.

The decision is a pure function of what was probed (``decide_precision``: setting, device type, the
probes' answers, the CPU flags text), kept apart from the probing (``resolve_precision``), so every case
is testable on any machine. A run records the *resolved* precision in its identity (RecoverConfig.identity):
a run trained in bf16 does not resume on a machine where ``auto`` means fp32.

Nothing heavy is imported at module level: config/settings.py reads ``PRECISIONS`` from here.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import GiftQuantError

__all__ = ["NATIVE_BF16_FLAGS", "PRECISIONS", "Precision", "autocast", "cpu_flags", "cpu_native_bf16",
           "decide_precision", "resolve_precision", "say_precision"]

PRECISIONS = ("auto", "fp32", "bf16")
# /proc/cpuinfo flags of x86 CPUs with bf16 dot-product instructions (AVX512-BF16: Cooper Lake, Zen 4+;
# AMX-BF16: Sapphire Rapids+); oneDNN's bf16 kernels use them, without them it converts and multiplies in fp32
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class Precision:
    """A resolved compute precision: ``name`` (fp32 or bf16) and the reason, in words, it was chosen."""

    name: str
    reason: str

    @property
    def dtype(self):
        """The autocast dtype (torch.bfloat16) for bf16, torch.float32 for fp32."""
        import torch

        return torch.bfloat16 if self.name == "bf16" else torch.float32

    @property
    def bf16(self) -> bool:
        return self.name == "bf16"

    def line(self) -> str:
        """The one line a run prints when it starts training."""
        other = "--precision fp32 for full precision" if self.bf16 else "--precision bf16 to force it"
        return f"gift-quant: training computes in {self.name} ({self.reason}; {other})"


def cpu_native_bf16(flags: str) -> bool:
    """Whether a CPU whose /proc/cpuinfo ``flags`` line (or whole text) is ``flags`` multiplies bf16 natively."""
    words = set(flags.split())
    return any(f in words for f in NATIVE_BF16_FLAGS)


def decide_precision(setting: str, device_type: str, *, cuda_bf16: bool = False, onednn_bf16: bool = False,
                     flags: str = "") -> Precision:
    """The pure decision: ``setting`` (auto | fp32 | bf16) on a ``device_type`` (cpu, cuda) with these probes.

    ``cuda_bf16``: torch.cuda.is_bf16_supported(); ``onednn_bf16``: torch's oneDNN bf16 support; ``flags``:
    the CPU's /proc/cpuinfo flags. An explicit fp32 or bf16 is kept, except bf16 on a GPU without it (an error).
    """
    if setting not in PRECISIONS:
        raise GiftQuantError(f"--precision {setting!r} is not a precision: use one of {', '.join(PRECISIONS)}")
    cuda = device_type == "cuda"
    native = cuda_bf16 if cuda else onednn_bf16 and cpu_native_bf16(flags)
    where = "this GPU" if cuda else "this CPU"
    if setting == "fp32":
        return Precision("fp32", "--precision fp32")
    if setting == "bf16":
        if cuda and not cuda_bf16:
            raise GiftQuantError("--precision bf16: this GPU has no bf16 support; use --precision fp32 (or auto)")
        slow = "" if native else f"; {where} has no native bf16 matmul: emulated, likely slower"
        return Precision("bf16", "--precision bf16" + slow)
    if native:
        return Precision("bf16", f"auto: {where} has native bf16 matmul")
    return Precision("fp32", f"auto: {where} has no native bf16 matmul")


def cpu_flags() -> str:
    """The flags line of /proc/cpuinfo ('' where it cannot be read: not Linux, or no such line)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return value
    return ""


def _onednn_bf16() -> bool:
    import torch

    if not torch.backends.mkldnn.is_available():
        return False
    try:  # torch's own check (cpuinfo: avx512bw/vl/dq or better); private, so its absence means "no"
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(setting: str, device) -> Precision:
    """The precision ``setting`` means on ``device`` (a torch.device or its name): probes, then `decide_precision`."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return decide_precision(setting, "cuda", cuda_bf16=ok)
    if dev.type != "cpu":  # another accelerator: no probe here, so auto stays at fp32
        return decide_precision(setting, dev.type)
    if setting == "fp32":  # nothing to probe
        return decide_precision(setting, "cpu")
    return decide_precision(setting, "cpu", onednn_bf16=_onednn_bf16(), flags=cpu_flags())


def autocast(precision: Precision, device):
    """The context a training forward pass (model, teacher, loss) runs in: bf16 autocast, or nothing for fp32.

    torch.autocast's state is per thread: a thread that computes a forward pass (recover/lanes.py) enters it
    itself. The backward pass runs outside it (as torch recommends); custom autograd Functions cast there.
    """
    if not precision.bf16:
        return contextlib.nullcontext()
    import torch

    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


_SAID: set[str] = set()


def say_precision(precision: Precision) -> None:
    """Print ``precision.line()`` on stderr, once per process (a run's block and end-to-end stages share it)."""
    line = precision.line()
    if line not in _SAID:
        _SAID.add(line)
        print(line, file=sys.stderr, flush=True)
