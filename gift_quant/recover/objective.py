"""Training objectives of recovery: next-token cross-entropy, distillation from the full-precision model, both.

* ``ce``: mean next-token cross-entropy over the tokens whose label is not masked (-100).
* ``kd``: mean over the same tokens of ``T^2 * KL(softmax(t / T) || softmax(s / T))``, ``t`` the
  full-precision teacher's logits, ``s`` the student's (logit distillation as in LLM-QAT, BitDistiller,
  PV-Tuning). It needs no labels, so plain text trains on every token.
* ``kd+ce``: ``kd + ce_weight * ce``.

Memory: the logits are never materialised for the whole batch. The model runs to its final hidden
states (``output_hidden_states`` with ``logits_to_keep=1``), and the vocabulary-sized work -- the head's
matmul, the log-softmaxes of student and teacher, the KL -- runs on ``chunk_tokens`` positions at a
time, so peak memory holds one chunk's logits (about ``chunk_tokens x vocab`` floats, a few times over)
instead of ``batch x seq x vocab`` twice. The teacher only contributes its final hidden states (no
grad); its logits are computed per chunk with the head, which is the student's own when the two heads
are equal (lm_head is never quantized or trained), so a teacher kept on the CPU sends only
``batch x seq x hidden`` to the accelerator.

Compute: with a frozen head (every GIFT-SW and LoRA run) each chunk's gradient with respect to its
hidden states is taken in the forward pass, right after its loss (``_FrozenHeadLoss``), and handed back
by the backward pass: per chunk the head runs once for the student, once for the teacher and once for
the gradient -- three vocabulary-sized matmuls, the fewest possible, whatever the chunk size -- and no
chunk's logits outlive it. (The chunks under activation checkpointing, as before, ran the head five
times: the student's and the teacher's both again in backward.) A head that trains (full fine-tuning)
keeps the checkpointed chunks, whose backward also yields the head's own gradient.
Writing this by hand is needed because HF models either return all logits or a fixed slice of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..util.errors import GiftQuantError

__all__ = ["IGNORE", "LOSSES", "Objective", "Teacher", "chunked_loss", "final_hidden", "head_fn", "objective_loss"]

IGNORE = -100
LOSSES = ("ce", "kd", "kd+ce")


@dataclass(frozen=True)
class Objective:
    loss: str = "ce"
    temperature: float = 1.0
    ce_weight: float = 1.0  # weight of the CE term in kd+ce
    chunk_tokens: int = 128  # positions per head chunk: memory only (the head runs 3 times per position at any size)

    @property
    def needs_teacher(self) -> bool:
        return self.loss != "ce"


# ------------------------------------------------------------------ pure numeric core


def _chunk_sums(h_s: torch.Tensor, h_t: torch.Tensor | None, targets: torch.Tensor, head_s, head_t,
                obj: Objective) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of CE, sum of T^2 KL) over the rows of one chunk (rows = positions; targets already valid).

    CE is always computed (it is logged under every objective); KL only with teacher states.
    """
    s = head_s(h_s).float()
    s_logp = F.log_softmax(s / obj.temperature, dim=-1)
    if obj.temperature == 1.0:
        ce = -s_logp.gather(1, targets.unsqueeze(1)).sum()
    else:
        ce = F.cross_entropy(s, targets, reduction="sum")
    if h_t is None:
        return ce, s.new_zeros(())
    with torch.no_grad():
        t_logp = F.log_softmax(head_t(h_t).float() / obj.temperature, dim=-1)
    kl = F.kl_div(s_logp, t_logp, log_target=True, reduction="sum") * obj.temperature**2
    return ce, kl


