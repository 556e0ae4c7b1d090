"""NosaForCausalLM: batch and padding invariance (spec section 5, invariants 20 and 21) and an
end-to-end check of every layer against the NumPy float64 reference (tests/np_reference.py).

A small random model (4 query / 2 kv heads, head_dim 8, blocks of 8 tokens, top-6) with non-zero
eviction weights A and delta, so that the cis bias and the two-stage selection are both active.
"""

import jax


import dataclasses
import functools
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nosa_jax.config import ModelConfig, NosaConfig
from nosa_jax.model import NosaForCausalLM, qkv_widths

sys.path.insert(0, os.path.dirname(__file__))
import np_reference as ref  # noqa: E402

SMALL = NosaConfig(kernel_size=8, kernel_stride=4, block_size=8, init_blocks=1, local_blocks=1,
                   topk=6, qk_select=4)
CFG = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5, nosa=SMALL)
MODES = ("nosa", "infllmv2", "full")
LENGTHS = (70, 45, 23)
T_PAD = 76  # every sequence gets some padding
REL = 1e-5


def random_params(cfg, seed=0):
    """Parameter dict in the model's layout with O(1) activations and non-trivial A / delta."""
    rng = np.random.default_rng(seed)
    L, H, I, V = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    Hq, Hk, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    n = lambda *s, std: (rng.normal(size=s) * std).astype(np.float32)  # noqa: E731
    return {
        "embed_tokens": {"embedding": n(V, H, std=1.0)},
        "layers": {
            "input_layernorm": {"weight": 1 + n(L, H, std=0.1)},
            "post_attention_layernorm": {"weight": 1 + n(L, H, std=0.1)},
            "mlp": {"gate_up_proj": {"kernel": np.concatenate([n(L, H, I, std=0.15), n(L, H, I, std=0.15)], axis=-1)},
                    "down_proj": {"kernel": n(L, I, H, std=0.1)}},
            "self_attn": {
                "qkv_proj": {"kernel": np.concatenate([n(L, H, Hq * D, std=0.3), n(L, H, Hk * D, std=0.3),
                                                       n(L, H, Hk * D, std=0.3)], axis=-1)},
                "o_proj": {"kernel": n(L, Hq * D, H, std=0.12)},
                "A": np.array([[-1.3, 0.8], [0.6, -2.1]], np.float32)[:L, :Hk],
                "delta": {"kernel": n(L, Hk * D, Hk, std=0.6)},
            },
        },
        "norm": {"weight": 1 + n(H, std=0.1)},
        "lm_head": {"kernel": n(H, V, std=0.3)},
    }


PARAMS = random_params(CFG)


@functools.lru_cache(maxsize=None)
def model_for(mode, cfg=CFG, q_chunk=32):
    model = NosaForCausalLM(cfg, mode=mode, rngs=nnx.Rngs(0), q_chunk=q_chunk)
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, PARAMS))
    nnx.update(model, state)
    got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    np.testing.assert_array_equal(np.asarray(got["layers"]["self_attn"]["A"]), PARAMS["layers"]["self_attn"]["A"])
    return model


@nnx.jit
def _forward(model, ids, mask, positions):
    return model(ids, mask, positions, return_hidden=True)


def forward(mode, ids, mask=None, positions=None, cfg=CFG):
    ids = jnp.asarray(ids, jnp.int32)
    mask = jnp.ones_like(ids) if mask is None else jnp.asarray(mask, jnp.int32)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    out = _forward(model_for(mode, cfg), ids, mask, jnp.asarray(positions, jnp.int32))
    return jax.tree.map(np.asarray, out)


SEQS = [np.random.default_rng(100 + i).integers(0, CFG.vocab_size, size=n) for i, n in enumerate(LENGTHS)]


@functools.lru_cache(maxsize=None)
def alone(mode, i):
    return forward(mode, SEQS[i][None])


def padded_batch(side, seed):
    """ids, mask, positions for the sequences padded to T_PAD on the given side; pads are random
    token ids. positions [B, P] point at each sequence's tokens (the last one repeated)."""
    rng = np.random.default_rng(seed)
    B, P = len(SEQS), max(LENGTHS)
    ids = rng.integers(0, CFG.vocab_size, size=(B, T_PAD))
    mask = np.zeros((B, T_PAD), np.int32)
    pos = np.zeros((B, P), np.int32)
    for b, s in enumerate(SEQS):
        start = 0 if side == "right" else T_PAD - len(s)
        ids[b, start:start + len(s)] = s
        mask[b, start:start + len(s)] = 1
        pos[b] = start + np.minimum(np.arange(P), len(s) - 1)
    return ids, mask, pos


