"""pallas_kernels.sparse_decode_mgpu: the Mosaic GPU backend of the block-sparse NOSA decode kernel.

CPU: the kernel in Mosaic GPU interpret mode (`interpret=True` -> `plgpu.InterpretGPUParams()`)
against `sparse_decode_attention_reference` AND the float64 NumPy computation of
test_kernel_sparse_decode (`np_sparse_decode`), on fresh random bf16 inputs at the shapes Mosaic
needs (D = 64 / 128, blocks of 64, G padded to the wgmma M of 64): G = 1, 4, 16; ragged q_pos with
partial tail blocks; -1 entries; block ids in any order; a permuted smaller pool (slots != ids);
bias None / normal / extreme; several k_splits (incl. padded tables); layer > 0 with every other
layer, and every pool token the kernel must not use, NaN; a traced layer inside jit + scan; the
`backend="mosaic"` dispatch of `sparse_decode_attention`.

The interpreter does not check layouts, swizzles, TMA alignment or register limits: only the
GPU tests (`@pytest.mark.gpu`, NOSA_TEST_GPU=1) check the compiled kernel, at B=16, Hq=32,
Hk=2 / 8, D=128, blocks of 64, K=64, T=32768, bf16, relative error <= 1e-2 against the reference.
"""

import os

import jax

if os.environ.get("NOSA_TEST_GPU") != "1":
    jax.config.update("jax_platforms", "cpu")

import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from pallas_kernels.sparse_decode import sparse_decode_attention, sparse_decode_attention_reference
from pallas_kernels.sparse_decode_mgpu import sparse_decode_attention_mgpu
from test_kernel_sparse_decode import _gpu_case, _rel_err, make_case, np_sparse_decode, scan_over_layers
from test_kernel_sparse_decode import check as base_check, run_all as base_run_all

BS = 64


def _case(rng, **kw):
    kw.setdefault("B", 2)
    kw.setdefault("Hk", 2)
    kw.setdefault("G", 4)
    kw.setdefault("D", 64)
    kw.setdefault("n_logical", 6)
    kw.setdefault("K", 4)
    return make_case(rng, bs=BS, dtype=jnp.bfloat16, **kw)


def run_all(case, bs, **kw):
    return base_run_all(case, bs, kernel=sparse_decode_attention_mgpu, **kw)


def check(out, ref, npo, atol=2e-2, rtol=2e-2):
    """bf16 inputs / output, P cast to bf16 for the P.V wgmma (as in the Triton backend's bf16 test)."""
    base_check(out, ref, npo, atol=atol, rtol=rtol)
    if np.linalg.norm(npo) > 0:
        assert np.linalg.norm(out - npo) / np.linalg.norm(npo) < 1e-2


# ------------------------------------------------------------------ CPU (Mosaic GPU interpret mode)

@pytest.mark.parametrize("G,D", [(1, 64), (4, 128), (16, 64)])
def test_matches_references_per_group_size(G, D):
    rng = np.random.default_rng()
    case, bs = _case(rng, G=G, D=D, K=5)
    out, ref, npo = run_all(case, bs, k_splits=2)
    check(out, ref, npo)


@pytest.mark.parametrize("k_splits", [1, 3, 7, None])  # 7 = K: one entry per split; 3: padded table
def test_k_splits(k_splits):
    rng = np.random.default_rng()
    case, bs = _case(rng, K=7, n_logical=9)
    out, ref, npo = run_all(case, bs, k_splits=k_splits)
    check(out, ref, npo)


def test_permuted_smaller_pool_layer2():
    """Offloaded-cache layout: a pool of 9 physical blocks, slots a random injection (slot -1 for
    unused entries), unused slots NaN; layer 2 of 3 (layers 0 and 1 NaN)."""
    rng = np.random.default_rng()
    case, bs = _case(rng, L=3, layer=2, K=7, n_logical=12, permuted=True, n_slots=9)
    assert not np.array_equal(np.asarray(case["slots"]), np.asarray(case["block_ids"]))
    assert np.isnan(np.asarray(case["k_pool"][:2].astype(jnp.float32))).all()
    out, ref, npo = run_all(case, bs, k_splits=3)
    check(out, ref, npo)


def test_bias_none():
    rng = np.random.default_rng()
    case, bs = _case(rng, bias="none", K=5)
    out, ref, npo = run_all(case, bs, k_splits=2)
    check(out, ref, npo)


