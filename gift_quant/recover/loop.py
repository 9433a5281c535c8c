"""The training loop for salient columns: AdamW, cosine schedule, accumulation, resume, accelerate.

Data-parallel through accelerate (``accelerate launch`` / ``torchrun``): the global batch of step s
is a fixed, seeded slice of the training windows, split into contiguous per-rank micro-batches, so
N processes reproduce one process with the same global batch. Noise is keyed by (step, global
micro-batch index), never by process state, for the same reason and for exact resume.

State (trainable tensors, optimizer, scheduler, step, RNG) is saved every ``save_every`` steps into
``state_dir`` atomically; ``train`` resumes from it when present. Metrics go to ``metrics.jsonl``.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..config.settings import RecoverConfig
from ..util.cpu_policy import apply_for_training
from ..util.errors import GiftQuantError, writing
from ..util.files import atomic_dir, atomic_write_text, sha256_file
from ..util.precision import autocast, resolve_precision, say_precision
from ..util.seeds import derive_seed
from ..util.threads import cpu_threads
from .caches import plan_caches, release_caches
from .lanes import Lanes
from .model import set_noise_key, trainable_state
from .noise_schedule import set_noise_progress
from .objective import Objective, Teacher, objective_loss
from .scaled_layer import param_groups

__all__ = ["STATE_MANIFEST", "eval_loss", "state_problem", "step_rows", "token_loss", "train", "warmup_cosine_schedule"]


def warmup_cosine_schedule(optimizer, total_steps: int, warmup_ratio: float):
    """Linear warm-up then cosine decay to 0; step s of W warm-up steps runs at (s + 1) / (W + 1) of the lr.

    transformers' schedule starts at exactly 0, which spends the whole first optimizer step doing
    nothing -- a visible share of a 30-step CPU budget.
    """
    warmup = math.ceil(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _objective_of(settings: RecoverConfig) -> Objective:
    return Objective(loss=settings.loss, temperature=settings.kd_temperature, ce_weight=settings.ce_weight)


def token_loss(model, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over unmasked labels (chunked over the vocabulary), and their count."""
    loss, parts = objective_loss(model, input_ids, labels, Objective("ce"))
    return loss, parts["tokens"]


@torch.no_grad()
def eval_loss(model, windows: torch.Tensor, labels: torch.Tensor, device, batch_size: int = 4) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        ids, lab = windows[i:i + batch_size].to(device), labels[i:i + batch_size].to(device)
        loss, n = token_loss(model, ids, lab)
        total += float(loss) * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


def step_rows(step: int, global_batch: int, n_windows: int, seed: int) -> torch.Tensor:
    """Window indices of the global batch of ``step``: consecutive slices of seeded epoch permutations."""
    start = step * global_batch
    rows = []
    while len(rows) < global_batch:
        epoch, offset = divmod(start + len(rows), n_windows)
        perm = torch.randperm(n_windows, generator=torch.Generator().manual_seed(derive_seed(seed, "shuffle", epoch)))
        take = min(global_batch - len(rows), n_windows - offset)
        rows.extend(perm[offset:offset + take].tolist())
    return torch.tensor(rows)


STATE_MANIFEST = "sha256.json"  # written last inside the state folder: the sha256 of every other file in it


