"""The GGUF export for llama.cpp, checked without llama.cpp: gguf's reader and its own dequantization.

* exact: every block tensor read back with ``gguf.GGUFReader`` and dequantized by ``gguf.quants`` (numpy
  code independent of the writer) equals ``QuantLinear.dequantized_base()`` bit for bit (Q4_0 per-row,
  g=32, g=128; Q8_0), and the LoRA GGUF's ``B A`` adds the salient columns back exactly;
* the Q/K row order is the one that makes llama.cpp's adjacent-pair RoPE equal Hugging Face's rotate_half;
* what no GGUF type holds exactly (2/3-bit, groups not covering 32-column blocks, asymmetric grids whose
  Q4_1 minimum is not a float16) is refused on one line naming the layer, the setting and what to do;
* the tokenizer metadata is the Hugging Face tokenizer's.

llama.cpp itself (llama-cpp-python) runs the exports in test_export_gguf_llama.py.
"""

import json

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader
from test_export import make_src, quantized_checkpoints
from tiny import corpus, make_tokenizer, tiny_config

from gift_quant.cli.app import main
from gift_quant.config.settings import QuantSpec
from gift_quant.export import NativeCheckpoint, export
from gift_quant.export.gguf import LORA_FILE, MODEL_FILE, gguf_name, llama_hparams
from gift_quant.export.gguf_blocks import gguf_layer, rope_row_order
from gift_quant.export.gguf_vocab import pre_tokenizer_name
from gift_quant.packed.qlinear import QuantLinear
from gift_quant.util.errors import GiftQuantError

pytestmark = pytest.mark.usefixtures("torch_single_thread")

CASES = {
    "w4row": (dict(bits=4, salient=4), QT.Q4_0),
    "w4g32": (dict(bits=4, group_size=32, salient=4), QT.Q4_0),
    "w4g128": (dict(bits=4, group_size=128, salient_fraction=0.05), QT.Q4_0),  # K 6 / 13 -> rank 13, padded
    "w8row": (dict(bits=8, salient=4), QT.Q8_0),
    "w3g32": (dict(bits=3, group_size=32, salient=4), None),
}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A tiny tied Llama (SmolLM2's layout), 128 wide so that groups of 128 fit (4 heads of 32, 2 KV heads)."""
    from transformers import AutoModelForCausalLM

    path = make_src(tmp_path_factory.mktemp("src"), tied=True)
    cfg = tiny_config("llama", vocab_size=len(make_tokenizer(path)))
    cfg.update(dict(hidden_size=128, intermediate_size=256, head_dim=32, tie_word_embeddings=True))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ckpt(src, tmp_path_factory):
    calib = tmp_path_factory.mktemp("data") / "calib.txt"
    calib.write_text(corpus(2000, seed=1))
    return quantized_checkpoints(tmp_path_factory.mktemp("ckpt"), src, calib, {k: v[0] for k, v in CASES.items()})


def tensors(path):
    return {t.name: t for t in GGUFReader(path).tensors}


def dequant(t) -> torch.Tensor:
    """A GGUF tensor as float32 (rows, columns), by gguf-py's numpy dequantization."""
    return torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))


def hf_rows(name: str, w: torch.Tensor, hp: dict) -> torch.Tensor:
    """Undo the Q/K row order llama.cpp wants."""
    heads = {".attn_q.": hp["heads"], ".attn_k.": hp["kv_heads"]}
    n = next((h for k, h in heads.items() if k in name), None)
    return w if n is None else w[torch.argsort(rope_row_order(w.shape[0], n))]


@pytest.mark.parametrize("case", [c for c, (_, t) in CASES.items() if t is not None])
def test_blocks_and_adapter_are_exact(case, ckpt, tmp_path):
    out = tmp_path / "gguf"
    res = export(ckpt(case), out, fmt="gguf")
    assert res["ggml_type"] == CASES[case][1].name and res["files"] == [MODEL_FILE, LORA_FILE]
    nat = NativeCheckpoint(ckpt(case))
    hp = llama_hparams(nat)
    base, lora = tensors(out / MODEL_FILE), tensors(out / LORA_FILE)
    for hf, q in nat.layers.items():
        name = gguf_name(f"{hf}.weight")
        assert base[name].tensor_type == CASES[case][1]
        w = hf_rows(name, dequant(base[name]), hp)
        assert torch.equal(w, q.dequantized_base()), hf
        a, b = dequant(lora[f"{name}.lora_a"]), hf_rows(name, dequant(lora[f"{name}.lora_b"]), hp)
        assert a.shape == (res["lora_rank"], q.in_features) and b.shape == (q.out_features, res["lora_rank"])
        assert torch.equal(w + b @ a, q.dense_weight(torch.float32)), hf
    emb = nat.tensors.get("model.embed_tokens.weight", nat.tensors.get("lm_head.weight"))
    assert torch.equal(dequant(base["token_embd.weight"]), emb.float())
    assert "output.weight" not in base  # tied: llama.cpp reuses token_embd
    assert torch.equal(dequant(base["output_norm.weight"]), nat.tensors["model.norm.weight"].float())


