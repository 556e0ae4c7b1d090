"""pallas_kernels.sparse_decode: the block-sparse NOSA decode kernel.

CPU: the Pallas kernel in (Triton-style) interpret mode against `sparse_decode_attention_reference`
AND an independent float64 NumPy computation written here, on fresh random inputs: G = 1, 4, 16,
ragged q_pos with partial tail blocks, -1 entries, block ids in any order, a permuted smaller pool
(slots != block_ids), bias None / normal / extreme (|bias| up to 1e4), several k_splits, layer > 0
with every other layer (and every token the kernel must not read) filled with NaN, and a `scan`
over layers with a traced layer index; both ways of merging the splits (merge="jnp" and "kernel",
the last program of each (b, kv head) merging via an atomic counter), and the in-kernel merge's
output bit-identical between calls. One CPU test cross-lowers the kernel for CUDA (Triton IR,
abstract H200) at the model's sizes and runs the Triton MLIR verifier on it, which checks the
Triton shape rules interpret mode ignores.

GPU (`@pytest.mark.gpu`, NOSA_TEST_GPU=1 on the GPU machine): the compiled kernel at realistic
sizes (B=16, Hq=32, Hk=2 and 8, D=128, blocks of 64, K=64, T=32768, bf16) against the reference,
relative error <= 1e-2, with both merges (the in-kernel one also bit-identical between calls).
"""

import os

import jax

if os.environ.get("NOSA_TEST_GPU") != "1":
    jax.config.update("jax_platforms", "cpu")

import functools
import math

import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from nosa_jax import nosa
from pallas_kernels.lanes import next_pow2
from pallas_kernels.sparse_decode import (default_k_splits, sparse_decode_attention,
                                          sparse_decode_attention_reference)
from model_utils import verified_triton_modules

NAN = float("nan")
MERGES = ["jnp", "kernel"]


# ------------------------------------------------------------------ independent float64 reference

def np_sparse_decode(q, k_pool, v_pool, bias_pool, block_ids, slots, q_pos, layer, block_size):
    """Float64 NumPy: per (b, kv head), collect the visible tokens by walking the block table."""
    q = np.asarray(q, np.float64)
    k_pool, v_pool = np.asarray(k_pool, np.float64), np.asarray(v_pool, np.float64)
    bias = None if bias_pool is None else np.asarray(bias_pool, np.float64)
    block_ids, slots, q_pos = np.asarray(block_ids), np.asarray(slots), np.asarray(q_pos)
    B, Hq, D = q.shape
    Hk = k_pool.shape[3]
    G = Hq // Hk
    out = np.zeros((B, Hq, D))
    for b in range(B):
        for h in range(Hk):
            toks = []
            for e in range(block_ids.shape[-1]):
                j = int(block_ids[b, h, e])
                if j < 0:
                    continue
                for i in range(block_size):
                    if j * block_size + i <= q_pos[b]:
                        toks.append(int(slots[b, h, e]) * block_size + i)
            if not toks:
                continue
            kk = k_pool[layer, b, toks, h]  # [N, D]
            vv = v_pool[layer, b, toks, h]
            qq = q[b, h * G:(h + 1) * G]  # [G, D]
            logits = qq @ kk.T / math.sqrt(D)
            if bias is not None:
                logits = logits + bias[layer, b, toks, h][None, :]
            logits = logits - logits.max(axis=1, keepdims=True)
            p = np.exp(logits)
            p /= p.sum(axis=1, keepdims=True)
            out[b, h * G:(h + 1) * G] = p @ vv
    return out


# ------------------------------------------------------------------ random cases