@pytest.mark.parametrize("k_splits", [1, 5])
def test_extreme_bias(k_splits):
    """|bias| up to 1e4: the running max must include the bias (no exp overflow, no NaN)."""
    rng = np.random.default_rng()
    case, bs = _case(rng, bias="extreme", K=5)
    out, ref, npo = run_all(case, bs, k_splits=k_splits)
    check(out, ref, npo)


def test_rows_without_visible_keys_are_zero():
    """(b=0,h=1) only -1 entries; b=1 sees only future blocks; b=2 at q_pos 0 sees one token
    (a block with 1 of 64 tokens visible, the rest NaN-poisoned)."""
    rng = np.random.default_rng()
    case, bs = _case(rng, B=3, K=5, n_logical=8, q_pos=[200, 3, 0], neg_entries=False, poison=False)
    ids = np.asarray(case["block_ids"]).copy()
    ids[0, 1] = -1
    ids[1] = np.array([[3, 1, 7, 5, 2], [6, 4, 2, 1, 3]])
    ids[2, 0] = np.array([4, 0, 2, 6, 1])
    case["block_ids"] = case["slots"] = jnp.asarray(ids)
    # poison every token that must not be read: everything but b=0's visible tokens and token 0 of b=2
    k = np.asarray(case["k_pool"].astype(jnp.float32)).copy()
    keep = np.zeros(k.shape[:4], bool)
    keep[1, 0, :201] = True
    keep[1, 2, 0] = True
    k[~keep] = np.nan
    case["k_pool"] = jnp.asarray(k, jnp.bfloat16)
    out, ref, npo = run_all(case, bs, k_splits=2)
    check(out, ref, npo)
    G = 4
    assert np.all(out[0, G:2 * G] == 0) and np.all(out[1] == 0)
    assert np.any(out[2, :G] != 0)


def test_backend_dispatch():
    rng = np.random.default_rng()
    case, bs = _case(rng, K=4)
    out = sparse_decode_attention(**case, block_size=bs, k_splits=2, interpret=True, backend="mosaic")
    direct = sparse_decode_attention_mgpu(**case, block_size=bs, k_splits=2, interpret=True)
    np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32)), np.asarray(direct.astype(jnp.float32)))
    with pytest.raises(ValueError, match="unknown backend"):
        sparse_decode_attention(**case, block_size=bs, interpret=True, backend="cuda")


def test_scan_over_layers_traced_layer():
    """Inside jit + lax.scan with the layer index as the scanned (traced) value."""
    rng = np.random.default_rng()
    case, bs = _case(rng, L=2, K=3, poison=False)
    outs, refs = scan_over_layers(sparse_decode_attention_mgpu, case, bs, 2)
    for lyr in range(2):
        npo = np_sparse_decode(case["q"].astype(jnp.float32), case["k_pool"].astype(jnp.float32),
                               case["v_pool"].astype(jnp.float32), case["bias_pool"], case["block_ids"],
                               case["slots"], case["q_pos"], lyr, bs)
        check(np.asarray(outs[lyr].astype(jnp.float32)), np.asarray(refs[lyr].astype(jnp.float32)), npo)


def test_shape_rules():
    rng = np.random.default_rng()
    case, bs = make_case(rng, G=4, D=32, bs=8, poison=False, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="head_dim"):
        sparse_decode_attention_mgpu(**case, block_size=bs, interpret=True)
    case, bs = make_case(rng, G=4, D=64, bs=16, poison=False, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="block_size"):
        sparse_decode_attention_mgpu(**case, block_size=bs, interpret=True)
    case, bs = make_case(rng, G=4, D=64, bs=64, n_logical=3, K=2, poison=False)  # float32 pool
    with pytest.raises(ValueError, match="bfloat16"):
        sparse_decode_attention_mgpu(**case, block_size=bs, interpret=True)


# ------------------------------------------------------------------ GPU (compiled Mosaic GPU kernel)

@pytest.mark.gpu
@pytest.mark.parametrize("Hk", [2, 8])
@pytest.mark.parametrize("bias", [True, False])
def test_gpu_realistic(Hk, bias):
    case, bs = _gpu_case(jax.random.key(Hk + 10 * bias), Hk=Hk, bias=bias)
    ref = sparse_decode_attention_reference(**case, block_size=bs)
    out = sparse_decode_attention_mgpu(**case, block_size=bs)
    assert _rel_err(out, ref) <= 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("k_splits,max_concurrent_steps,p_in_registers",
                         [(1, 2, False), (8, 2, False), (64, 2, False), (16, 3, False), (4, 1, False),
                          (8, 2, True)])