def id_sets(rows):
    """[..., K] block ids -> tuple of frozensets of the valid (>= 0) ids, one per row."""
    rows = rows.reshape(-1, rows.shape[-1])
    return [frozenset(int(j) for j in r if j >= 0) for r in rows]


# ----------------------------------------------------------------------------- reference

def layer_params(l):
    a, m = PARAMS["layers"]["self_attn"], PARAMS["layers"]["mlp"]
    wq, wk, _ = qkv_widths(CFG)
    qkv = a["qkv_proj"]["kernel"][l]  # columns q | k | v
    gate_up, I = m["gate_up_proj"]["kernel"][l], CFG.intermediate_size  # columns gate | up
    return dict(wq=qkv[:, :wq], wk=qkv[:, wq:wq + wk], wv=qkv[:, wq + wk:],
                wo=a["o_proj"]["kernel"][l], A=a["A"][l], wdelta=a["delta"]["kernel"][l],
                ln1=PARAMS["layers"]["input_layernorm"]["weight"][l],
                ln2=PARAMS["layers"]["post_attention_layernorm"]["weight"][l],
                wg=gate_up[:, :I], wu=gate_up[:, I:], wd=m["down_proj"]["kernel"][l])


@functools.lru_cache(maxsize=None)
def reference_layers(mode, i):
    """Run each reference layer on the model's own input to that layer (sequence i alone)."""
    out = alone(mode, i)
    inv = ref.rope_default_inv_freq(CFG.head_dim, CFG.rope_theta)
    res = []
    for l in range(CFG.num_hidden_layers):
        y, sel, cis = ref.llama_layer(out.hidden[0, l], layer_params(l), n_heads=CFG.num_attention_heads,
                                      n_kv=CFG.num_key_value_heads, head_dim=CFG.head_dim, eps=CFG.rms_norm_eps,
                                      inv_freq=inv, cfg=SMALL, mode=mode, rel=REL)
        res.append((y, sel, cis))
    return res


def fragile_rows(mode, i):
    """[L, Hk, N] rows whose float64 selection has a near tie (excluded from exact id checks)."""
    if mode == "full":
        return None
    return np.stack([sel["fragile"] for _, sel, _ in reference_layers(mode, i)])


# ----------------------------------------------------------------------------- end to end

@pytest.mark.parametrize("mode", MODES)
def test_layers_vs_numpy_reference(mode):
    """Every layer's output, block ids and cis equal the float64 reference given the same input."""
    i = 0
    out = alone(mode, i)
    N = LENGTHS[i]
    L = CFG.num_hidden_layers
    assert out.hidden.shape == (1, L + 1, N, CFG.hidden_size)
    n_compared = n_sparse = 0
    for l, (y, sel, cis) in enumerate(reference_layers(mode, i)):
        np.testing.assert_allclose(out.cis[0, l], cis, atol=2e-5, rtol=1e-4, err_msg=f"cis layer {l}")
        ok = np.ones(N, bool)
        if mode != "full":
            ok = ~sel["fragile"].any(0)
            assert ok.mean() > 0.95
            blk = out.block_ids[0, l]  # [Hk, N, K]
            K = blk.shape[-1]
            for h in range(CFG.num_key_value_heads):
                for t in np.nonzero(ok)[0]:
                    want = np.full(K, -1)
                    want[: sel["ids"].shape[-1]] = sel["ids"][h, t]
                    np.testing.assert_array_equal(blk[h, t], want, err_msg=f"layer {l} head {h} pos {t}")
                    n_compared += 1
                    n_sparse += t // SMALL.block_size + 1 > SMALL.topk
        else:
            assert out.block_ids.shape[-1] == 0
        y_model = out.hidden[0, l + 1] if l + 1 < L else None
        if y_model is None:  # last layer: the model returns the final norm's output
            y = ref.rms_norm(y, PARAMS["norm"]["weight"], CFG.rms_norm_eps)
            y_model = out.hidden[0, L]
        np.testing.assert_allclose(y_model[ok], y[ok], atol=5e-5, rtol=1e-4, err_msg=f"layer {l} output")
    if mode != "full":
        assert n_compared > 200 and n_sparse > 50
    logits = out.hidden[0, L].astype(np.float64) @ PARAMS["lm_head"]["kernel"].astype(np.float64)
    np.testing.assert_allclose(out.logits[0], logits, atol=5e-5, rtol=1e-4)