def make_case(rng, *, L=3, layer=1, B=3, Hk=2, G=4, D=32, bs=8, n_logical=12, K=6, dtype=np.float32,
              bias="normal", permuted=False, n_slots=None, neg_entries=True, future_entries=True,
              q_pos=None, poison=True):
    """Random inputs. Logical context: n_logical blocks; q_pos ragged with partial tail blocks.

    block_ids: K distinct visible-or-future blocks per (b, h) in random order, some -1 entries.
    permuted: the pool holds only n_slots physical blocks and `slots` is a random injective map
    (entries with id -1 get slot -1). poison: every layer but `layer`, every unused pool slot and
    every pool token after q_pos inside a selected block is NaN (the kernel must not read them).
    """
    Hq = Hk * G
    if q_pos is None:
        top = n_logical * bs - 1
        q_pos = [top, int(rng.integers(bs, top)), int(rng.integers(1, 3 * bs))][:B]
        while len(q_pos) < B:
            q_pos.append(int(rng.integers(0, top + 1)))
        q_pos = [p if p % bs != bs - 1 or i == 0 else p - 1 for i, p in enumerate(q_pos)]  # tails
    q_pos = np.asarray(q_pos, np.int32)
    ids = np.full((B, Hk, K), -1, np.int32)
    for b in range(B):
        qb = int(q_pos[b]) // bs
        pool_ids = np.arange(n_logical if future_entries else qb + 1)
        for h in range(Hk):
            n_neg = int(rng.integers(0, 3)) if neg_entries else 0
            n_take = min(K - n_neg, len(pool_ids))
            pick = rng.choice(pool_ids, size=n_take, replace=False)
            row = np.concatenate([pick, -np.ones(K - n_take, np.int64)])
            ids[b, h] = rng.permutation(row)
    if permuted:
        P = n_slots or K + 2
        slots = np.full((B, Hk, K), -1, np.int32)
        for b in range(B):
            for h in range(Hk):
                perm = rng.permutation(P)
                for e in range(K):
                    if ids[b, h, e] >= 0:
                        slots[b, h, e] = perm[e]
        T = P * bs
    else:
        slots = ids.copy()
        T = n_logical * bs
    k = rng.standard_normal((L, B, T, Hk, D)).astype(np.float32)
    v = rng.standard_normal((L, B, T, Hk, D)).astype(np.float32)
    if bias == "none":
        bp = None
    elif bias == "normal":
        bp = rng.standard_normal((L, B, T, Hk)).astype(np.float32)
    elif bias == "extreme":
        bp = (rng.choice([-1e4, 0.0, 1e4], size=(L, B, T, Hk)) +
              rng.standard_normal((L, B, T, Hk))).astype(np.float32)
    else:
        raise ValueError(bias)
    q = rng.standard_normal((B, Hq, D)).astype(np.float32)
    if dtype != np.float32:  # round once so the float64 reference sees the kernel's inputs
        q, k, v = (np.array(jnp.asarray(x, dtype).astype(jnp.float32)) for x in (q, k, v))
    if poison:
        read = np.zeros((B, T, Hk), bool)
        for b in range(B):
            for h in range(Hk):
                for e in range(K):
                    j = ids[b, h, e]
                    if j < 0:
                        continue
                    for i in range(bs):
                        if j * bs + i <= q_pos[b]:
                            read[b, slots[b, h, e] * bs + i, h] = True
        for x in (k, v) + ((bp,) if bp is not None else ()):
            for lyr in range(L):
                if lyr != layer:
                    x[lyr] = NAN
            x[layer][~read] = NAN
    jd = jnp.dtype(dtype)
    return dict(q=jnp.asarray(q, jd), k_pool=jnp.asarray(k, jd), v_pool=jnp.asarray(v, jd),
                bias_pool=None if bp is None else jnp.asarray(bp), block_ids=jnp.asarray(ids),
                slots=jnp.asarray(slots), q_pos=jnp.asarray(q_pos), layer=jnp.int32(layer)), bs


def run_all(case, bs, kernel=sparse_decode_attention, **kw):
    """(kernel output in interpret mode, jnp reference, float64 NumPy) for one case; `kernel` is
    either backend (the Mosaic GPU tests reuse this)."""
    out = kernel(**case, block_size=bs, interpret=True, **kw)
    ref = sparse_decode_attention_reference(**case, block_size=bs)
    npo = np_sparse_decode(case["q"].astype(jnp.float32), case["k_pool"].astype(jnp.float32),
                           case["v_pool"].astype(jnp.float32), case["bias_pool"], case["block_ids"],
                           case["slots"], case["q_pos"], int(case["layer"]), bs)
    return np.asarray(out.astype(jnp.float32)), np.asarray(ref.astype(jnp.float32)), npo


def check(out, ref, npo, atol=2e-5, rtol=2e-5):
    assert np.isfinite(npo).all()
    assert np.isfinite(ref).all(), "reference produced NaN/Inf"
    assert np.isfinite(out).all(), "kernel produced NaN/Inf"
    np.testing.assert_allclose(ref, npo, atol=atol, rtol=rtol)
    np.testing.assert_allclose(out, npo, atol=atol, rtol=rtol)


