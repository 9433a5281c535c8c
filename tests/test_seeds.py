"""util/seeds.derive_seed: one derivation for every random stream, distinct per key, stable across processes."""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import sys

import pytest
import torch

from gift_quant.config.settings import MAX_SEED
from gift_quant.util.seeds import SEED_BITS, derive_seed

# the keys the training code derives (recover/model, blockwise, layer, loop, training; compare/peft)
PURPOSES = ["layer-noise", "block-noise", "block-order", "pass-noise", "fresh-noise", "shuffle", "torch-global",
            "train-windows", "held-out-windows", "eval-windows", "lora-init"]


def _keys():
    for seed in (0, 1, 2, 7_777, 7_919, 100_003):
        for purpose in PURPOSES:
            yield (seed, purpose)
            for a in range(40):
                yield (seed, purpose, a)
            for a, b in itertools.product(range(12), range(8)):
                yield (seed, purpose, a, b)
        yield (seed, "eval-windows", "validation")
        yield (seed, "eval-windows", "test")


def test_distinct_keys_give_distinct_seeds_in_range():
    keys = list(_keys())
    seeds = [derive_seed(*k) for k in keys]
    assert len(set(keys)) == len(keys)
    assert len(set(seeds)) == len(seeds), "two keys share a stream"
    assert all(0 <= s < 2**SEED_BITS for s in seeds)
    assert 2**SEED_BITS - 1 <= MAX_SEED  # a derived seed is a valid --seed too


def test_the_old_arithmetic_formulas_collisions_are_gone():
    # seed * 7_777 + epoch (the training shuffle) gave seed 1 / epoch 0 the stream of seed 0 / epoch 7_777;
    # (seed * 1_009 + block) * 100_003 + layer (the block stage's noise) gave seed 1 / block 0 the one of seed 0 /
    # block 1_009; seed * 100_003 + i (a layer's noise) gave seed 1 / layer 0 the one of seed 0 / layer 100_003
    assert 1 * 7_777 + 0 == 0 * 7_777 + 7_777
    assert derive_seed(1, "shuffle", 0) != derive_seed(0, "shuffle", 7_777)
    assert (1 * 1_009 + 0) * 100_003 == (0 * 1_009 + 1_009) * 100_003
    assert derive_seed(1, "block-noise", 0, 0) != derive_seed(0, "block-noise", 1_009, 0)
    assert derive_seed(1, "layer-noise", 0) != derive_seed(0, "layer-noise", 100_003)
    # the same numbers under different purposes, and ints against their decimal strings, are different streams
    assert derive_seed(0, "shuffle", 3) != derive_seed(0, "block-order", 3)
    assert derive_seed(0, "x", 1) != derive_seed(0, "x", "1")
    assert derive_seed(0, "x", 1, 2) != derive_seed(0, "x", 12) != derive_seed(0, "x", "1, 2")


def test_deterministic_across_processes():
    """The same key gives the same seed in fresh interpreters with different hash randomization."""
    code = ("from gift_quant.util.seeds import derive_seed; "
            "print(derive_seed(3, 'pass-noise', 17), derive_seed(2**63 - 1, 'eval-windows', 'test'))")
    here = str(derive_seed(3, "pass-noise", 17)) + " " + str(derive_seed(2**63 - 1, "eval-windows", "test"))
    for hash_seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == here


def test_seeds_are_accepted_by_torch_and_random():
    for key in [(0, "shuffle", 0), (MAX_SEED, "lora-init"), (5, "pass-noise", 10**12)]:
        s = derive_seed(*key)
        a = torch.randperm(9, generator=torch.Generator().manual_seed(s))
        b = torch.randperm(9, generator=torch.Generator().manual_seed(s))
        assert torch.equal(a, b)  # the stream the seed names is reproducible
        assert random.Random(s).random() == random.Random(s).random()


@pytest.mark.parametrize("bad", [(0, ""), (0, 3), (0.5, "noise"), (True, "noise"), (0, "noise", 1.0),
                                 (0, "noise", None), (0, "noise", False)])
def test_bad_keys_are_refused(bad):
    with pytest.raises(TypeError):
        derive_seed(*bad)
