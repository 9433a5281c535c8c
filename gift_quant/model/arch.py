"""Find the decoder blocks and their linear layers in any Hugging Face decoder-only model.

No per-model tables: the blocks are the ``nn.ModuleList`` whose length equals the config's number of
hidden layers and whose entries contain ``nn.Linear`` modules; the targets are every ``nn.Linear``
inside a block (q/k/v/o, gate/up/down, fused qkv or gate_up, GPT-NeoX's query_key_value ...).
Embeddings, norms and the LM head live outside the blocks and are never quantized or trained.
"""

from __future__ import annotations

from torch import nn

from ..util.errors import GiftQuantError

__all__ = ["block_linears", "find_blocks", "is_linear", "model_linears", "set_module"]


def is_linear(m: nn.Module) -> bool:
    """nn.Linear, or one of gift-quant's replacements for it (QuantLinear, SalientLinear)."""
    return isinstance(m, nn.Linear) or getattr(m, "is_gift_linear", False)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, ModuleList) of the decoder blocks."""
    cfg = getattr(model, "config", None)
    text_cfg = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
    n_layers = getattr(text_cfg, "num_hidden_layers", None)
    candidates = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and any(
            is_linear(m) for m in mod[0].modules()
        ):
            candidates.append((name, mod))
    exact = [c for c in candidates if n_layers is None or len(c[1]) == n_layers]
    if not exact:
        raise GiftQuantError(
            f"could not find the decoder blocks of {type(model).__name__}: no ModuleList of "
            f"{n_layers} layers containing nn.Linear modules; is this a decoder-only causal LM?")
    # the outermost list of blocks (nested lists would be inside blocks, e.g. MoE experts)
    return min(exact, key=lambda c: c[0].count("."))


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The block's linear layers by name relative to the block, in registration order."""
    found = {}
    for name, m in block.named_modules():
        # a gift linear may wrap an nn.Linear: do not descend into it
        if is_linear(m) and not any(name.startswith(f"{p}.") for p in found):
            found[name] = m
    return found


def model_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> linear for every linear inside the decoder blocks, block by block."""
    prefix, blocks = find_blocks(model)
    return {f"{prefix}.{i}.{n}": m for i, b in enumerate(blocks) for n, m in block_linears(b).items()}


def set_module(root: nn.Module, dotted: str, new: nn.Module) -> None:
    """Replace the submodule at ``dotted`` (relative to ``root``) by ``new``."""
    parent, _, child = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)