def _save_state(state_dir: Path, model, optimizer, scheduler, step: int, extra: dict) -> None:
    trainable = trainable_state(model)
    need = 3 * sum(t.numel() * t.element_size() for t in trainable.values())  # weights + AdamW's two moments
    with atomic_dir(state_dir, need_bytes=need) as tmp:
        save_file(trainable, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
        torch.save({"cpu": torch.get_rng_state()}, tmp / "rng.pt")
        (tmp / "step.json").write_text(json.dumps({"step": step, **extra}))
        digests = {f.name: sha256_file(f) for f in sorted(tmp.iterdir())}
        (tmp / STATE_MANIFEST).write_text(json.dumps(digests, indent=1))


def state_problem(state_dir: Path) -> str | None:
    """Why the saved training state cannot be trusted (a file truncated, changed, missing), or None."""
    try:
        digests = json.loads((state_dir / STATE_MANIFEST).read_text())
    except (OSError, ValueError):
        return f"{state_dir / STATE_MANIFEST} is missing or damaged"
    if not isinstance(digests, dict) or "step.json" not in digests:
        return f"{state_dir / STATE_MANIFEST} is damaged"
    for name, digest in digests.items():
        f = state_dir / str(name)
        if not f.is_file():
            return f"{f} is missing"
        if sha256_file(f) != digest:
            return f"{f} does not match the sha256 recorded when it was written (truncated or changed)"
    return None


def _load_state(state_dir: Path, model, optimizer, scheduler) -> tuple[int, dict]:
    tensors = load_file(str(state_dir / "trainable.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)
    # our own file, written by _save_state; weights_only keeps it from executing anything
    optimizer.load_state_dict(torch.load(state_dir / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(json.loads((state_dir / "scheduler.json").read_text()))
    torch.set_rng_state(torch.load(state_dir / "rng.pt", weights_only=True)["cpu"])
    meta = json.loads((state_dir / "step.json").read_text())
    return int(meta["step"]), meta


def _logged_step(line: str) -> int | None:
    """The step of a metrics.jsonl line; None for a blank or torn one (a write cut off by a crash)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _accelerator(device):
    from accelerate import Accelerator, DistributedType

    dev = torch.device(device)
    # mixed precision is ours (--precision, util/precision.py), not accelerate's: its autocast would wrap the
    # model's forward only, and not the teacher's, the loss's head, or the forward passes of lanes' threads
    accelerator = Accelerator(cpu=dev.type == "cpu", mixed_precision="no")
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        # The frozen base lives in buffers (uint8 codes or a dense copy), which FSDP and ZeRO replicate
        # rather than shard, and the gift_ parameters are a few percent of the model: sharding would
        # save little while breaking the plain-tensor state saving below. Not supported until tested.
        raise GiftQuantError(
            f"gift-quant recover does not support {accelerator.distributed_type.value}: launch data-parallel "
            "instead (`torchrun --nproc_per_node N` or `accelerate launch` without --use_fsdp/--use_deepspeed); "
            "the frozen quantized base is replicated on every GPU either way")
    return accelerator


class _Loop:
    """One training run's state: the accelerator, optimizer, schedule, objective and where it logs."""

    def __init__(self, model, settings: RecoverConfig, run_dir: Path, device, teacher: Teacher | None):
        self.accelerator = accel = _accelerator(device)
        self.world, self.rank = accel.num_processes, accel.process_index
        self.settings, self.teacher, self.model = settings, teacher, model
        self.global_batch = settings.batch_size * settings.grad_accum * self.world
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir, self.metrics_path = run_dir / "state", run_dir / "metrics.jsonl"
        torch.manual_seed(derive_seed(settings.seed, "torch-global"))
        self.precision = resolve_precision(settings.precision, accel.device)
        if self.rank == 0:
            say_precision(self.precision)
        self.lanes = None
        line = f"gift-quant: training data-parallel in {self.world} processes" if self.world > 1 else None
        if accel.device.type == "cpu" and self.world == 1:  # lanes and threads: the result does not depend on them
            lanes = min(settings.cpu_lanes, settings.batch_size)
            workers, line = apply_for_training(lanes)
            self.lanes = Lanes(lanes, workers) if lanes > 1 else None
        if line and self.rank == 0:
            print(line, file=sys.stderr, flush=True)
        model.to(accel.device)
        if settings.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("no trainable gift_ parameters: the model has no salient columns (K = 0)")
        groups = param_groups(model, settings.lr, settings.scales_lr)  # scale multipliers at their own lr
        self.optimizer = torch.optim.AdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay)
        self.scheduler = warmup_cosine_schedule(self.optimizer, settings.steps, settings.warmup_ratio)
        self.objective = _objective_of(settings)
        if self.objective.needs_teacher and teacher is None:
            raise GiftQuantError(f"--loss {settings.loss} needs the full-precision teacher; none was given")
        self.start, self.history = self._resume()
        # Only the model goes through accelerate (device placement, DDP). Accumulation, clipping and the
        # scheduler are explicit: accelerate's scheduler wrapper steps once per process under DDP, which
        # would make N processes diverge from one.
        self.wrapped = accel.prepare(model)
        self.caches_planned = False  # after the first step (_plan_caches)
        if self.rank == 0 and self.metrics_path.exists():  # drop lines logged after the state we resume from
            lines = self.metrics_path.read_text().splitlines()
            kept = [ln for ln in lines if (s := _logged_step(ln)) is not None and s <= self.start]
            atomic_write_text(self.metrics_path, "".join(k + "\n" for k in kept))  # a kill must not lose lines

    def _plan_caches(self) -> None:
        """The speed caches, sized once the first step has run: the memory its activations took is in use then.

        After every move of the model (a move drops them), where it trains; the result is the same with them.
        """
        self.caches_planned = True
        plan = plan_caches(self.model, self.settings.cache_mb, self.accelerator.device)
        if plan is not None and self.rank == 0:
            print(plan.line(), file=sys.stderr, flush=True)

    def _resume(self) -> tuple[int, list]:
        if not (self.state_dir / "step.json").is_file():
            return 0, []
        # run/ is a cache (packed/run_folder.py): a state that fails its check is discarded and training starts over,
        # which ends in the model an uninterrupted run trains; loading it would give a different one
        why = state_problem(self.state_dir)
        if why is not None:
            print(f"gift-quant: warning: {why}; discarding the saved training state and training from step 0",
                  file=sys.stderr, flush=True)
            if self.rank == 0:
                shutil.rmtree(self.state_dir, ignore_errors=True)
            return 0, []
        start, meta = _load_state(self.state_dir, self.model, self.optimizer, self.scheduler)
        if meta.get("global_batch", self.global_batch) != self.global_batch:
            raise GiftQuantError(
                f"{self.state_dir} was saved by {meta.get('world_size')} process(es) with a global batch of "
                f"{meta['global_batch']} windows; this run has {self.world} process(es) and {self.global_batch}: "
                "resume with the same number of processes, or use a new --out")
        return start, meta.get("history", [])

    def step(self, step: int, windows: torch.Tensor, labels: torch.Tensor) -> dict:
        """One optimizer step over this rank's share of the global batch; returns its metrics record."""
        accel, settings, micro = self.accelerator, self.settings, self.settings.grad_accum
        t0 = time.perf_counter()
        rows = step_rows(step, self.global_batch, len(windows), settings.seed)
        per_rank = settings.batch_size * micro
        local = rows[self.rank * per_rank:(self.rank + 1) * per_rank]
        step_loss, step_tokens, parts = 0.0, 0, {"ce": 0.0, "kd": 0.0}
        set_noise_progress(self.model, step, settings.steps)  # --noise-schedule: a pure function of the step
        for a in range(micro):
            mb = local[a * settings.batch_size:(a + 1) * settings.batch_size]
            set_noise_key(self.model, step * micro * self.world + self.rank * micro + a)
            sync = contextlib.nullcontext() if a == micro - 1 or self.world == 1 else accel.no_sync(self.wrapped)
            check = step == self.start and a == 0
            if self.lanes is not None:  # one process on a CPU: the micro-batch's parts in parallel threads
                loss, got = self.lanes.backward(self.wrapped, windows[mb], labels[mb], self.objective, self.teacher,
                                                self.params, 1.0 / micro, check, self.precision)
            else:
                with sync:
                    with autocast(self.precision, accel.device):  # forward and loss; backward outside, as torch advises
                        loss, got = objective_loss(self.wrapped, windows[mb].to(accel.device),
                                                   labels[mb].to(accel.device), self.objective, self.teacher,
                                                   check=check)
                    accel.backward(loss / micro)
                loss = float(loss.detach())
            step_loss += loss / micro
            for k in parts:
                parts[k] += got[k] / micro
            step_tokens += int(windows[mb].numel())
        # one thread: a norm is a reduction whose rounding depends on how threads split it, and the
        # clipped step must not depend on the thread count (a resumed run may get another one)
        with cpu_threads(1, accel.device.type == "cpu"):
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, settings.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if not self.caches_planned:
            self._plan_caches()
        set_noise_key(self.model, None)
        step_loss = float(accel.reduce(torch.tensor(step_loss, device=accel.device), "mean"))
        return {"step": step + 1, "loss": step_loss, "ce": parts["ce"], "lr": self.scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm), "tokens_per_s": step_tokens * self.world / (time.perf_counter() - t0)}

    def log_and_save(self, record: dict) -> None:
        self.history.append({k: record[k] for k in ("step", "loss") if k in record})
        if self.rank == 0:
            with writing(self.metrics_path), open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        done = record["step"]
        if done % self.settings.save_every == 0 or done == self.settings.steps:
            self.accelerator.wait_for_everyone()
            if self.rank == 0:
                _save_state(self.state_dir, self.model, self.optimizer, self.scheduler, done,
                            {"history": self.history, "global_batch": self.global_batch, "world_size": self.world})
            self.accelerator.wait_for_everyone()


def train(model, windows: torch.Tensor, labels: torch.Tensor, settings: RecoverConfig, run_dir: Path,
          eval_windows: torch.Tensor | None = None, eval_labels: torch.Tensor | None = None,
          device: torch.device | str = "cpu", progress: bool = True, teacher: Teacher | None = None) -> dict:
    """Train the trainable parameters of ``model`` in place with ``settings.loss``; returns a summary.

    ``teacher`` (the full-precision model) is needed by the ``kd`` and ``kd+ce`` objectives.
    """
    loop = _Loop(model, settings, run_dir, device, teacher)
    last_eval = None
    bar = tqdm(range(loop.start, settings.steps), initial=loop.start, total=settings.steps, desc="recover",
               unit="step", disable=not progress or loop.rank != 0)
    for step in bar:
        record = loop.step(step, windows, labels)
        if eval_windows is not None and settings.eval_every and ((step + 1) % settings.eval_every == 0
                                                                or step + 1 == settings.steps):
            record["eval_loss"] = last_eval = eval_loss(model, eval_windows, eval_labels, loop.accelerator.device)
        loop.log_and_save(record)
        shown = {"loss": f"{record['loss']:.4f}", "tok_s": f"{record['tokens_per_s']:.0f}"}
        if last_eval is not None:
            shown["held_out"] = f"{last_eval:.4f}"
        bar.set_postfix(shown)
    model.eval()
    release_caches(model)
    if loop.lanes is not None:
        loop.lanes.close()
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    return {"steps": settings.steps, "resumed_from": loop.start, "history": loop.history, "world_size": loop.world}
