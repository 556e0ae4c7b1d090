"""pallas_kernels.sparse_decode.sparse_decode_attention_fetch: the offloaded step's loads and the
decode attention in one kernel.

CPU: the kernel in interpret mode against an independent NumPy replay on fresh random inputs: the
pools must equal, bit for bit, the pools after copying every miss's block from the host store (K,
V, and the bias rows from the cis history) and writing the new token into its row, and the output
must equal the float64 attention (`np_sparse_decode`) over those pools. Cases: misses and hits
mixed in any entry order, the new token's own block a hit (only its row is written) or a miss (a
new block: the store's rows past the token are garbage and must not reach the output), a stopped
sequence (no loads, no token), -1 entries, ragged positions, every pool slot a miss takes or the
query must not see filled with NaN, every other layer NaN (must stay untouched), the store in
device or pinned_host memory, bias used or only written (the infllmv2 mode), one split or several,
both merges. The same pools as `kv_loader.load_blocks`. One test cross-lowers the kernel for CUDA
at the 8B decode's sizes and runs the Triton MLIR verifier.

GPU (`@pytest.mark.gpu`): the compiled kernel reading a pinned_host store at realistic sizes
against load_blocks + the reference attention (pools bit-exact, output relative error <= 1e-2).
"""

import os

import jax

if os.environ.get("NOSA_TEST_GPU") != "1":
    jax.config.update("jax_platforms", "cpu")

import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import SingleDeviceSharding

from pallas_kernels.kv_loader import load_blocks
from pallas_kernels.sparse_decode import (Fetch, sparse_decode_attention_fetch,
                                          sparse_decode_attention_reference)
from model_utils import np_load_blocks, verified_triton_modules
from test_kernel_sparse_decode import np_sparse_decode

NAN = float("nan")


def _bits(x):
    x = np.asarray(x)
    return x.view(np.uint16) if x.dtype.itemsize == 2 else x.view(np.uint32)


def make_fetch_case(rng, *, L=3, layer=1, B=4, Hk=2, G=4, D=32, bs=8, NB=10, S=12, K=6, dtype=np.float32,
                    miss_rate=0.4):
    """Random offloaded-step inputs (see the module docstring). Sequence 0's token opens a new
    block that is a miss; the last sequence has stopped."""
    q_pos = rng.integers(bs, NB * bs - 1, size=B).astype(np.int32)
    q_pos[0] = int(rng.integers(1, NB - 1)) * bs  # the first token of a new block
    ids = np.full((B, Hk, K), -1, np.int32)
    slots = np.full((B, Hk, K), -1, np.int32)
    loads = np.full((B, Hk, K), -1, np.int32)
    rows = np.full((B, Hk), -1, np.int32)
    live = np.ones(B, bool)
    live[B - 1] = False
    for b in range(B):
        qb = int(q_pos[b]) // bs
        for h in range(Hk):
            others = rng.choice(qb, size=min(qb, K - 1 - int(rng.integers(0, 2))), replace=False)
            row = np.concatenate([[qb], others, -np.ones(K - 1 - len(others), np.int64)])
            perm = rng.permutation(K)
            ids[b, h] = row[perm]
            slots[b, h] = np.where(ids[b, h] >= 0, rng.permutation(S)[:K], -1)
            if live[b]:
                miss = (ids[b, h] >= 0) & (rng.random(K) < miss_rate)
                miss[ids[b, h] == qb] = b == 0  # sequence 0: its own (new) block is a miss
                loads[b, h] = np.where(miss, ids[b, h], -1)
                own = int(slots[b, h][ids[b, h] == qb][0])
                rows[b, h] = own * bs + int(q_pos[b]) % bs
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    host = f(L, B, Hk, NB, 2, bs, D)
    cis = f(L, B, NB * bs, Hk)
    pk, pv, pb = f(L, B, S * bs, Hk, D), f(L, B, S * bs, Hk, D), f(L, B, S * bs, Hk)
    new_k, new_v, new_c = f(B, Hk, D), f(B, Hk, D), f(B, Hk)
    # What the kernel must not read: other layers, slots a miss overwrites, pool rows past the query.
    for x in (pk, pv, pb):
        for lyr in range(L):
            if lyr != layer:
                x[lyr] = NAN
    seen = np.zeros((B, S * bs, Hk), bool)
    for b in range(B):
        for h in range(Hk):
            for e in range(K):
                j, s = ids[b, h, e], slots[b, h, e]
                if j >= 0 and loads[b, h, e] < 0:
                    n = min(bs, int(q_pos[b]) - j * bs + 1)
                    seen[b, s * bs:s * bs + n, h] = True
    for x in (pk, pv, pb):
        x[layer][~seen] = NAN
    qb0 = int(q_pos[0]) // bs
    host[layer, 0, :, qb0, :, 1:] = NAN  # the new block's rows past its first token: never written yet
    cis[layer, 0, qb0 * bs + 1:(qb0 + 1) * bs] = NAN
    q = f(B, Hk * G, D)
    if dtype != np.float32:  # round once so the references see the kernel's inputs
        q, host, pk, pv, new_k, new_v = (np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))
                                         for x in (q, host, pk, pv, new_k, new_v))
    return dict(q=q, pk=pk, pv=pv, pb=pb, ids=ids, slots=slots, q_pos=q_pos, layer=layer, host=host, cis=cis,
                loads=loads, new_k=new_k, new_v=new_v, new_c=new_c, rows=rows, bs=bs, dtype=dtype)


