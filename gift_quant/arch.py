"""Find the decoder blocks and their linear layers in any Hugging Face decoder-only model.

No per-model tables: the blocks are the ``nn.ModuleList`` whose length equals the config's number of
hidden layers and whose entries contain ``nn.Linear`` modules; the targets are every ``nn.Linear``
inside a block (q/k/v/o, gate/up/down, fused qkv or gate_up, GPT-NeoX's query_key_value ...).
Embeddings, norms and the LM head live outside the blocks and are never quantized or trained.
"""

from __future__ import annotations

import torch.nn as nn

from .errors import GiftQuantError


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, ModuleList) of the decoder blocks."""
    cfg = getattr(model, "config", None)
    text_cfg = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
    n_layers = getattr(text_cfg, "num_hidden_layers", None)
    candidates = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and any(
            isinstance(m, nn.Linear) for m in mod[0].modules()
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
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}