# ------------------------------------------------------------------ CPU (interpret mode)

@pytest.mark.parametrize("merge", MERGES)
@pytest.mark.parametrize("G,D,bs", [(1, 32, 8), (4, 64, 16), (16, 32, 8)])
def test_matches_references_per_group_size(G, D, bs, merge):
    rng = np.random.default_rng()
    case, bs = make_case(rng, G=G, D=D, bs=bs, n_logical=10, K=6)
    out, ref, npo = run_all(case, bs, k_splits=2, merge=merge)
    check(out, ref, npo)


@pytest.mark.parametrize("merge", MERGES)
@pytest.mark.parametrize("k_splits", [1, 3, 4, 7, None])  # 7 = K: one entry per split; 3, 4: last split partial
def test_k_splits(k_splits, merge):
    rng = np.random.default_rng()
    case, bs = make_case(rng, G=4, K=7, n_logical=11)
    out, ref, npo = run_all(case, bs, k_splits=k_splits, merge=merge)
    check(out, ref, npo)


@pytest.mark.parametrize("merge", MERGES)
def test_permuted_smaller_pool(merge):
    """Offloaded-cache layout: a pool of 9 physical blocks, slots a random injection, slot -1 for
    unused entries, unused slots NaN; layer 2 of 3."""
    rng = np.random.default_rng()
    case, bs = make_case(rng, L=3, layer=2, G=4, K=7, n_logical=16, permuted=True, n_slots=9)
    assert not np.array_equal(np.asarray(case["slots"]), np.asarray(case["block_ids"]))
    out, ref, npo = run_all(case, bs, k_splits=3, merge=merge)
    check(out, ref, npo)


@pytest.mark.parametrize("merge", MERGES)
def test_bias_none(merge):
    rng = np.random.default_rng()
    case, bs = make_case(rng, G=4, bias="none")
    out, ref, npo = run_all(case, bs, k_splits=2, merge=merge)
    check(out, ref, npo)


@pytest.mark.parametrize("merge", MERGES)
@pytest.mark.parametrize("k_splits", [1, 3, 7])  # K=7: 3 splits of 3, 3, 1 entries; 7 of one each
def test_extreme_bias(k_splits, merge):
    """|bias| up to 1e4: the running max must include the bias (no exp overflow, no NaN)."""
    rng = np.random.default_rng()
    case, bs = make_case(rng, G=4, bias="extreme", K=7)
    out, ref, npo = run_all(case, bs, k_splits=k_splits, merge=merge)
    # logits ~1e4 carry float32 rounding of ~1e-3 absolute, hence the looser tolerance
    check(out, ref, npo, atol=5e-3, rtol=5e-3)


@pytest.mark.parametrize("merge", MERGES)
def test_rows_without_visible_keys_are_zero(merge):
    """(b=0,h=1) only -1 entries; b=1 sees only future blocks; b=2 at q_pos 0 sees one token."""
    rng = np.random.default_rng()
    case, bs = make_case(rng, B=3, G=4, K=5, n_logical=8, q_pos=[40, 3, 0], neg_entries=False, poison=False)
    ids = np.asarray(case["block_ids"]).copy()
    ids[0, 1] = -1
    ids[1] = np.array([[3, 1, 7, 5, 2], [6, 4, 2, 1, 3]])  # q_pos 3 -> only block 0 visible: none here
    ids[2, 0] = np.array([4, 0, 2, 6, 1])
    case["block_ids"] = case["slots"] = jnp.asarray(ids)
    out, ref, npo = run_all(case, bs, k_splits=2, merge=merge)
    check(out, ref, npo)
    G = 4
    assert np.all(out[0, G:2 * G] == 0) and np.all(out[1] == 0)
    assert np.any(out[2, :G] != 0)


@pytest.mark.parametrize("merge", MERGES)
def test_bf16(merge):
    rng = np.random.default_rng()
    case, bs = make_case(rng, G=16, D=64, bs=16, K=6, dtype=jnp.bfloat16)
    out, ref, npo = run_all(case, bs, k_splits=3, merge=merge)
    check(out, ref, npo, atol=2e-2, rtol=2e-2)  # bf16 output rounding, P cast to bf16 for P.V
    assert np.linalg.norm(out - npo) / np.linalg.norm(npo) < 1e-2


