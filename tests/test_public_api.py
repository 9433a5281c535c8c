"""README's "Use it from Python" block runs as written (on a tiny quantized model instead of runs/smollm2-w3)."""

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
    assert model.config.use_cache is True
    # generation with the cache equals generation without it (the cache is on and correct)
    ids = scope["inputs"]["input_ids"]
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
        uncached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_version_flag(capsys):
    import pytest

    from gift_quant.cli.app import main

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("gift-quant ")