def test_metadata(ckpt, src, tmp_path):
    from transformers import AutoTokenizer

    export(ckpt("w4g32"), tmp_path / "g", fmt="gguf")
    f = {k: v.contents() for k, v in GGUFReader(tmp_path / "g" / MODEL_FILE).fields.items()}
    cfg = NativeCheckpoint(ckpt("w4g32")).config
    assert f["general.architecture"] == "llama" and f["general.type"] == "model"
    assert f["llama.block_count"] == cfg["num_hidden_layers"] and f["llama.embedding_length"] == cfg["hidden_size"]
    assert f["llama.attention.head_count_kv"] == cfg["num_key_value_heads"]
    assert f["llama.feed_forward_length"] == cfg["intermediate_size"]
    assert f["llama.rope.dimension_count"] == cfg["head_dim"]
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg["rms_norm_eps"])
    tok = AutoTokenizer.from_pretrained(src)
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert f["tokenizer.ggml.tokens"][: len(tok)] == tok.convert_ids_to_tokens(list(range(len(tok))))
    assert f["tokenizer.ggml.eos_token_id"] == tok.eos_token_id and f["tokenizer.ggml.add_bos_token"] is False
    assert f["tokenizer.ggml.token_type"][tok.eos_token_id] == gguf.TokenType.CONTROL
    merges = json.loads((src / "tokenizer.json").read_text())["model"]["merges"]
    assert f["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]
    lf = {k: v.contents() for k, v in GGUFReader(tmp_path / "g" / LORA_FILE).fields.items()}
    assert lf["general.type"] == "adapter" and lf["adapter.type"] == "lora" and lf["adapter.lora.alpha"] == 4.0
    assert lf["general.architecture"] == "llama"


def _hf_rope(x, pos, base=10000.0):
    """Hugging Face Llama: dimension i pairs with i + d/2 (rotate_half); x (heads, d)."""
    d = x.shape[-1]
    ang = pos * base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos, sin = torch.cat([ang.cos(), ang.cos()]), torch.cat([ang.sin(), ang.sin()])
    return x * cos + torch.cat([-x[..., d // 2:], x[..., : d // 2]], dim=-1) * sin


def _llama_cpp_rope(x, pos, base=10000.0):
    """llama.cpp's llama graph (normal RoPE mode): adjacent dimensions (2i, 2i+1) rotate together."""
    d = x.shape[-1]
    ang = pos * base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    e, o = x[..., 0::2], x[..., 1::2]
    return torch.stack([e * ang.cos() - o * ang.sin(), e * ang.sin() + o * ang.cos()], dim=-1).reshape(x.shape)


def test_rope_row_order_turns_hf_rope_into_llama_cpp_rope():
    heads, d = 3, 8
    perm = rope_row_order(heads * d, heads)
    assert torch.equal(perm[torch.argsort(perm)], torch.arange(heads * d))
    assert perm[: d].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    x = torch.randn(heads * d, dtype=torch.float64)
    for pos in (0, 1, 7):
        hf = _hf_rope(x.view(heads, d), pos).reshape(-1)
        cpp = _llama_cpp_rope(x[perm].view(heads, d), pos).reshape(-1)
        assert torch.allclose(cpp, hf[perm])  # q.k per head is invariant under the same row order


def _layer(bits, sym, group_size, in_f=64, salient=(3, 40), scale=None, zero=None, compact=False):
    """A synthetic packed layer: groups of ``group_size`` natural columns, salient columns at their zero.

    ``compact``: groups are runs of ``group_size`` non-salient columns (the compact layout).
    """
    torch.manual_seed(0)
    n_g, out_f = -(-in_f // group_size), 8
    scales = torch.rand(out_f, n_g).half().float() if scale is None else torch.full((out_f, n_g), scale)
    zeros = (torch.full((out_f, n_g), 2 ** (bits - 1)) if sym else
             torch.randint(0, 2 ** bits, (out_f, n_g)) if zero is None else torch.full((out_f, n_g), zero))
    g_idx = torch.arange(in_f) // group_size
    if compact:
        rest = torch.ones(in_f, dtype=torch.bool)
        rest[list(salient)] = False
        g_idx[rest] = torch.arange(int(rest.sum())) // group_size
        g_idx[~rest] = 0
    codes = torch.randint(0, 2 ** bits, (out_f, in_f))
    s = torch.tensor(salient)
    codes[:, s] = zeros[:, g_idx[s]]
    return QuantLinear.from_parts(codes, scales, zeros.float(), g_idx, s, torch.randn(out_f, len(salient)),
                               QuantSpec(bits=bits, sym=sym))


@pytest.mark.parametrize("bits,sym,gs,qtype,kw", [(4, True, 32, QT.Q4_0, {}), (8, True, 64, QT.Q8_0, {}),
                                                  (4, False, 32, QT.Q4_1, dict(scale=0.375, zero=5))])
def test_block_bytes_match_gguf_dequantize(bits, sym, gs, qtype, kw):
    q = _layer(bits, sym, gs, **kw)
    blk = gguf_layer("layer", q)
    assert blk.qtype == qtype
    ref = torch.from_numpy(np.array(gguf.quants.dequantize(blk.to_bytes(), qtype)))
    assert torch.equal(ref, q.dequantized_base()) and torch.equal(blk.dequantized(), ref)


@pytest.mark.parametrize("bits,sym,gs,kw,expect", [
    (3, True, 32, {}, "symmetric 3-bit"), (2, False, 32, {}, "asymmetric 2-bit"),
    (8, False, 32, {}, "Q8_0 is symmetric"), (4, True, 16, {}, "do not cover whole 32-column blocks"),
    (4, True, 32, dict(compact=True), "groups that skip salient columns"),
    (4, True, 48, dict(in_f=48), "not a multiple of GGUF's 32-column blocks"),
    (4, False, 32, dict(scale=0.3), "Q4_1 needs -scale*zero in float16")])
def test_refusals_name_layer_setting_and_remedy(bits, sym, gs, kw, expect):
    with pytest.raises(GiftQuantError) as e:
        gguf_layer("model.layers.1.mlp.up_proj", _layer(bits, sym, gs, **kw))
    msg = str(e.value)
    assert expect in msg and msg.startswith("model.layers.1.mlp.up_proj: ") and "\n" not in msg
    assert "--format compressed-tensors" in msg and "--group-size 32" in msg


def test_cli_refuses_3bit_and_leaves_nothing(ckpt, tmp_path, capsys):
    rc = main(["export", str(ckpt("w3g32")), "--format", "gguf", "--out", str(tmp_path / "x")])
    assert rc != 0 and not (tmp_path / "x").exists()
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("gift-quant: error")]
    assert len(errors) == 1 and "3-bit has no exact GGUF type" in errors[0]


def test_cli_prints_the_llama_cpp_command(ckpt, tmp_path, capsys):
    assert main(["export", str(ckpt("w4row")), "--format", "gguf", "--out", str(tmp_path / "e")]) == 0
    line = capsys.readouterr().out.strip()
    assert f"llama-server -m {tmp_path / 'e' / MODEL_FILE} --lora {tmp_path / 'e' / LORA_FILE}" in line


def test_pre_tokenizer_names():
    bl = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    assert pre_tokenizer_name(bl, "m") == "gpt-2"
    digits = {"type": "Digits", "individual_digits": True}
    assert pre_tokenizer_name({"type": "Sequence", "pretokenizers": [digits, bl]}, "m") == "smollm"
    with pytest.raises(GiftQuantError, match="pre-tokenizer"):
        pre_tokenizer_name({"type": "Whitespace"}, "m")


def test_other_architectures_are_refused(ckpt):
    nat = NativeCheckpoint(ckpt("w4row"))
    nat.config = {**nat.config, "model_type": "qwen2"}
    with pytest.raises(GiftQuantError, match="'qwen2' model; --format gguf writes Llama-family"):
        llama_hparams(nat)
