"""Memory model of quantize, block-wise recovery and end-to-end recovery: pure formulas in the model's shape.

Every term is what the code allocates (docs/scaling.md derives each one and names the function); nothing
here imports torch or measures anything. ``tools/bench_memory.py`` checks the quantize and training-step
terms against peak RSS on the CPU and prints docs/scaling.md's table with ``--table``, which a test
compares with the document, so the table and these functions cannot drift apart.

Sizes are bytes. Notation: d hidden, I intermediate, n blocks, V vocabulary, N x L calibration windows,
B x L training batch, K salient columns per linear, a bytes per activation element, w bytes per weight.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CAPACITIES", "GB", "LLAMA2", "Shape", "block_forward_transient", "blockwise_memory", "gptq_workspace",
           "layer_activations", "quantize_memory", "recover_memory", "salient_params", "scaling_rows", "scaling_table",
           "scratch"]

GB = 1e9


@dataclass(frozen=True)
class Shape:
    """A Llama-style decoder: 7 linears per block (q, k, v, o, gate, up, down), untied embeddings by default."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = 32000
    tied: bool = False

    @property
    def kv_dim(self) -> int:
        return self.hidden * self.kv_heads // self.heads

    def linears(self) -> list[tuple[str, int, int]]:
        """(name, in_features, out_features) of one block's linears."""
        d, kv, i = self.hidden, self.kv_dim, self.intermediate
        return [("q_proj", d, d), ("k_proj", d, kv), ("v_proj", d, kv), ("o_proj", d, d),
                ("gate_proj", d, i), ("up_proj", d, i), ("down_proj", i, d)]

    @property
    def block_linear_params(self) -> int:
        return sum(i * o for _, i, o in self.linears())

    @property
    def block_params(self) -> int:
        return self.block_linear_params + 2 * self.hidden  # two RMSNorm weights

    @property
    def outside_params(self) -> int:
        """Embeddings, head (unless tied) and the final norm: never quantized, never trained."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.block_params + self.outside_params


LLAMA2 = {
    "7B": Shape("Llama-2-7B", 4096, 11008, 32, 32, 32),
    "13B": Shape("Llama-2-13B", 5120, 13824, 40, 40, 40),
    "70B": Shape("Llama-2-70B", 8192, 28672, 80, 64, 8),
}


def salient_params(shape: Shape, k: int | None = None, fraction: float = 0.03125) -> int:
    """Trainable salient weights of the whole model: sum over linears of out x K (K fixed, or round(fraction * in))."""
    per_block = sum(o * (k if k is not None else round(fraction * i)) for _, i, o in shape.linears())
    return shape.layers * per_block


# ------------------------------------------------------------------ shared terms

def gptq_workspace(in_f: int, out_f: int) -> int:
    """Peak of one linear's statistics + GPTQ + error report (fp32 compute), beyond its own weight.

    engine.quantize_model keeps ColumnStats' float64 XᵀX (8 in²) and the float32 Hessian (4 in²) for the
    group; gptq._gptq adds its copy of H, the permuted copy, the damped clone, the Cholesky factor, its
    inverse and the inverse's upper factor (6 x 4 in²) next to two weight copies (W, W[:, order]: 8 out·in).
    gptq.layer_error then holds float64 differences and products (about 32 out·in) and H in float64 (8 in²).
    """
    during_cholesky = 36 * in_f * in_f + 8 * out_f * in_f
    during_error = 20 * in_f * in_f + 36 * out_f * in_f
    return max(during_cholesky, during_error)


def block_forward_transient(shape: Shape, tokens: int, act_bytes: int) -> int:
    """One no-grad block forward on ``tokens`` positions: q, k, v, attention out, gate, up, act, product."""
    return tokens * (4 * shape.hidden + 4 * shape.intermediate) * act_bytes


def layer_activations(shape: Shape, tokens: int, act_bytes: int, k: int | None = None) -> int:
    """What autograd keeps for one block's backward (recover/layer.py saves only x[..., S] per linear).

    Two RMSNorms (input and normalised: 4 d), attention's q, k, v and output (4 d, GQA's k, v repeated to d),
    the MLP's gate, act(gate) and up (3 I), and the salient slices of the seven inputs.
    """
    ks = sum(k if k is not None else round(0.03125 * i) for _, i, _ in shape.linears())
    return tokens * (8 * shape.hidden + 3 * shape.intermediate + ks) * act_bytes


def scratch(shape: Shape) -> int:
    """layer._scratch: the effective-weight and noise buffers, float32, sized to the largest linear."""
    return 2 * 4 * max(i * o for _, i, o in shape.linears())


# ------------------------------------------------------------------ quantize

def quantize_memory(shape: Shape, n_samples: int, seq: int, *, weight_bytes: int = 2, act_bytes: int | None = None,
                    calib_batch: int = 8, bits: int = 3, blockwise: bool = False, on_gpu: bool = True) -> dict:
    """Peak host and device memory of engine.quantize_model (plus the block-wise hook when ``blockwise``).

    Host: the whole model as loaded (blocks are quantized in place, so this only shrinks). Device: one
    block, the calibration activations (inputs and outputs of run_block: 2 A; 3 A with block-wise
    targets), the largest linear's GPTQ workspace and one calibration batch's forward. On a CPU run
    (``on_gpu`` False) the block is already counted in the host weights.
    """
    a = weight_bytes if act_bytes is None else act_bytes
    acts = n_samples * seq * shape.hidden * a
    streams = 3 if blockwise else 2
    block = shape.block_params * weight_bytes
    workspace = max(gptq_workspace(i, o) for _, i, o in shape.linears())
    forward = block_forward_transient(shape, calib_batch * seq, a)
    dense_cache = shape.block_linear_params * a  # QuantLinear.forward caches its dense weight until the block leaves
    terms = {"activations": streams * acts, "gptq_workspace": workspace, "forward": forward,
             "dense_cache": dense_cache if on_gpu else 0,
             "block": block if on_gpu else 0, "fp_block_copy": block if blockwise else 0}
    device = sum(terms.values())
    host = shape.params * weight_bytes
    return {"host": host + (0 if on_gpu else device), "device": device if on_gpu else 0, "terms": terms,
            "beyond_weights": device}


def blockwise_memory(shape: Shape, n_samples: int, seq: int, *, calib_batch: int = 8, weight_bytes: int = 2,
                     act_bytes: int = 2, k: int | None = None, bits: int = 3) -> dict:
    """Device peak of quantize with the block-wise hook: the larger of GPTQ's peak and the peak while
    blockwise.reconstruct_block trains one block (the engine's block state included)."""
    base = quantize_memory(shape, n_samples, seq, weight_bytes=weight_bytes, act_bytes=act_bytes,
                           calib_batch=calib_batch, bits=bits, blockwise=True)
    terms = dict(base["terms"])
    terms["gptq_workspace"] = 0  # GPTQ of the block is over when reconstruction starts
    terms["forward"] = 0
    sal = salient_params(Shape(**{**shape.__dict__, "layers": 1}), k)
    terms["codes_uint8"] = shape.block_linear_params  # SalientLinear keeps one byte per code
    terms["salient_adamw"] = 16 * sal  # fp32 column + grad + AdamW's two moments
    terms["scratch"] = scratch(shape)
    terms["step_activations"] = layer_activations(shape, calib_batch * seq, act_bytes, k)
    return {"host": base["host"], "device": max(base["device"], sum(terms.values())), "terms": terms,
            "training": sum(terms.values()), "gptq": base["device"]}


# ------------------------------------------------------------------ end-to-end recovery

def recover_memory(shape: Shape, *, batch: int, seq: int, k: int | None = 128, bits: int = 3,
                   checkpointing: bool = True, teacher: str | None = None, base: str = "uint8",
                   weight_bytes: int = 2, act_bytes: int = 2, param_bytes: int = 4, chunk_tokens: int = 128,
                   teacher_bytes: int | None = None) -> dict:
    """Peak device (and host) memory of one end-to-end training step (recover/loop.py's _Loop.step).

    ``base``: ``uint8`` is what SalientLinear stores (one byte per code); ``packed`` is ``bits / 8`` per
    weight, what the checkpoint stores and a packed training base would need. ``teacher``: None (``--loss
    ce``), ``gpu`` (bf16 next to the student) or ``cpu`` (``--teacher-device cpu``: fp32 in host memory, as
    recover/training.load_teacher loads it). ``param_bytes``: the salient columns' dtype (float32 in
    SalientLinear, with autocast computing in bf16). The training caches (recover/caches.py) are left out:
    by default they take at most a quarter of the memory still free after the first step, so they never
    decide whether a run fits.
    """
    tokens = batch * seq
    chunk = min(chunk_tokens, batch * (seq - 1))  # the loss's rows: positions with a next token
    lin = shape.layers * shape.block_linear_params
    sal = salient_params(shape, k)
    per_code = 1.0 if base == "uint8" else bits / 8
    rows = shape.layers * sum(o for _, _, o in shape.linears())  # per-row grids: one scale, one zero each
    ins = shape.layers * sum(i for _, i, _ in shape.linears())
    terms = {
        "base_codes": int(lin * per_code),
        "grids_and_indices": rows * (4 + 4 + 4) + ins * (8 + 1),  # scales, zeros, delta fp32; g_idx int64, mask
        "outside_weights": (shape.outside_params + 2 * shape.hidden * shape.layers) * weight_bytes,
        "salient_params": sal * param_bytes,
        "salient_grads": sal * param_bytes,
        "adamw_states": sal * 2 * param_bytes,
        # plus _SalientMatmul's cast of the effective weight to the compute dtype (none when it is fp32)
        "scratch": scratch(shape) + (max(i * o for _, i, o in shape.linears()) * act_bytes if act_bytes < 4 else 0),
    }
    one_layer = layer_activations(shape, tokens, act_bytes, k)
    if checkpointing:  # HF checkpointing keeps each block's input, recomputes one block in backward
        terms["activations"] = shape.layers * tokens * shape.hidden * act_bytes + one_layer
    else:
        terms["activations"] = shape.layers * one_layer
    # objective.chunked_loss: selected rows of the final states (+ their grad) and one chunk's logits,
    # log-softmaxes and gradient in fp32
    terms["loss"] = 2 * tokens * shape.hidden * act_bytes + 4 * chunk * shape.vocab * 4
    # host: prepare_recovery holds the packed checkpoint (its unquantized weights in the model dtype) and the
    # SalientLinear model it builds on the CPU, before the model moves to the GPU; the noise step's
    # full-precision reference is read one linear at a time (source_weights.py), in fp32
    largest_linear = max(i * o for _, i, o in shape.linears())
    host = (shape.params - lin) * weight_bytes + lin * (1 + bits / 8) + sal * param_bytes + largest_linear * 4
    if teacher is not None:
        terms["teacher_states"] = tokens * shape.hidden * act_bytes + chunk * shape.vocab * 4
        if teacher == "gpu":
            tb = 2 if teacher_bytes is None else teacher_bytes
            terms["teacher_weights"] = shape.params * tb
            terms["teacher_forward"] = block_forward_transient(shape, tokens, 2)
        else:
            tb = 4 if teacher_bytes is None else teacher_bytes
            host = max(host, shape.params * tb + block_forward_transient(shape, tokens, tb))
    return {"device": sum(terms.values()), "host": int(host), "terms": terms, "salient_params": sal}


# ------------------------------------------------------------------ the table of docs/scaling.md

CAPACITIES = (80, 141)


def _fits(gb: float) -> str:
    return " / ".join("yes" if gb <= c * 0.95 else "no" for c in CAPACITIES)


def scaling_rows() -> list[dict]:
    """docs/scaling.md's rows: 7B/13B/70B, 3-bit, K = 128, fp16 checkpoint columns, batch 2 x 2048."""
    rows = []
    for key, shape in LLAMA2.items():
        q = quantize_memory(shape, 128, 2048, weight_bytes=2, calib_batch=8)
        rows.append({"model": key, "stage": "quantize (128 x 2048 calibration, bf16)", "device": q["device"],
                     "host": q["host"]})
        b = blockwise_memory(shape, 128, 2048, calib_batch=8, k=128)
        rows.append({"model": key, "stage": "quantize + block-wise recovery (batch 8 x 2048)", "device": b["device"],
                     "host": b["host"]})
        for base in ("uint8", "packed"):
            for teacher in (None, "gpu", "cpu"):
                r = recover_memory(shape, batch=2, seq=2048, k=128, teacher=teacher, base=base)
                what = {None: "CE", "gpu": "KD, teacher on GPU (bf16)", "cpu": "KD, --teacher-device cpu (fp32)"}
                base_txt = "uint8 codes (as implemented)" if base == "uint8" else "3-bit packed base (not implemented)"
                rows.append({"model": key, "stage": f"end-to-end {what[teacher]}, {base_txt}", "device": r["device"],
                             "host": r["host"]})
    return rows


def scaling_table() -> str:
    lines = ["| model | stage | GPU peak (GB) | fits 80 GB / 141 GB | host beyond the process (GB) |",
             "|---|---|---|---|---|"]
    for r in scaling_rows():
        gb = r["device"] / GB
        lines.append(f"| {r['model']} | {r['stage']} | {gb:.1f} | {_fits(gb)} | {r['host'] / GB:.1f} |")
    return "\n".join(lines) + "\n"