def test_eviction_weights_matter():
    """A and delta really change the nosa output (else the bias would be untested)."""
    a, b = alone("nosa", 0), alone("infllmv2", 0)
    assert np.abs(a.logits - b.logits).max() > 1e-2
    assert np.abs(a.cis).max() > 0.1
    assert np.mean(a.block_ids != b.block_ids) > 0.01


# ----------------------------------------------------------------------------- invariants 20, 21

@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("mode", MODES)
def test_padded_batch_equals_each_sequence_alone(mode, side):
    ids, mask, pos = padded_batch(side, seed=7 if side == "right" else 8)
    out = forward(mode, ids, mask, pos)
    L, Hk = CFG.num_hidden_layers, CFG.num_key_value_heads
    for b, n in enumerate(LENGTHS):
        one = alone(mode, b)
        np.testing.assert_allclose(out.logits[b, :n], one.logits[0], atol=2e-5, rtol=1e-5,
                                   err_msg=f"{mode}/{side}: logits of sequence {b}")
        np.testing.assert_allclose(out.cis[b, :, :n], one.cis[0], atol=2e-6, rtol=1e-5,
                                   err_msg=f"{mode}/{side}: cis of sequence {b}")
        if mode == "full":
            continue
        frag = fragile_rows(mode, b)  # [L, Hk, n]
        for l in range(L):
            for h in range(Hk):
                got = id_sets(out.block_ids[b, l, h, :n])
                want = id_sets(one.block_ids[0, l, h])
                for t in range(n):
                    if not frag[l, h, t]:
                        assert got[t] == want[t], (mode, side, b, l, h, t, sorted(got[t]), sorted(want[t]))
                # ids after the valid ones are -1
                row = out.block_ids[b, l, h, :n]
                assert all(np.all(r[np.sum(r >= 0):] == -1) for r in row)


@pytest.mark.parametrize("mode", ["nosa"])
def test_batch_of_one_with_trailing_padding(mode):
    """A single sequence padded on the right equals the unpadded run; positions pick rows."""
    s = SEQS[1]
    ids = np.concatenate([s, np.full(T_PAD - len(s), 5)])[None]
    mask = (np.arange(T_PAD) < len(s)).astype(np.int32)[None]
    pos = np.array([[0, 9, len(s) - 1]])
    out = forward(mode, ids, mask, pos)
    one = alone(mode, 1)
    np.testing.assert_allclose(out.logits[0], one.logits[0, [0, 9, len(s) - 1]], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("rope", ["dynamic", "longrope_switch"])
def test_length_dependent_rope_padding_invariance(rope):
    """Invariant 21 with a RoPE whose frequencies depend on the sequence length (dynamic NTK, and
    longrope with switching to long_factor past original_max): the padded width must not leak into
    them. A sequence of 30 tokens (<= 32, so no rescaling / short factors when alone) padded to 48."""
    if rope == "dynamic":
        cfg = dataclasses.replace(CFG, rope_scaling={"rope_type": "dynamic", "factor": 4.0},
                                  max_position_embeddings=32)
    else:
        half = CFG.head_dim // 2
        cfg = dataclasses.replace(CFG, rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * half,
                                                     "long_factor": [4.0] * half},
                                  max_position_embeddings=128, original_max_position_embeddings=32,
                                  longrope_switch=True)
    s = SEQS[0][:30]
    ids = np.concatenate([s, np.full(18, 3)])[None]
    mask = (np.arange(48) < 30).astype(np.int32)[None]
    pos = np.arange(30)[None]
    padded = forward("full", ids, mask, pos, cfg=cfg)
    unpadded = forward("full", s[None], cfg=cfg)
    np.testing.assert_allclose(padded.logits[0], unpadded.logits[0], atol=2e-5, rtol=1e-5)


def test_single_row_projection_equals_plain_linear():
    """model._dense computes a one-row product as two rows (XLA's GPU GEMV workaround): the row
    equals the plain layer's output, for widths on both sides of the 2048 cut-off."""
    from flax import nnx

    from nosa_jax.model import _dense

    rng = np.random.default_rng(0)
    for dout in (256, 2048, 2049):
        lin = nnx.Linear(24, dout, rngs=nnx.Rngs(0))
        for shape in ((1, 1, 24), (1, 24), (3, 1, 24)):
            x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
            got, want = np.asarray(_dense(lin, x)), np.asarray(x, np.float64) @ np.asarray(lin.kernel[...], np.float64)
            assert got.shape == shape[:-1] + (dout,)
            np.testing.assert_allclose(got, want + np.asarray(lin.bias[...]), rtol=1e-5, atol=1e-5)
