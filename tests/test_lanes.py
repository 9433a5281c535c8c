"""Lanes (recover/lanes.py): a micro-batch's parts trained in parallel threads give the micro-batch's loss and
gradient (against the float64 oracle of tests/test_objective.py, masked positions making the lanes' token
counts unequal), the same bits with one worker or two, and nothing but the gift_ gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from test_objective import _grads, _oracle, _pair

from gift_quant.recover.lanes import Lanes
from gift_quant.recover.objective import Objective, Teacher


def _lane_grads(student, teacher, ids, labels, obj, workers):
    student.zero_grad()
    params = [p for p in student.parameters() if p.requires_grad]
    lanes = Lanes(2, workers)
    try:
        loss, parts = lanes.backward(student, ids, labels, obj, Teacher(teacher, "cpu"), params, 1.0, check=True)
    finally:
        lanes.close()
    return loss, parts, _grads(student)


@pytest.mark.parametrize("loss", ["kd", "kd+ce", "ce"])
def test_lanes_give_the_micro_batch_gradient(loss):
    student, teacher = _pair(seed=7)
    ids = torch.randint(0, 300, (5, 12), generator=torch.Generator().manual_seed(8))  # lanes of 3 and 2 windows
    labels = ids.clone()
    labels[0, :7] = -100  # masked prompts: the lanes count different numbers of tokens
    labels[4, :3] = -100
    obj = Objective(loss, temperature=1.0, ce_weight=0.7, chunk_tokens=9)
    got, parts, one = _lane_grads(student, teacher, ids, labels, obj, workers=1)
    _, _, two = _lane_grads(student, teacher, ids, labels, obj, workers=2)
    assert all(torch.equal(one[n], two[n]) for n in one)  # how many run at once changes nothing
    student_64 = copy.deepcopy(student).double()
    want = _oracle(student_64, copy.deepcopy(teacher).double(), ids, labels, obj)
    want.backward()
    ref = _grads(student_64)
    assert abs(got - want.item()) <= 1e-5 * max(1.0, abs(want.item()))
    for n in ref:
        scale = ref[n].abs().max().item()
        assert (one[n].double() - ref[n]).abs().max().item() <= 1e-4 * max(scale, 1e-8), n
    assert set(one) == {n for n, p in student.named_parameters() if p.requires_grad}
