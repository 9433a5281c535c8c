"""README's "Use it from Python" block runs as written (on a tiny quantized model instead of runs/smollm2-w3)."""

import json
import re
from pathlib import Path

import torch
from tiny import QUIET_CPU, corpus, make_model_dir

README = Path(__file__).resolve().parents[1] / "README.md"
TEMPLATE = ("{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}answer:{% endif %}")


def _python_block() -> str:
    text = README.read_text()
    section = text[text.index("## Use it from Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def forward_lengths(model, call) -> list[int]:
    """The input lengths of every forward pass of ``model`` while ``call()`` runs (generate's steps).

    With the KV cache, generate runs the prompt once and then one token per step; without it every step
    re-runs the whole prefix. Counting is what tells the two apart (no timing)."""
    lengths = []

    def hook(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        lengths.append(int(ids.shape[-1]))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        call()
    finally:
        handle.remove()
    return lengths


def assert_generate_uses_kv_cache(model, inputs, new_tokens: int = 6):
    """README's generate call (no use_cache argument) feeds the prompt once, then single tokens."""
    with torch.no_grad():
        lengths = forward_lengths(model, lambda: model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False,
                                                                 min_new_tokens=new_tokens))
    prompt = int(inputs["input_ids"].shape[-1])
    assert lengths == [prompt] + [1] * (new_tokens - 1), lengths
    assert model.generation_config.use_cache is True and model.config.use_cache is True


def test_readme_python_block_runs_and_generates_with_the_kv_cache(tmp_path, capsys):
    from transformers import AutoTokenizer

    from gift_quant.config.settings import QuantizeConfig
    from gift_quant.workflows.stages import quantize_to_checkpoint

    src = make_model_dir("llama", tmp_path / "src")
    tok = AutoTokenizer.from_pretrained(src)
    tok.chat_template = TEMPLATE  # the tiny tokenizer has none; the default model's has one
    tok.save_pretrained(src)
    (tmp_path / "text.txt").write_text(corpus(3000, seed=3))
    out = tmp_path / "ckpt"
    quantize_to_checkpoint(str(src), out, QuantizeConfig(bits=4, salient=4, calib_data=str(tmp_path / "text.txt"),
                                                         calib_samples=4, seq_len=32), runtime=QUIET_CPU)
    code = _python_block().replace("runs/smollm2-w3", str(out))
    code = code.replace("EvalConfig(max_windows=8)", f"EvalConfig(ppl_data={str(tmp_path / 'text.txt')!r}, "
                                                      "seq_len=32, max_windows=4)")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    printed = capsys.readouterr().out.strip().splitlines()
    assert float(printed[-1]) > 1  # a perplexity
    model = scope["model"]
    # the block's own generate call, as written, uses the cache (issue #23: generation_config said use_cache false)
    lengths = forward_lengths(model, lambda: exec(compile(_generate_line(), "README.md", "exec"), scope))
    assert lengths[0] == scope["inputs"]["input_ids"].shape[1] and set(lengths[1:]) == {1}, lengths
    assert_generate_uses_kv_cache(model, scope["inputs"])
    # no saved config of ours says use_cache false
    assert json.loads((out / "config.json").read_text())["use_cache"] is True
    assert json.loads((out / "generation_config.json").read_text()).get("use_cache", True) is True
    # generation with the cache equals generation without it (the cache is on and correct)
    ids = scope["inputs"]["input_ids"]
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
        uncached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def _generate_line() -> str:
    return next(line for line in _python_block().splitlines() if "model.generate(" in line)


def test_checkpoint_recording_use_cache_false_still_generates_with_the_cache(tmp_path):
    """Checkpoints written before the fix record use_cache false in config.json; load still turns the cache on."""
    import gift_quant
    from gift_quant.config.settings import QuantizeConfig
    from gift_quant.packed.checkpoint import CONFIG_NAME
    from gift_quant.util.files import sha256_file
    from gift_quant.workflows.stages import quantize_to_checkpoint

    src = make_model_dir("llama", tmp_path / "src")
    (tmp_path / "text.txt").write_text(corpus(2000, seed=3))
    out = tmp_path / "ckpt"
    quantize_to_checkpoint(str(src), out, QuantizeConfig(bits=4, salient=4, calib_data=str(tmp_path / "text.txt"),
                                                         calib_samples=2, seq_len=32), runtime=QUIET_CPU)
    for name in ("config.json", "generation_config.json"):  # as an old checkpoint wrote them
        doc = json.loads((out / name).read_text())
        doc["use_cache"] = False
        (out / name).write_text(json.dumps(doc))
    gift = json.loads((out / CONFIG_NAME).read_text())
    gift["files"]["config.json"] = sha256_file(out / "config.json")
    (out / CONFIG_NAME).write_text(json.dumps(gift))
    model = gift_quant.load(out)
    assert_generate_uses_kv_cache(model, {"input_ids": torch.tensor([[5, 6, 7, 8]])})


def test_version_flag(capsys):
    import pytest

    from gift_quant.cli.app import main

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("gift-quant ")


def test_load_without_dense_cache_computes_the_same_and_keeps_no_dense_weights(tmp_path):
    """gift_quant.load(path, dense_cache=False) (issue #23 req 6): per-row, natural groups and compact groups (a
    g_idx that is not column // group size) give the cached model's logits and greedy tokens; no layer keeps a
    dense weight."""
    import gift_quant
    from gift_quant.config.settings import QuantizeConfig
    from gift_quant.packed.qlinear import QuantLinear
    from gift_quant.workflows.stages import quantize_to_checkpoint

    src = make_model_dir("llama", tmp_path / "src")
    (tmp_path / "text.txt").write_text(corpus(2000, seed=3))
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    settings = {"row3": dict(bits=3), "g32": dict(bits=4, group_size=32),
                "compact": dict(bits=2, group_size=32, group_layout="compact")}
    for name, kw in settings.items():
        out = tmp_path / name
        quantize_to_checkpoint(str(src), out, QuantizeConfig(salient=4, calib_data=str(tmp_path / "text.txt"),
                                                             calib_samples=2, seq_len=32, **kw),
                               runtime=QUIET_CPU)
        cached, lean = gift_quant.load(out), gift_quant.load(out, dense_cache=False)
        with torch.no_grad():
            ref, got = cached(ids).logits, lean(ids).logits
            assert float((got - ref).abs().max() / ref.abs().max()) < 1e-5, name
            assert torch.equal(cached.generate(ids[:1], max_new_tokens=6, do_sample=False),
                               lean.generate(ids[:1], max_new_tokens=6, do_sample=False)), name
        layers = [m for m in lean.modules() if isinstance(m, QuantLinear)]
        assert layers and all(m._dense is None for m in layers)
        assert any(m._dense is not None for m in cached.modules() if isinstance(m, QuantLinear))
        if name == "compact":
            assert not all(m._contiguous for m in layers)  # the gather fallback ran