def test_gpu_settings(k_splits, max_concurrent_steps, p_in_registers):
    case, bs = _gpu_case(jax.random.key(k_splits), Hk=2)
    ref = sparse_decode_attention_reference(**case, block_size=bs)
    out = sparse_decode_attention_mgpu(**case, block_size=bs, k_splits=k_splits,
                                       max_concurrent_steps=max_concurrent_steps, p_in_registers=p_in_registers)
    assert _rel_err(out, ref) <= 1e-2


@pytest.mark.gpu
def test_gpu_permuted_pool_and_extreme_bias():
    case, bs = _gpu_case(jax.random.key(7), Hk=8, permuted_pool_blocks=96)
    ref = sparse_decode_attention_reference(**case, block_size=bs)
    out = sparse_decode_attention(**case, block_size=bs, backend="mosaic")
    assert _rel_err(out, ref) <= 1e-2
    case["bias_pool"] = jnp.where(jax.random.bernoulli(jax.random.key(8), 0.5, case["bias_pool"].shape),
                                  1e4, -1e4) + case["bias_pool"]
    ref = sparse_decode_attention_reference(**case, block_size=bs)
    out = sparse_decode_attention_mgpu(**case, block_size=bs, k_splits=16)
    assert _rel_err(out, ref) <= 1e-2


@pytest.mark.gpu
def test_gpu_matches_triton_backend_in_scan():
    """Inside jit + scan with a traced layer (layer 1; layer 0 is NaN): both backends agree."""
    case, bs = _gpu_case(jax.random.key(3), Hk=2, B=4)

    @jax.jit
    def f(c):
        def step(_, layer):
            kw = dict(c, layer=layer)
            return 0, (sparse_decode_attention(**kw, block_size=bs, backend="mosaic"),
                       sparse_decode_attention(**kw, block_size=bs))
        return lax.scan(step, 0, jnp.ones((2,), jnp.int32))[1]

    mos, tri = f(case)
    ref = sparse_decode_attention_reference(**case, block_size=bs)
    for i in range(2):
        assert _rel_err(mos[i], ref) <= 1e-2
        assert _rel_err(mos[i], tri[i]) <= 1e-2


# ------------------------------------------------------------------ CPU: cross-lowering for CUDA

@pytest.mark.parametrize("Hk,bias,k_splits,p_in_registers", [(2, True, 8, False), (8, False, 3, False),
                                                             (8, True, 1, True)])
def test_lowers_for_cuda(Hk, bias, k_splits, p_in_registers):
    """Lower (no GPU needed) for CUDA on an abstract H200 at the model's sizes: the kernel becomes
    one Mosaic GPU custom call, and no layer slice of the stacked pool is materialised outside it.
    (This runs jax's Mosaic GPU lowering of the kernel body, not the device-side compilation.)"""
    from model_utils import h200_lowering_text
    L, B, T, D, bs, K, Hq = 2, 16, 32768, 128, 64, 64, 32
    sd = jax.ShapeDtypeStruct
    args = (sd((B, Hq, D), jnp.bfloat16), sd((L, B, T, Hk, D), jnp.bfloat16), sd((L, B, T, Hk, D), jnp.bfloat16),
            sd((L, B, T, Hk), jnp.float32) if bias else None, sd((B, Hk, K), jnp.int32),
            sd((B, Hk, K), jnp.int32), sd((B,), jnp.int32), sd((), jnp.int32))
    txt = h200_lowering_text(lambda *a: sparse_decode_attention(*a, block_size=bs, k_splits=k_splits,
                                                                backend="mosaic"), *args) if not p_in_registers else \
        h200_lowering_text(lambda *a: sparse_decode_attention_mgpu(*a, block_size=bs, k_splits=k_splits,
                                                                   p_in_registers=True), *args)
    calls = [ln for ln in txt.splitlines() if "stablehlo.custom_call @mosaic_gpu" in ln]
    assert len(calls) == 1
    assert "xla.gpu.triton" not in txt
    assert f"tensor<{B}x{T}x{Hk}x{D}xbf16>" not in txt  # no k_pool[layer] copy