def test_reference_equals_model_math():
    """With slots == block_ids the reference (and the kernel) equal nosa.gathered_block_attention
    on the layer slice (finite data everywhere, as in the model's cache)."""
    rng = np.random.default_rng()
    case, bs = make_case(rng, G=4, poison=False)
    lyr = int(case["layer"])
    model = nosa.gathered_block_attention(case["q"], case["q_pos"], case["k_pool"][lyr], case["v_pool"][lyr],
                                          case["bias_pool"][lyr], case["block_ids"], bs)
    out, ref, _ = run_all(case, bs, k_splits=2)
    np.testing.assert_allclose(ref, np.asarray(model), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out, np.asarray(model), atol=2e-5, rtol=2e-5)


def scan_over_layers(kernel, case, bs, n_layers):
    """The kernel (interpret mode, 2 splits) and the reference inside jit + lax.scan with the layer
    index as the scanned (traced) value; returns the per-layer (outputs, references)."""

    @jax.jit
    def both(c):
        def step(carry, layer):
            kw = dict(c, layer=layer)
            o = kernel(**kw, block_size=bs, k_splits=2, interpret=True)
            r = sparse_decode_attention_reference(**kw, block_size=bs)
            return carry, (o, r)
        return lax.scan(step, 0, jnp.arange(n_layers, dtype=jnp.int32))[1]

    return both(case)


@pytest.mark.parametrize("merge", MERGES)
def test_scan_over_layers_traced_layer(merge):
    """Called inside jit + lax.scan with the layer index as the scanned (traced) value (merge="kernel":
    the split counter must start from zero in every step)."""
    rng = np.random.default_rng()
    case, bs = make_case(rng, L=3, G=4, K=5, poison=False)
    outs, refs = scan_over_layers(functools.partial(sparse_decode_attention, merge=merge), case, bs, 3)
    for lyr in range(3):
        npo = np_sparse_decode(case["q"], case["k_pool"], case["v_pool"], case["bias_pool"], case["block_ids"],
                               case["slots"], case["q_pos"], lyr, bs)
        check(np.asarray(outs[lyr]), np.asarray(refs[lyr]), npo)


@pytest.mark.parametrize("G,k_splits", [(4, 6), (16, 11)])
def test_kernel_merge_in_chunks(G, k_splits):
    """merge="kernel" at D=128, where the merging program reads o in chunks of 4 splits
    (sparse_decode.MERGE_CHUNK): 6 splits = 2 chunks, 11 = 3 (split axis padded to 8 / 16, the last
    chunk partial)."""
    rng = np.random.default_rng()
    case, bs = make_case(rng, G=G, D=128, K=k_splits, n_logical=k_splits + 3)
    out, ref, npo = run_all(case, bs, k_splits=k_splits, merge="kernel")
    check(out, ref, npo)


def test_kernel_merge_is_repeatable():
    """merge="kernel": the merging program combines the splits in a fixed order (not in the order
    they finished) and the counter is zeroed in every call, so repeated calls, separate or in one
    jit, are bit-identical (and G=6 exercises a group padded to 16 rows with a partial last split)."""
    rng = np.random.default_rng()
    case, bs = make_case(rng, B=3, Hk=2, G=6, K=7, n_logical=11)
    f = functools.partial(sparse_decode_attention, block_size=bs, k_splits=3, interpret=True, merge="kernel")
    first, second = np.asarray(f(**case)), np.asarray(f(**case))
    np.testing.assert_array_equal(first, second)

    @jax.jit
    def steps(c):  # one executable running the kernel in three scan steps (a traced, equal layer)
        return lax.scan(lambda carry, lyr: (carry, f(**dict(c, layer=lyr))), 0, jnp.full((3,), c["layer"]))[1]

    for out in np.asarray(steps(case)):
        np.testing.assert_array_equal(out, first)
    out, ref, npo = run_all(case, bs, k_splits=3, merge="kernel")
    np.testing.assert_array_equal(out, first)
    check(out, ref, npo)


