"""Block-by-block execution: capture each block's inputs, collect linear-input statistics, propagate.

Plumbing only (hooks, devices); the numerics live in stats/sensitivity/quant. The model stays on CPU
except the one block being processed. Every hook is registered inside a ``with`` block and removed
in ``finally``, so an exception (or a KeyboardInterrupt) never leaves a hook or a stub behind.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from .arch import block_linears

__all__ = ["capture_block_inputs", "collect_inputs", "move_kwargs", "run_block", "sequential_groups"]


class _StopForward(Exception):
    """Raised from a hook to end a forward pass early once everything needed was seen."""


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@contextlib.contextmanager
def _non_block_modules_on(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> Iterator[None]:
    """Move everything but the blocks (embeddings, rotary, norms, head) to ``device`` temporarily."""
    block_params = {id(p) for p in blocks.parameters()} | {id(b) for b in blocks.buffers()}
    moved = []
    for mod in model.modules():
        for name, t in list(mod._parameters.items()) + list(mod._buffers.items()):
            if t is not None and id(t) not in block_params and t.device != device:
                moved.append((mod, name, t.device))
    for mod, name, _ in moved:
        _move_tensor(mod, name, device)
    try:
        yield
    finally:
        for mod, name, dev in moved:
            _move_tensor(mod, name, dev)


def _move_tensor(mod: nn.Module, name: str, device) -> None:
    if name in mod._parameters:
        p = mod._parameters[name]
        p.data = p.data.to(device)
    else:
        mod._buffers[name] = mod._buffers[name].to(device)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, windows: torch.Tensor,
                         device: torch.device, batch_size: int = 1) -> tuple[list[torch.Tensor], list[dict]]:
    """Hidden states entering block 0 (one (B, L, d) tensor per batch of windows) and each block's kwargs.

    Batches are equal-sized (B is the largest divisor of the window count not above ``batch_size``),
    so the recorded masks and position embeddings fit every batch.

    Every block's forward is replaced by a stub that records its keyword arguments (attention mask,
    position embeddings ...: they can differ per block, e.g. Gemma's sliding-window layers) and passes
    the hidden states through, so no block weights are needed; the last stub stops the pass.
    """
    inputs: list[torch.Tensor] = []
    block_kwargs: list[dict] = [None] * len(blocks)  # type: ignore[list-item]
    n_blocks = len(blocks)

    def make_stub(i: int) -> Callable:
        def stub(*args, **kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if i == 0:
                inputs.append(hidden.detach())
            if block_kwargs[i] is None:
                block_kwargs[i] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            if i == n_blocks - 1:
                raise _StopForward
            return hidden
        return stub

    for i, b in enumerate(blocks):
        b.forward = make_stub(i)
    try:
        with _non_block_modules_on(model, blocks, device):
            b = _equal_batch_size(len(windows), batch_size)
            for start in range(0, len(windows), b):
                try:
                    model(input_ids=windows[start:start + b].to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        for b in blocks:
            del b.forward  # restores the class's forward
    return inputs, block_kwargs


def _equal_batch_size(n: int, requested: int) -> int:
    return max(d for d in range(1, max(1, min(n, requested)) + 1) if n % d == 0)


@torch.no_grad()
def run_block(block: nn.Module, inputs: list[torch.Tensor], kwargs: dict) -> list[torch.Tensor]:
    """The block's outputs for each input (the block must already be on the inputs' device)."""
    return [_first(block(h, **kwargs)).detach() for h in inputs]


def sequential_groups(block: nn.Module, sample: torch.Tensor, kwargs: dict) -> list[list[str]]:
    """Linears of a block in true-sequential order, grouped by shared input.

    Found by running the block once: linears called on the same input tensor (q, k, v; gate, up)
    form one group; groups are ordered by first call. Linears never called are appended last.
    """
    linears = block_linears(block)
    # keep the input tensors alive: comparing ids of freed tensors could merge unrelated groups
    calls: list[tuple[str, torch.Tensor]] = []

    def make_hook(name):
        def hook(_mod, args):
            calls.append((name, args[0]))
        return hook

    with contextlib.ExitStack() as stack:
        for name, lin in linears.items():
            stack.callback(lin.register_forward_pre_hook(make_hook(name)).remove)
        with torch.no_grad():
            block(sample, **kwargs)
    groups: list[list[str]] = []
    last_input = None
    seen: set[str] = set()
    for name, x in calls:
        if name in seen:
            continue
        seen.add(name)
        if groups and x is last_input:
            groups[-1].append(name)
        else:
            groups.append([name])
            last_input = x
    groups.extend([n] for n in linears if n not in seen)
    return groups


@torch.no_grad()
def collect_inputs(block: nn.Module, names: list[str], inputs: list[torch.Tensor], kwargs: dict,
                   on_input: Callable[[str, torch.Tensor], None]) -> None:
    """Run the block on each input and call ``on_input(name, x)`` with each named linear's input.

    The pass stops as soon as every named linear has been seen for a sample, so early groups (q/k/v)
    cost a fraction of a block forward.
    """
    linears = block_linears(block)
    seen: set[str] = set()

    def make_hook(name):
        def hook(_mod, args):
            on_input(name, args[0].detach())
            seen.add(name)
            if len(seen) == len(names):
                raise _StopForward
        return hook

    with contextlib.ExitStack() as stack:
        for name in names:
            stack.callback(linears[name].register_forward_pre_hook(make_hook(name)).remove)
        for h in inputs:
            seen.clear()
            try:
                block(h, **kwargs)
            except _StopForward:
                pass


def move_kwargs(kwargs: dict, device) -> dict:
    return _to(kwargs, device)
