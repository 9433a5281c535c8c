"""Recovery objectives: KD against a float64 oracle, zero at student == teacher, chunking invariance, CE."""

import copy

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_config
from transformers import AutoModelForCausalLM

from gift_quant.config.settings import NoiseSpec, RecoverConfig
from gift_quant.recover.loop import warmup_cosine_schedule
from gift_quant.recover.model import prepare_dense
from gift_quant.recover.objective import Objective, Teacher, objective_loss


def _pair(arch="llama", seed=0, perturb=0.05):
    """(student with trainable salient columns, teacher): the student's salient columns are perturbed."""
    torch.manual_seed(seed)
    teacher = AutoModelForCausalLM.from_config(tiny_config(arch)).eval()
    student = copy.deepcopy(teacher)
    salient = {}
    for name, mod in student.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            salient[name] = torch.arange(0, mod.in_features, 5)
    prepare_dense(student, salient, noise=NoiseSpec("none"), seed=seed)
    with torch.no_grad():
        for p in student.parameters():
            if p.requires_grad:
                p.add_(perturb * torch.randn_like(p))
    return student, teacher


def _oracle(student, teacher, ids, labels, obj):
    """Full logits in float64, no chunking: the definition of the loss."""
    s = student(input_ids=ids).logits[:, :-1].double()
    with torch.no_grad():
        t = teacher(input_ids=ids).logits[:, :-1].double()
    target = labels[:, 1:]
    keep = target != -100
    T = obj.temperature
    s_logp = F.log_softmax(s / T, -1)[keep]
    t_logp = F.log_softmax(t / T, -1)[keep]
    kd = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean() * T**2
    ce = F.cross_entropy(s[keep], target[keep])
    return {"kd": kd, "ce": ce, "kd+ce": kd + obj.ce_weight * ce}[obj.loss]


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("loss,temperature", [("kd", 1.0), ("kd", 2.0), ("kd+ce", 1.0), ("ce", 1.0)])
def test_loss_and_gradients_match_float64_oracle(loss, temperature):
    student, teacher = _pair()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 300, (2, 12), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100  # a masked prompt: those positions carry no loss
    obj = Objective(loss=loss, temperature=temperature, ce_weight=0.7, chunk_tokens=5)  # several chunks
    got, parts = objective_loss(student, ids, labels, obj, Teacher(teacher, "cpu"), check=True)
    got.backward()
    mine = _grads(student)
    student.zero_grad()
    student_64 = copy.deepcopy(student).double()
    want = _oracle(student_64, copy.deepcopy(teacher).double(), ids, labels, obj)
    want.backward()
    ref = _grads(student_64)
    assert parts["tokens"] == int((labels[:, 1:] != -100).sum())
    assert abs(got.item() - want.item()) <= 1e-5 * max(1.0, abs(want.item()))
    for n in ref:
        scale = ref[n].abs().max().item()
        assert (mine[n].double() - ref[n]).abs().max().item() <= 1e-4 * max(scale, 1e-8), n


def test_kd_is_zero_with_zero_gradient_when_student_equals_teacher():
    student, teacher = _pair(perturb=0.0)
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(2))
    loss, _ = objective_loss(student, ids, ids.clone(), Objective("kd"), Teacher(teacher, "cpu"))
    loss.backward()
    assert abs(float(loss)) < 1e-6
    assert all(g.abs().max().item() < 1e-6 for g in _grads(student).values())


def test_chunk_size_does_not_change_loss_or_gradients():
    student, teacher = _pair(seed=3)
    ids = torch.randint(0, 300, (3, 9), generator=torch.Generator().manual_seed(3))
    results = []
    for chunk in (1, 7, 10_000):
        student.zero_grad()
        obj = Objective("kd+ce", chunk_tokens=chunk)
        loss, _ = objective_loss(student, ids, ids.clone(), obj, Teacher(teacher, "cpu"))
        loss.backward()
        results.append((float(loss), _grads(student)))
    for loss, grads in results[1:]:
        assert abs(loss - results[0][0]) < 1e-5
        for n, g in grads.items():
            assert torch.allclose(g, results[0][1][n], atol=1e-6, rtol=1e-4)


def test_gemma2_softcapped_logits_are_reproduced():
    # final_logit_softcapping: the chunked head must apply it like the model does (checked by check=True)
    student, teacher = _pair("gemma2", perturb=0.0)
    ids = torch.randint(0, 300, (1, 8), generator=torch.Generator().manual_seed(4))
    loss, _ = objective_loss(student, ids, ids.clone(), Objective("kd"), Teacher(teacher, "cpu"), check=True)
    assert abs(float(loss)) < 1e-6


def test_kd_needs_a_teacher():
    student, _ = _pair()
    with pytest.raises(Exception, match="teacher"):
        objective_loss(student, torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long),
                       Objective("kd"))


def test_warmup_never_spends_a_step_at_lr_zero():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = warmup_cosine_schedule(opt, total_steps=30, warmup_ratio=0.1)  # 3 warm-up steps
    lrs = []
    for _ in range(30):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.25) and lrs[0] > 0
    assert lrs[:4] == sorted(lrs[:4]) and lrs[3] == pytest.approx(1.0)
    assert lrs[-1] < 0.01 and all(a >= b for a, b in zip(lrs[3:], lrs[4:]))


def test_recover_settings_are_validated():
    with pytest.raises(Exception, match="loss"):
        RecoverConfig(loss="mse")
    with pytest.raises(Exception, match="nothing to train"):
        RecoverConfig(steps=0, blockwise_steps=0)
    assert RecoverConfig(steps=0, blockwise_steps=5).blockwise_steps == 5


@pytest.mark.parametrize("loss,per_chunk", [("kd", 3), ("kd+ce", 3), ("ce", 2)])
def test_head_runs_the_fewest_times(loss, per_chunk):
    """Per chunk: the student's head, the teacher's head (distillation) and the gradient's matmul, nothing
    recomputed in backward; the log-softmaxes once each. Counted at the dispatcher, whatever calls them."""
    from torch.utils._python_dispatch import TorchDispatchMode

    student, teacher = _pair(seed=5)
    vocab = student.get_output_embeddings().weight.shape[0]
    counts = {"head": 0, "log_softmax": 0}
    ids = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(6))

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            mats = [a for a in args if isinstance(a, torch.Tensor) and a.dim() == 2]
            # a vocabulary-sized matmul over more rows than the batch: the model's own forward also runs the
            # head on each sequence's last position (logits_to_keep=1), one row per sequence, not counted
            if name in ("mm", "addmm") and any(vocab in m.shape for m in mats) and mats[-2].shape[0] > len(ids):
                counts["head"] += 1
            if name == "_log_softmax":
                counts["log_softmax"] += 1
            return out

    obj = Objective(loss, chunk_tokens=8)  # 20 positions: 3 chunks
    tch = Teacher(teacher, "cpu") if obj.needs_teacher else None
    with Count():
        got, _ = objective_loss(student, ids, ids.clone(), obj, tch)
        got.backward()
    assert counts["head"] == 3 * per_chunk
    assert counts["log_softmax"] == 3 * (2 if obj.needs_teacher else 1)