@pytest.mark.parametrize("merge", MERGES)
def test_carried_counter(merge):
    """count= (the split counter a cache carries): each of three calls matches the references, the
    counter comes back all zero, and a carried counter that was not reset would make the next
    in-kernel merge skip (so the second call would fail). A wrong shape or dtype is refused."""
    rng = np.random.default_rng()
    count = jnp.zeros((3, 2), jnp.int32)
    for _ in range(3):
        case, bs = make_case(rng, B=3, Hk=2, G=4, K=7, n_logical=11)
        out, count = sparse_decode_attention(**case, block_size=bs, k_splits=3, interpret=True, merge=merge,
                                             count=count)
        _, ref, npo = run_all(case, bs, k_splits=3, merge=merge)
        check(np.asarray(out.astype(jnp.float32)), ref, npo)
        np.testing.assert_array_equal(np.asarray(count), np.zeros((3, 2), np.int32))
    for bad in (jnp.zeros((3, 3), jnp.int32), jnp.zeros((3, 2), jnp.float32)):
        with pytest.raises(ValueError, match="count"):
            sparse_decode_attention(**case, block_size=bs, interpret=True, count=bad)


def test_merge_argument_checked():
    rng = np.random.default_rng()
    case, bs = make_case(rng, G=4, bs=8, poison=False)
    with pytest.raises(ValueError, match="unknown merge"):
        sparse_decode_attention(**case, block_size=bs, interpret=True, merge="xla")
    with pytest.raises(ValueError, match="only implemented for backend='triton'"):
        sparse_decode_attention(**case, block_size=bs, interpret=True, backend="mosaic", merge="kernel")


def test_auto_merge_merges_in_the_kernel_up_to_the_split_limit():
    """merge="auto" (the default) merges inside the kernel up to KERNEL_MERGE_MAX_SPLITS splits, in
    jnp beyond (where the serial merge in one program was measured slower), with the same result."""
    from pallas_kernels import sparse_decode

    rng = np.random.default_rng()
    limit = sparse_decode.KERNEL_MERGE_MAX_SPLITS
    K = 4 * (limit + 1)  # every split count below divides the entries without an empty split
    case, bs = make_case(rng, G=4, bs=8, n_logical=K + 4, K=K, poison=False)
    ref = np.asarray(sparse_decode_attention_reference(**case, block_size=bs))
    for ks, in_kernel in ((2, True), (limit, True), (limit + 1, False), (2 * (limit + 1), False)):
        run = functools.partial(sparse_decode_attention, block_size=bs, interpret=True, k_splits=ks)
        jaxpr = str(jax.make_jaxpr(lambda c: run(**c))(case))
        assert ("atomic_rmw" in jaxpr) == in_kernel, ks
        np.testing.assert_allclose(np.asarray(run(**case)), ref, atol=2e-5, rtol=2e-5)