class _FrozenHeadLoss(torch.autograd.Function):
    """The loss ``scale[0] * sum CE + scale[1] * sum KL`` over the rows, and both sums (not differentiable).

    The loss's gradient for the rows is taken in the forward pass, chunk by chunk: each chunk builds a
    small graph (head, log-softmaxes, loss) on its detached rows, differentiates it at once and frees it.
    The backward pass only scales that gradient by the loss's incoming gradient.
    """

    @staticmethod
    def forward(ctx, rows_s, rows_t, targets, head_s, head_t, obj, scale):
        grad = torch.empty_like(rows_s)
        loss = ce_sum = kl_sum = rows_s.new_zeros((), dtype=torch.float32)
        for a in range(0, rows_s.shape[0], obj.chunk_tokens):
            sl = slice(a, a + obj.chunk_tokens)
            with torch.enable_grad():
                h = rows_s[sl].detach().requires_grad_(True)
                ce, kl = _chunk_sums(h, None if rows_t is None else rows_t[sl], targets[sl], head_s, head_t, obj)
                terms = [w * v for w, v in zip(scale, (ce, kl)) if w]  # a zero weight adds nothing, not even 0 * inf
                part = terms[0] if len(terms) == 1 else terms[0] + terms[1]
                (grad[sl],) = torch.autograd.grad(part, h)
            loss, ce_sum, kl_sum = loss + part.detach(), ce_sum + ce.detach(), kl_sum + kl.detach()
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(ce_sum, kl_sum)
        return loss, ce_sum, kl_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None, None, None


def _weights(obj: Objective) -> tuple[float, float]:
    """(weight of CE, weight of KL) in the loss."""
    return {"ce": (1.0, 0.0), "kd": (0.0, 1.0)}.get(obj.loss, (obj.ce_weight, 1.0))


def chunked_loss(h_s: torch.Tensor, h_t: torch.Tensor | None, labels: torch.Tensor, head_s, head_t,
                 obj: Objective, head_trains: bool = False) -> tuple[torch.Tensor, dict]:
    """Loss of final hidden states ``h_s`` (B, L, d) against next-token ``labels`` (B, L) and/or teacher states.

    Position p predicts token p + 1; positions whose next label is -100 carry no loss. Returns the
    loss (a mean over counted positions) and its parts as floats. ``head_trains``: the head has
    parameters that train (then it gets their gradient through checkpointed chunks; module docstring).
    """
    target = labels[:, 1:].reshape(-1)
    keep = (target != IGNORE).nonzero().squeeze(1)
    rows_s = h_s[:, :-1].reshape(-1, h_s.shape[-1]).index_select(0, keep)
    rows_t = None if h_t is None else h_t[:, :-1].reshape(-1, h_t.shape[-1]).index_select(0, keep.to(h_t.device))
    targets = target.index_select(0, keep)
    n = int(keep.numel())
    denom = max(n, 1)
    w_ce, w_kl = _weights(obj)
    grad = torch.is_grad_enabled() and rows_s.requires_grad
    if grad and not head_trains:
        loss, ce_sum, kl_sum = _FrozenHeadLoss.apply(rows_s, rows_t, targets, head_s, head_t, obj,
                                                     (w_ce / denom, w_kl / denom))
        return loss, {"ce": float(ce_sum / denom), "kd": float(kl_sum / denom), "tokens": n}
    ce_sum = kl_sum = h_s.new_zeros((), dtype=torch.float32)
    for a in range(0, n, obj.chunk_tokens):
        sl = slice(a, a + obj.chunk_tokens)
        args = (rows_s[sl], None if rows_t is None else rows_t[sl], targets[sl], head_s, head_t, obj)
        if grad:  # a training head: recompute this chunk's logits in backward instead of keeping every chunk's
            ce, kl = checkpoint(_chunk_sums, *args, use_reentrant=False)
        else:
            ce, kl = _chunk_sums(*args)
        ce_sum, kl_sum = ce_sum + ce, kl_sum + kl
    ce_mean, kl_mean = ce_sum / denom, kl_sum / denom
    loss = w_ce * ce_mean + w_kl * kl_mean if obj.loss == "kd+ce" else (ce_mean if obj.loss == "ce" else kl_mean)
    return loss, {"ce": float(ce_mean.detach()), "kd": float(kl_mean.detach()), "tokens": n}


# ------------------------------------------------------------------ model plumbing


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DDP