def np_fetch(c):
    """NumPy replay of the loads and the token write: the expected pools."""
    return np_load_blocks((c["pk"], c["pv"], c["pb"]), c["host"], c["cis"], c["layer"], c["loads"], c["slots"],
                          c["bs"], new=(c["new_k"], c["new_v"], c["new_c"], c["rows"]))


def run_fetch(c, *, host_kind="device", use_bias=True, count=None, v_heads=None, **kw):
    """v_heads: hand new_v over as [B, v_heads, D] with the values in its last Hk heads (as the
    model passes its q|k|v projection), the heads before them random."""
    jd = jnp.dtype(c["dtype"])
    new_v = c["new_v"]
    if v_heads is not None:
        B, Hk, D = new_v.shape
        junk = np.random.default_rng(9).standard_normal((B, v_heads - Hk, D)).astype(new_v.dtype)
        new_v = np.concatenate([junk, new_v], axis=1)
    host = jnp.asarray(c["host"], jd)
    if host_kind == "pinned_host":
        host = jax.device_put(host, SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host"))
    fetch = Fetch(host_kv=host, cis=jnp.asarray(c["cis"]), loads=jnp.asarray(c["loads"]),
                  new_k=jnp.asarray(c["new_k"], jd), new_v=jnp.asarray(new_v, jd),
                  new_cis=jnp.asarray(c["new_c"]), new_row=jnp.asarray(c["rows"]), count=count)
    return sparse_decode_attention_fetch(
        jnp.asarray(c["q"], jd), jnp.asarray(c["pk"], jd), jnp.asarray(c["pv"], jd), jnp.asarray(c["pb"]),
        jnp.asarray(c["ids"]), jnp.asarray(np.maximum(c["slots"], 0)), jnp.asarray(c["q_pos"]), jnp.int32(c["layer"]),
        fetch, block_size=c["bs"], use_bias=use_bias, **kw)


def check_fetch(c, got, use_bias=True, atol=2e-5, rtol=2e-5):
    out, *pools, count = got
    assert count is None or np.array_equal(np.asarray(count), np.zeros(c["rows"].shape, np.int32))
    want = np_fetch(c)
    for g, w in zip(pools, want):
        assert g.shape == w.shape
        np.testing.assert_array_equal(_bits(np.asarray(g).astype(np.float32)), _bits(w.astype(np.float32)))
    npo = np_sparse_decode(c["q"], want[0], want[1], want[2] if use_bias else None, c["ids"], c["slots"], c["q_pos"],
                           c["layer"], c["bs"])
    assert np.isfinite(npo).all()
    out = np.asarray(out.astype(jnp.float32))
    assert np.isfinite(out).all(), "kernel produced NaN/Inf"
    np.testing.assert_allclose(out, npo, atol=atol, rtol=rtol)


@pytest.mark.parametrize("merge", ["jnp", "kernel"])
@pytest.mark.parametrize("k_splits", [1, 2, 4])
@pytest.mark.parametrize("host_kind", ["device", "pinned_host"])
def test_fetch_matches_numpy(k_splits, merge, host_kind):
    c = make_fetch_case(np.random.default_rng())
    check_fetch(c, run_fetch(c, host_kind=host_kind, k_splits=k_splits, merge=merge, interpret=True))


@pytest.mark.parametrize("k_splits", [1, 3])
def test_fetch_carried_merge_counter(k_splits):
    """The merge counter carried from call to call (`Fetch.count`, as the offloaded cache keeps one):
    the kernel hands it back zero, so the next call's last program merges again. Without the reset
    the second call's counts would start at k_splits, no program would merge, and its output would
    be whatever the output buffer held."""
    rng = np.random.default_rng()
    count = jnp.zeros((4, 2), jnp.int32)  # make_fetch_case's default B, Hk
    for _ in range(3):
        c = make_fetch_case(rng)
        got = run_fetch(c, k_splits=k_splits, merge="kernel", count=count, interpret=True)
        check_fetch(c, got)  # includes: the returned counter is all zero
        count = got[-1]
    bad = jnp.zeros((4, 3), jnp.int32)
    with pytest.raises(ValueError, match="count"):
        run_fetch(c, k_splits=2, count=bad, interpret=True)


def test_fetch_reads_the_values_from_the_projection():
    """new_v given as the model's whole q|k|v projection [B, Hq + 2 Hk, D]: the kernel takes the new
    token's values from its last Hk heads (the pools and output as with new_v alone); a new_v with
    fewer than Hk heads is refused."""
    c = make_fetch_case(np.random.default_rng(), G=4)
    check_fetch(c, run_fetch(c, k_splits=2, v_heads=4 * 2 + 2 * 2, interpret=True))
    with pytest.raises(ValueError, match="new_v"):
        run_fetch(dict(c, new_v=c["new_v"][:, :1]), interpret=True)


@pytest.mark.parametrize("G", [1, 16])
def test_fetch_without_bias_in_the_logits(G):
    """The infllmv2 mode: the bias pool is still written (the same pool state) but not attended with."""
    c = make_fetch_case(np.random.default_rng(), G=G)
    check_fetch(c, run_fetch(c, use_bias=False, k_splits=2, interpret=True), use_bias=False)


@pytest.mark.parametrize("miss_rate", [0.0, 1.0])
def test_fetch_all_hits_and_all_misses(miss_rate):
    c = make_fetch_case(np.random.default_rng(), miss_rate=miss_rate, K=7)  # K=7: the last split is partial
    if miss_rate == 0.0:
        assert (c["loads"][1:] < 0).all()
    check_fetch(c, run_fetch(c, k_splits=3, interpret=True))


def test_fetch_bf16_same_pools_as_load_blocks():
    """bf16 (the model's dtype): the pools equal kv_loader.load_blocks' (xla path) bit for bit, and
    the output the reference attention over them."""
    c = make_fetch_case(np.random.default_rng(), dtype=jnp.bfloat16, G=16, D=64, bs=16)
    got = run_fetch(c, interpret=True)
    check_fetch(c, got, atol=2e-2, rtol=2e-2)
    jd = jnp.bfloat16
    pools = load_blocks(jnp.asarray(c["host"], jd), jnp.asarray(c["cis"]), jnp.asarray(c["pk"], jd),
                        jnp.asarray(c["pv"], jd), jnp.asarray(c["pb"]), jnp.int32(c["layer"]), jnp.asarray(c["loads"]),
                        jnp.asarray(np.maximum(c["slots"], 0)), block_size=c["bs"], new_k=jnp.asarray(c["new_k"], jd),
                        new_v=jnp.asarray(c["new_v"], jd), new_cis=jnp.asarray(c["new_c"]),
                        new_row=jnp.asarray(c["rows"]), path="xla")
    for g, w in zip(got[1:], pools):
        np.testing.assert_array_equal(_bits(g), _bits(w))


def test_fetch_argument_checks():
    c = make_fetch_case(np.random.default_rng(0))
    c["host"] = c["host"][:, :, :, :, :, :4]  # blocks of 4 rows in the store, 8 in the pool
    with pytest.raises(ValueError, match="host_kv"):
        run_fetch(c, interpret=True)


def test_fetch_lowers_to_one_verified_triton_kernel():
    """At the 8B decode's sizes (B=16, 32/2 heads, D=128, blocks of 64, K=64, 8 splits, merge in the
    kernel, the values read from the q|k|v projection as the model hands them), cross-lowered for
    CUDA: one Triton call with the three pools aliased to its outputs (plus the merge counter), the
    pinned_host store passed straight in, and the module passes the Triton MLIR verifier."""
    L, B, Hq, Hk, D, bs, K, S, NB = 2, 16, 32, 2, 128, 64, 64, 128, 256
    sd = jax.ShapeDtypeStruct
    pin = SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host")
    host = jax.device_put(jnp.zeros((L, B, Hk, NB, 2, bs, D), jnp.bfloat16), pin)

    def f(q, pk, pv, pb, ids, slots, pos, cis, loads, nk, nv, nc, row):
        return sparse_decode_attention_fetch(q, pk, pv, pb, ids, slots, pos, jnp.int32(1),
                                             Fetch(host, cis, loads, nk, nv, nc, row), block_size=bs, k_splits=8,
                                             merge="kernel")

    txt, modules = verified_triton_modules(
        f, sd((B, Hq, D), jnp.bfloat16), sd((L, B, S * bs, Hk, D), jnp.bfloat16),
        sd((L, B, S * bs, Hk, D), jnp.bfloat16), sd((L, B, S * bs, Hk), jnp.float32), sd((B, Hk, K), jnp.int32),
        sd((B, Hk, K), jnp.int32), sd((B,), jnp.int32), sd((L, B, NB * bs, Hk), jnp.float32),
        sd((B, Hk, K), jnp.int32), sd((B, Hk, D), jnp.bfloat16), sd((B, Hq + 2 * Hk, D), jnp.bfloat16),
        sd((B, Hk), jnp.float32), sd((B, Hk), jnp.int32))
    calls = [ln for ln in txt.splitlines() if "xla.gpu.triton" in ln]
    assert len(calls) == 1 and len(modules) == 1 and "nosa_sparse_decode_fetch" in calls[0]
    assert calls[0].count("output_operand_alias<") == 4
    assert "annotate_device_placement" not in txt


# ------------------------------------------------------------------ GPU (compiled Triton kernel)

@pytest.mark.gpu
@pytest.mark.parametrize("use_bias", [True, False])
def test_gpu_fetch_pinned_store(use_bias):
    """8B decode sizes, the store in pinned_host memory (read in place over PCIe): pools bit-exact
    against load_blocks (its pallas path), output against the reference attention over them."""
    rng = np.random.default_rng(5 + use_bias)
    L, B, Hk, G, D, bs, NB, S, K = 2, 16, 2, 16, 128, 64, 64, 128, 64
    c = make_fetch_case(rng, L=L, B=B, Hk=Hk, G=G, D=D, bs=bs, NB=NB, S=S, K=K, dtype=jnp.bfloat16, miss_rate=0.1)
    out, *pools = run_fetch(c, host_kind="pinned_host", use_bias=use_bias)
    jd = jnp.bfloat16
    host = jax.device_put(jnp.asarray(c["host"], jd), SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host"))
    want = load_blocks(host, jnp.asarray(c["cis"]), jnp.asarray(c["pk"], jd), jnp.asarray(c["pv"], jd),
                       jnp.asarray(c["pb"]), jnp.int32(c["layer"]), jnp.asarray(c["loads"]),
                       jnp.asarray(np.maximum(c["slots"], 0)), block_size=bs, new_k=jnp.asarray(c["new_k"], jd),
                       new_v=jnp.asarray(c["new_v"], jd), new_cis=jnp.asarray(c["new_c"]),
                       new_row=jnp.asarray(c["rows"]), path="pallas")
    for g, w in zip(pools, want):
        np.testing.assert_array_equal(_bits(g), _bits(w))
    ref = sparse_decode_attention_reference(jnp.asarray(c["q"], jd), *want[:2], want[2] if use_bias else None,
                                            jnp.asarray(c["ids"]), jnp.asarray(np.maximum(c["slots"], 0)),
                                            jnp.asarray(c["q_pos"]), jnp.int32(c["layer"]), block_size=bs)
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(out).all() and np.isfinite(ref).all()
    assert float(np.linalg.norm(out - ref) / np.linalg.norm(ref)) <= 1e-2