def test_default_k_splits():
    for B, Hk, K in [(1, 2, 64), (16, 2, 64), (16, 8, 64), (64, 8, 64), (4, 8, 64), (1, 1, 5), (2, 2, 1)]:
        ks = default_k_splits(B, Hk, K, sms=132)
        assert 1 <= ks <= K
        per = -(-K // ks)
        assert -(-K // per) == ks  # no empty split
        assert B * Hk * ks >= min(264, B * Hk * K) // 2
    assert default_k_splits(1, 2, 64, sms=132) == 64


def test_gpu_shape_rules_enforced():
    rng = np.random.default_rng()
    case, bs = make_case(rng, G=4, bs=8, poison=False)
    with pytest.raises(ValueError, match="power of two"):
        sparse_decode_attention(**case, block_size=bs, interpret=False)


@pytest.mark.parametrize("merge", MERGES)
@pytest.mark.parametrize("Hk,bias,k_splits", [(2, True, 8), (2, True, 64), (8, False, 3), (6, True, 5),
                                               (6, True, 1)])
def test_lowers_to_triton_for_cuda(Hk, bias, k_splits, merge):
    """Cross-lower (no GPU needed) at the model's sizes: the Triton lowering accepts the kernels and
    the Triton MLIR verifier passes (power-of-two tensor sizes), the kernel has grid (B, Hk, k_splits),
    and no layer slice of the stacked pool is materialised outside the kernel. Hk=6 uses Hq=48: G=8,
    padded to 16 rows; k_splits=5 leaves the last split partial; with 64 splits the in-kernel merge
    reads 16 chunks. merge="kernel" (k_splits > 1): one acq_rel gpu-scope atomic add on the counter
    between two CTA barriers, and the kernel's output is the result."""
    L, B, T, D, bs, K = 4, 16, 32768, 128, 64, 64
    Hq = 48 if Hk == 6 else 32
    sd = jax.ShapeDtypeStruct
    args = (sd((B, Hq, D), jnp.bfloat16), sd((L, B, T, Hk, D), jnp.bfloat16), sd((L, B, T, Hk, D), jnp.bfloat16),
            sd((L, B, T, Hk), jnp.float32) if bias else None, sd((B, Hk, K), jnp.int32),
            sd((B, Hk, K), jnp.int32), sd((B,), jnp.int32), sd((), jnp.int32))
    txt, modules = verified_triton_modules(
        lambda *a: sparse_decode_attention(*a, block_size=bs, k_splits=k_splits, merge=merge), *args)
    calls = [ln for ln in txt.splitlines() if "xla.gpu.triton" in ln]
    assert len(calls) == 1 and len(modules) == 1
    assert f"grid_x = {B} " in calls[0] and f"grid_y = {Hk} " in calls[0] and f"grid_z = {k_splits} " in calls[0]
    assert f"tensor<{B}x{T}x{Hk}x{D}xbf16>" not in txt  # no k_pool[layer] copy
    atomics = [ln for ln in modules[0].splitlines() if "tt.atomic_rmw" in ln]
    if merge == "kernel" and k_splits > 1:
        assert len(atomics) == 1 and "tt.atomic_rmw add, acq_rel, gpu" in atomics[0]
        barriers = [i for i, ln in enumerate(modules[0].splitlines()) if "gpu.barrier" in ln]
        assert len(barriers) == 2 and barriers[0] < modules[0].splitlines().index(atomics[0]) < barriers[1]
        result = calls[0].split("=")[0].strip().split(":")[0]  # "%3:5 = stablehlo.custom_call ..." -> "%3"
        assert f"return {result}#0 : tensor<{B}x{Hq}x{D}xbf16>" in txt  # no slice or merge after the kernel
    else:
        assert not atomics


def test_next_pow2():
    assert [next_pow2(n) for n in (0, 1, 2, 3, 4, 5, 16, 17)] == [1, 1, 2, 4, 4, 8, 16, 32]


# ------------------------------------------------------------------ GPU (compiled Triton kernel)

def _gpu_case(key, *, L=2, layer=1, B=16, Hq=32, Hk=2, D=128, bs=64, K=64, T=32768, bias=True,
              permuted_pool_blocks=None):
    """Realistic decode inputs built on the device. Ragged q_pos in [K*bs, T); each (b, h) picks
    K distinct blocks <= the query's block (always including it: partial tail) in random order,
    with a few -1 entries; layer 0 is NaN. permuted_pool_blocks: a pool of that many physical
    blocks and a random injective slot map instead of slots == ids."""
    rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2**31 - 1)))
    q_pos = rng.integers(K * bs, T, size=B).astype(np.int32)
    q_pos[0] = T - 1
    q_pos[1] = K * bs + 5
    ids = np.empty((B, Hk, K), np.int32)
    for b in range(B):
        qb = q_pos[b] // bs
        for h in range(Hk):
            row = np.concatenate([[qb], rng.choice(qb, size=K - 1, replace=False)])
            row[rng.integers(1, K, size=2)] = -1
            ids[b, h] = rng.permutation(row)
    if permuted_pool_blocks:
        P = permuted_pool_blocks
        slots = np.stack([np.stack([rng.permutation(P)[:K] for _ in range(Hk)]) for _ in range(B)]).astype(np.int32)
        slots[ids < 0] = -1
        T = P * bs
    else:
        slots = ids
    ks = jax.random.split(key, 4)
    shape = (L, B, T, Hk, D)
    k = jax.random.normal(ks[0], shape, jnp.bfloat16).at[0].set(jnp.nan)
    v = jax.random.normal(ks[1], shape, jnp.bfloat16).at[0].set(jnp.nan)
    bp = (jax.random.normal(ks[2], shape[:4], jnp.float32) * 2).at[0].set(jnp.nan) if bias else None
    q = jax.random.normal(ks[3], (B, Hq, D), jnp.bfloat16)
    return dict(q=q, k_pool=k, v_pool=v, bias_pool=bp, block_ids=jnp.asarray(ids), slots=jnp.asarray(slots),
                q_pos=jnp.asarray(q_pos), layer=jnp.int32(layer)), bs


def _rel_err(out, ref):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(ref).all() and np.isfinite(out).all()
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


