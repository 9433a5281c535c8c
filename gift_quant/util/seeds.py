"""One seed derivation: every random stream of a run is keyed by the run's seed and a path naming its purpose.

A stream's seed is ``derive_seed(seed, purpose, *path)``: a stable 63-bit hash (blake2b) of the key, so

* streams are independent: the training shuffle of epoch 1, the noise of layer 3 at step 7 and the
  training-text windows of source 2 come from unrelated seeds, whatever the run seed. Arithmetic
  formulas (``seed * 7_777 + epoch``) do not give that: seed 0 at epoch 7_777 and seed 1 at epoch 0
  share a stream, and two purposes using similar formulas can share one too;
* nothing collides by accident: distinct keys give distinct seeds except with probability about
  ``n**2 / 2**64`` among ``n`` keys (below 1e-7 for a million streams);
* the value is the same in every process, on every machine and in every run (unlike ``hash()``, which
  Python randomizes per process), so data-parallel ranks, resumed runs and reruns draw the same numbers;
* it lies in ``0 .. 2**63 - 1``: valid for ``torch.manual_seed``, ``torch.Generator.manual_seed`` and
  ``random.Random``.

The purpose is a short string ("noise", "shuffle", "block-order", ...); the rest of the path holds the
integers (block, layer, step, source index) or strings (a split name) that tell streams of one purpose
apart. A derived seed may itself be the root of further streams (a layer's seed -> its per-step noise).
Quantization's calibration draw is the one stream seeded with the plain run seed, so that a quantized
checkpoint stays the same for the same seed across releases.
"""

from __future__ import annotations

import hashlib

__all__ = ["SEED_BITS", "derive_seed"]

SEED_BITS = 63  # torch seeds are 64-bit; one bit fewer keeps the value a non-negative signed integer too


def derive_seed(seed: int, purpose: str, *path: int | str) -> int:
    """The seed of the stream ``(seed, purpose, *path)``, in ``0 .. 2**SEED_BITS - 1``; pure and stable."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if not isinstance(purpose, str) or not purpose:
        raise TypeError(f"purpose must be a non-empty string, got {purpose!r}")
    for part in path:
        if isinstance(part, bool) or not isinstance(part, (int, str)):
            raise TypeError(f"seed path parts must be ints or strings, got {part!r}")
    # repr of a tuple of plain ints and strings is unambiguous (1 vs '1', ('a,b',) vs ('a', 'b'));
    # int() turns int subclasses (IntEnum) into their plain value first
    key = (int(seed), purpose, *(p if isinstance(p, str) else int(p) for p in path))
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8, person=b"gift-quant-seed").digest()
    return int.from_bytes(digest, "big") >> (64 - SEED_BITS)