def _capped(head, config):
    """Gemma-style final logit softcapping, when the config has it."""
    cap = getattr(config, "final_logit_softcapping", None)
    return (lambda h: torch.tanh(head(h) / cap) * cap) if cap else head


def head_fn(model: nn.Module):
    """hidden -> logits exactly as the model computes them (output embedding, then softcap if any)."""
    inner = _unwrap(model)
    return _capped(inner.get_output_embeddings(), getattr(inner, "config", None))


def final_hidden(model: nn.Module, input_ids: torch.Tensor, check: bool = False) -> torch.Tensor:
    """Final (normed) hidden states (B, L, d), through ``model``'s own forward (so DDP hooks run).

    ``logits_to_keep=1`` keeps the full head matmul out of the forward pass. ``check`` verifies that
    the head applied to the returned states reproduces the model's own last logits, i.e. that this
    architecture's last hidden state is what its head consumes.
    """
    out = model(input_ids=input_ids, use_cache=False, output_hidden_states=True, logits_to_keep=1)
    h = out.hidden_states[-1]
    if check:
        with torch.no_grad():
            mine = head_fn(model)(h[:, -1:]).float()
            if not torch.allclose(mine, out.logits.float(), atol=1e-3 * (1 + out.logits.float().abs().max().item())):
                raise GiftQuantError(
                    f"{type(_unwrap(model)).__name__}: the last hidden state does not reproduce the model's logits, "
                    "so chunked losses cannot be computed for it; train with --loss ce is not affected, report this")
    return h


class Teacher:
    """The full-precision source model, frozen, on ``device``; gives final hidden states on another device."""

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype | None = None):
        self.device = torch.device(device)
        self.model = model.to(self.device, dtype=dtype).eval().requires_grad_(False)
        self._head = None

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in list(self.model.parameters()) + list(self.model.buffers()))

    def hidden(self, input_ids: torch.Tensor, to: torch.device) -> torch.Tensor:
        with torch.no_grad():
            return final_hidden(self.model, input_ids.to(self.device)).to(to)

    def head_for(self, student: nn.Module):
        """The head that turns teacher states into teacher logits on the student's device."""
        if self._head is None:
            s_head = _unwrap(student).get_output_embeddings()
            t_head = self.model.get_output_embeddings()
            s_w, t_w = s_head.weight.detach().cpu(), t_head.weight.detach().cpu()
            dev = s_head.weight.device.type
            # a bf16 teacher's head (training in bf16: recover/training.load_teacher) equal to the student's head
            # rounded to bf16 is the student's head as the autocast the loss runs in computes it
            lower = t_w.dtype != s_w.dtype and torch.is_autocast_enabled(dev) and (
                torch.get_autocast_dtype(dev) == t_w.dtype)
            same = s_w.shape == t_w.shape and (t_w.dtype == s_w.dtype or lower) and torch.equal(
                s_w.to(t_w.dtype), t_w)
            if same:
                self._head = head_fn(student)
            else:  # a head that differs (never ours: lm_head is not quantized) is copied to the student's device
                import copy

                moved = copy.deepcopy(t_head).to(s_head.weight.device, dtype=s_head.weight.dtype)
                self._head = _capped(moved, self.model.config)
        return self._head


def objective_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, obj: Objective,
                   teacher: Teacher | None = None, check: bool = False) -> tuple[torch.Tensor, dict]:
    """The training loss of one micro-batch (see module docstring); labels -100 are not counted."""
    if obj.needs_teacher and teacher is None:
        raise GiftQuantError(f"--loss {obj.loss} needs the full-precision teacher model; none was loaded")
    h_s = final_hidden(model, input_ids, check=check)
    h_t = teacher.hidden(input_ids, h_s.device).to(h_s.dtype) if obj.needs_teacher else None
    head_t = teacher.head_for(model) if obj.needs_teacher else None
    head_trains = any(p.requires_grad for p in _unwrap(model).get_output_embeddings().parameters())
    return chunked_loss(h_s, h_t, labels, head_fn(model), head_t, obj, head_trains)