@pytest.mark.gpu
@pytest.mark.parametrize("merge", MERGES)
@pytest.mark.parametrize("Hk", [2, 8])
@pytest.mark.parametrize("bias", [True, False])
def test_gpu_realistic(Hk, bias, merge):
    case, bs = _gpu_case(jax.random.key(Hk + 10 * bias), Hk=Hk, bias=bias)
    ref = sparse_decode_attention_reference(**case, block_size=bs)
    out = sparse_decode_attention(**case, block_size=bs, merge=merge)
    assert _rel_err(out, ref) <= 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("merge", MERGES)
@pytest.mark.parametrize("k_splits,num_warps,num_stages", [(1, 4, 2), (8, 4, 2), (64, 4, 2), (16, 8, 3), (4, 4, 1),
                                                           (5, 4, 2)])  # 5: 13 entries per split, the last 12
def test_gpu_settings(k_splits, num_warps, num_stages, merge):
    case, bs = _gpu_case(jax.random.key(k_splits), Hk=2)
    ref = sparse_decode_attention_reference(**case, block_size=bs)
    out = sparse_decode_attention(**case, block_size=bs, k_splits=k_splits, num_warps=num_warps,
                                  num_stages=num_stages, merge=merge)
    assert _rel_err(out, ref) <= 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("merge", MERGES)
def test_gpu_permuted_pool_and_extreme_bias(merge):
    case, bs = _gpu_case(jax.random.key(7), Hk=8, permuted_pool_blocks=96)
    ref = sparse_decode_attention_reference(**case, block_size=bs)
    out = sparse_decode_attention(**case, block_size=bs, merge=merge)
    assert _rel_err(out, ref) <= 1e-2
    case["bias_pool"] = jnp.where(jax.random.bernoulli(jax.random.key(8), 0.5, case["bias_pool"].shape),
                                  1e4, -1e4) + case["bias_pool"]
    ref = sparse_decode_attention_reference(**case, block_size=bs)
    out = sparse_decode_attention(**case, block_size=bs, k_splits=16, merge=merge)
    assert _rel_err(out, ref) <= 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("Hq,Hk,k_splits", [(32, 2, 8), (32, 8, 3), (12, 2, 64)])
def test_gpu_kernel_merge_repeatable(Hq, Hk, k_splits):
    """merge="kernel" on the GPU, where the splits really finish in any order: bit-identical between
    calls (separate, and 8 steps of one scan reusing the counter's buffer), and a (b, kv head) with no
    visible key gives 0. Hq=12 (G=6) pads the group to 16 rows."""
    case, bs = _gpu_case(jax.random.key(11), Hq=Hq, Hk=Hk)
    ids = case["block_ids"].at[3, 0].set(-1)  # (b=3, h=0): no visible key
    case = dict(case, block_ids=ids, slots=ids)
    f = functools.partial(sparse_decode_attention, block_size=bs, k_splits=k_splits, merge="kernel")
    ref = sparse_decode_attention_reference(**case, block_size=bs)
    first = np.asarray(f(**case).astype(jnp.float32))
    assert _rel_err(first, ref) <= 1e-2
    G = Hq // Hk
    assert np.all(first[3, :G] == 0)
    np.testing.assert_array_equal(np.asarray(f(**case).astype(jnp.float32)), first)
    steps = jax.jit(lambda c: lax.scan(lambda carry, lyr: (carry, f(**dict(c, layer=lyr))), 0,
                                       jnp.full((8,), c["layer"]))[1])(case)
    for i in range(8):
        np.testing.assert_array_equal(np.asarray(steps[i].astype(jnp.float32)), first)


@pytest.mark.gpu
def test_gpu_scan_over_layers():
    """Inside jit + scan with a traced layer: layer 1 of the pool (layer 0 is NaN and is never read
    because the scan only visits layer 1 and the result must be finite)."""
    case, bs = _gpu_case(jax.random.key(3), Hk=2, B=4)

    @jax.jit
    def f(c):
        def step(q, layer):
            o = sparse_decode_attention(**dict(c, q=q, layer=layer), block_size=bs)
            return o, o
        return lax.scan(step, c["q"], jnp.ones((3,), jnp.int32))[1]

    outs = f(case)
    q = case["q"]
    for i in range(3):
        ref = sparse_decode_attention_reference(**dict(case, q=q), block_size=bs)
        assert _rel_err(outs[i], ref) <= 1e-2
        q = outs[i]
