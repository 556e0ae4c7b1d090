"""pallas_kernels.selection_prefill (the prefill selection: stage-1 window scores kernel, pooling,
fused two-stage top-k) against the jnp reference (nosa.stage1_scores, nosa.select_blocks) and the
independent float64 NumPy reference (tests/np_reference.py, written from the spec).

CPU: Pallas interpret mode, small shapes, fresh random inputs: G = 1, 4, 6 (a padded group) and 16;
ragged kv_len; chunks starting mid-sequence and at 0 (tokens with no visible window); Tc not a
multiple of the token tile; bf16 (the model's case: one native dot) and float32 (a float32-accurate
dot); layer > 0 with every other layer of the pool NaN, as are the windows past each sequence's
n_win in the layer read. A CUDA cross-lowering at the model's sizes checks the Triton shape rules
that interpret mode ignores. GPU (`-m gpu`, NOSA_TEST_GPU=1): a 2048-token chunk at 28K of a 32K
context and a 4096-token chunk at 0, Hq=32, Hk=2, D=128, bf16.
"""

import os

import jax

if os.environ.get("NOSA_TEST_GPU") != "1":
    jax.config.update("jax_platforms", "cpu")

import functools

import jax.numpy as jnp
import numpy as np
import pytest

import np_reference as npr
from nosa_jax import nosa
from pallas_kernels import selection as sel
from pallas_kernels import selection_prefill as sp
from test_kernel_selection import ATOL, MAX_FRAGILE_FRACTION, REL, SMALL, UPSTREAM, WIDE  # the decode tests' configs


def make_inputs(seed, *, cfg, B, Tc, Hq, Hk, D, L, layer, kv_len, start, C_alloc, dtype):
    """q [B, Tc, Hq, D], q_pos [B, Tc] (start[b] + t, clipped to kv_len - 1 as the model's padded
    chunks are), the ktilde pool [L, B, C_alloc, Hk, D] and cisw pool [L, B, C_alloc, Hk] with NaN
    everywhere the selection must not read; NumPy arrays (bf16 ones exactly widened by np.float64)."""
    rng = np.random.default_rng(seed)
    kv_len = np.asarray(kv_len, np.int32)
    n_win = np.asarray(nosa.num_windows(jnp.asarray(kv_len), cfg))
    q = rng.standard_normal((B, Tc, Hq, D)).astype(np.float32)
    q_pos = np.minimum(np.asarray(start, np.int32)[:, None] + np.arange(Tc, dtype=np.int32), kv_len[:, None] - 1)
    kt = np.full((L, B, C_alloc, Hk, D), np.nan, np.float32)
    cw = np.full((L, B, C_alloc, Hk), np.nan, np.float32)
    for b in range(B):
        n = int(n_win[b])
        kt[layer, b, :n] = rng.standard_normal((n, Hk, D)).astype(np.float32) * 2
        cw[layer, b, :n] = rng.standard_normal((n, Hk)).astype(np.float32)
    q = np.array(jnp.asarray(q, dtype))
    kt = np.array(jnp.asarray(kt, dtype))
    return q, q_pos, kt, cw, kv_len, n_win


@functools.lru_cache(maxsize=None)
def _jitted(interpret, kw_items):
    kw = dict(kw_items)
    scores = jax.jit(lambda q, qp, kt, nw, layer, cfg: sp.prefill_window_scores(
        q, qp, kt, nw, layer, nosa_cfg=cfg, interpret=interpret, **kw), static_argnums=(5,))
    select = jax.jit(lambda q, qp, kt, cw, kl, layer, cfg, nb, mode: sp.prefill_select(
        q, qp, kt, cw, kl, layer, nosa_cfg=cfg, n_blocks=nb, mode=mode, interpret=interpret, **kw),
        static_argnums=(6, 7, 8))
    return scores, select


_ref_scores = jax.jit(lambda q, qp, kt, nw, layer, cfg: nosa.stage1_scores(q, qp, kt[layer], nw, cfg),
                      static_argnums=(4, 5))
_ref_select = jax.jit(lambda q, qp, kt, cw, kl, layer, cfg, nb, mode: nosa.select_blocks(
    q, qp, kt[layer], cw[layer], kl, nb, cfg, mode), static_argnums=(5, 6, 7, 8))


def stage1_f64(q, q_pos, kt, n_win, cfg, rows: int = 256):
    """float64 stage-1 scores [B, Hk, Tc, C] of one layer kt [B, C, Hk, D], vectorised (the loops of
    np_reference.stage1 are too slow at GPU sizes; test_stage1_f64_is_np_reference ties the two)."""
    q, kt = np.asarray(q, np.float64), np.asarray(kt, np.float64)
    B, Tc, Hq, D = q.shape
    C, Hk = kt.shape[1], kt.shape[2]
    G = Hq // Hk
    out = np.zeros((B, Hk, Tc, C))
    c = np.arange(C)
    for b in range(B):
        n = int(n_win[b])
        k = kt[b, :n]  # [n, Hk, D]
        for t0 in range(0, Tc, rows):
            qq = q[b, t0:t0 + rows].reshape(-1, Hk, G, D)
            z = np.einsum("thgd,chd->hgtc", qq, k) / np.sqrt(D)
            vis = (cfg.kernel_stride * c[None, :n] + cfg.kernel_size - 1) <= q_pos[b, t0:t0 + rows, None]
            z = np.where(vis[None, None], z, -np.inf)
            m = np.max(z, axis=-1, keepdims=True, initial=-np.inf)
            e = np.where(vis[None, None], np.exp(z - np.where(np.isfinite(m), m, 0)), 0.0)
            tot = e.sum(-1, keepdims=True)
            out[b, :, t0:t0 + rows, :n] = (e / np.where(tot > 0, tot, 1)).sum(1)
    return out


def assert_scores_match(got, want, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert np.isfinite(got).all(), f"{what}: non-finite kernel scores"
    err = np.abs(got - want).max()
    assert err <= ATOL, f"{what}: max abs error {err:.3g} > {ATOL}"


def check_case(seed, *, cfg, B, Tc, Hq, Hk, D, L, layer, kv_len, start, C_alloc, dtype, interpret=True,
               modes=("nosa", "infllmv2"), numpy=True, **kw):
    """Scores against the jnp reference (and float64 NumPy), ids against NumPy's lowest-index-first
    selection from the float64 scores except at near ties (and against nosa.select_blocks on the CPU
    with `numpy=False`). Returns (rows compared, rows skipped as fragile)."""
    q, q_pos, kt, cw, kv_len, n_win = make_inputs(seed, cfg=cfg, B=B, Tc=Tc, Hq=Hq, Hk=Hk, D=D, L=L, layer=layer,
                                                  kv_len=kv_len, start=start, C_alloc=C_alloc, dtype=dtype)
    n_blocks = -(-C_alloc * cfg.kernel_stride // cfg.block_size)
    scores_fn, select_fn = _jitted(interpret, tuple(sorted(kw.items())))
    got = np.asarray(scores_fn(q, q_pos, kt, n_win, layer, cfg))
    ref = np.asarray(_ref_scores(q, q_pos, kt, n_win, layer, cfg))
    assert_scores_match(got, ref, "kernel vs jnp reference")
    s64 = None
    if numpy:
        s64 = stage1_f64(q, q_pos, kt[layer], n_win, cfg)
        assert_scores_match(got, s64, "kernel vs float64")
    rows = fragile = 0
    for mode in modes:
        ids = np.asarray(select_fn(q, q_pos, kt, cw, kv_len, layer, cfg, n_blocks, mode))
        assert ids.shape == (B, Hk, Tc, min(cfg.topk, n_blocks)) and ids.dtype == np.int32
        if not numpy:
            want = np.asarray(_ref_select(q, q_pos, kt, cw, kv_len, layer, cfg, n_blocks, mode))
        for b in range(B):
            n = int(n_win[b])
            for h in range(Hk):
                for t in range(Tc):
                    rows += 1
                    if numpy:
                        r = npr.select_row(s64[b, h, t, :n], cw[layer, b, :n, h], int(q_pos[b, t]), n_blocks, cfg,
                                           mode, REL)
                        if r["fragile"]:
                            fragile += 1
                            continue
                        w = r["ids"]
                    else:
                        w = want[b, h, t]
                    np.testing.assert_array_equal(ids[b, h, t], w, err_msg=f"{mode} b={b} h={h} t={t}")
    return rows, fragile


# ----------------------------------------------------------------------------- CPU (interpret)

@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("G,tile_t,block_c", [(1, 4, 16), (4, 2, 16), (6, 1, 32), (16, None, 16)])
def test_small_config_ragged(dtype, G, tile_t, block_c):
    # Three sequences: a chunk mid-sequence, one starting at 0 (its first tokens see no window), and
    # a short one whose chunk runs past its length (padding queries repeat its last position).
    r, f = check_case(G * 7 + tile_t if tile_t else 3, cfg=SMALL, B=3, Tc=11, Hq=2 * G, Hk=2, D=16, L=3, layer=1,
                      kv_len=[97, 40, 23], start=[80, 0, 17], C_alloc=26, dtype=dtype, tile_t=tile_t,
                      block_c=block_c)
    assert f <= MAX_FRAGILE_FRACTION * r + 1, (f, r)


@pytest.mark.parametrize("G", [4, 16])
def test_tiles_straddling_the_visible_edge(G):
    # Token tiles whose first token sees fewer whole window tiles than their last (tokens 60..67 see
    # 14..16 windows, 124..131 see 30..32): only the window tiles every token sees skip the mask.
    r, f = check_case(17 + G, cfg=SMALL, B=2, Tc=16, Hq=2 * G, Hk=2, D=16, L=1, layer=0, kv_len=[100, 150],
                      start=[60, 124], C_alloc=40, dtype="float32", tile_t=8, block_c=16)
    assert f <= MAX_FRAGILE_FRACTION * r + 1, (f, r)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_wide_config_matches_jnp_select(dtype):
    # Overlapping windows (K = 4 S), two sink and two local blocks; ids against nosa.select_blocks
    # itself (on the CPU, where lax.top_k breaks ties lowest-index-first, as the reference assumes).
    check_case(11, cfg=WIDE, B=2, Tc=9, Hq=8, Hk=2, D=32, L=2, layer=0, kv_len=[150, 77], start=[141, 60],
               C_alloc=36, dtype=dtype, numpy=False, block_c=16)


@pytest.mark.parametrize("cfg", [SMALL, WIDE, UPSTREAM], ids=["small", "wide", "upstream"])
def test_lanes_needed_truncation_is_exact(cfg):
    # The lemma behind prefill_select's buckets, on the reference itself: the two-stage selection of
    # rows cut to their first n' >= lanes_needed blocks, padded with -1, equals that of the whole
    # rows, for every query (random scores, the exact 0s of invisible windows, ragged n_win, queries
    # near the row's end), and the blocks past n' pool only 0 and -inf.
    rng = np.random.default_rng(4)
    nb = 40
    C = nb * cfg.pool_stride + 3
    B, Hk, D = 3, 2, 16
    kv_len = np.array([nb * cfg.block_size, nb * cfg.block_size // 2 + 5, 3 * cfg.block_size + 1], np.int32)
    n_win = nosa.num_windows(jnp.asarray(kv_len), cfg)
    checked = tight = 0
    for p0 in (0, cfg.block_size - 1, 5 * cfg.block_size + 3, nb * cfg.block_size // 2, nb * cfg.block_size - 4):
        q_pos = np.minimum(p0 + np.arange(4), kv_len[:, None] - 1).astype(np.int32)
        q = jnp.asarray(rng.standard_normal((B, 4, Hk * 2, D)), jnp.float32)
        kt = jnp.asarray(rng.standard_normal((B, C, Hk, D)) * 2, jnp.float32)
        s1 = nosa.stage1_scores(q, jnp.asarray(q_pos), kt, n_win, cfg)
        b_qk = nosa.pool_blocks(s1, jnp.asarray(q_pos), n_win, nb, cfg)
        cw = jnp.asarray(rng.standard_normal((B, Hk, 1, C)), jnp.float32)
        b_cis = nosa.pool_blocks(cw, jnp.asarray(q_pos), n_win, nb, cfg)
        qb = jnp.asarray(q_pos // cfg.block_size)[:, None, :, None]
        need = int(sp.lanes_needed(jnp.asarray(q_pos), cfg))
        assert need <= nb
        tail = np.asarray(b_qk)[..., need:]
        assert np.all((tail == 0) | (tail == -np.inf)), p0

        def select(n_b, mode):  # the rows cut to n_b blocks, padded with -1 to the whole rows' width
            got = np.asarray(nosa.two_stage_select(b_qk[..., :n_b], b_cis[..., :n_b], qb, cfg, mode))
            return np.pad(got, [(0, 0)] * 3 + [(0, min(cfg.topk, nb) - got.shape[-1])], constant_values=-1)

        for mode in ("nosa", "infllmv2"):
            want = select(nb, mode)
            for n_b in range(need, nb, 3):
                np.testing.assert_array_equal(select(n_b, mode), want, err_msg=f"{mode} p0={p0} n_b={n_b}")
                checked += 1
            if need - 1 == q_pos.max() // cfg.block_size:  # one block fewer loses a query's own block
                assert not np.array_equal(select(need - 1, mode), want), (mode, p0)
                tight += 1
    assert checked > 10 and tight >= 3


def test_lane_buckets():
    assert sp.lane_buckets(513) == (256, 512, 513)
    assert sp.lane_buckets(512) == (128, 256, 512)
    assert sp.lane_buckets(2049) == (1024, 2048, 2049)
    assert sp.lane_buckets(70) == (32, 64, 70)
    assert sp.lane_buckets(40) == (32, 40)
    assert sp.lane_buckets(13) == (13,)


@pytest.mark.parametrize("start,bucket", [(0, 32), (360, 64), (548, 70)])
def test_each_lane_bucket_matches_jnp_select(start, bucket):
    # 70 blocks: prefill_select's three branches (rows of 32, 64 and all 70 blocks), each picked by
    # the chunk's position, against nosa.select_blocks on the whole rows, both modes.
    cfg, C_alloc = SMALL, 140
    kv_len = [560, start + 12]
    q_pos = np.minimum(np.asarray([start, start])[:, None] + np.arange(10), np.asarray(kv_len)[:, None] - 1)
    need = int(sp.lanes_needed(jnp.asarray(q_pos), cfg))
    buckets = sp.lane_buckets(C_alloc * cfg.kernel_stride // cfg.block_size)
    assert buckets == (32, 64, 70) and min(b for b in buckets if b >= need) == bucket
    check_case(start + 1, cfg=cfg, B=2, Tc=10, Hq=4, Hk=2, D=16, L=1, layer=0, kv_len=kv_len, start=[start, start],
               C_alloc=C_alloc, dtype="bfloat16", numpy=False, block_c=16)


def test_stage1_f64_is_np_reference():
    q, q_pos, kt, cw, kv_len, n_win = make_inputs(8, cfg=WIDE, B=2, Tc=6, Hq=8, Hk=2, D=16, L=1, layer=0,
                                                  kv_len=[70, 30], start=[60, 10], C_alloc=16, dtype="float32")
    got = stage1_f64(q, q_pos, kt[0], n_win, WIDE, rows=4)
    for b in range(2):
        n = int(n_win[b])
        np.testing.assert_allclose(got[b, :, :, :n], npr.stage1(q[b], q_pos[b], kt[0, b, :n], WIDE), atol=1e-12)
        assert not got[b, :, :, n:].any()


@pytest.mark.parametrize("cfg", [SMALL, WIDE, UPSTREAM], ids=["small", "wide", "upstream"])
def test_pool_windows_is_pool_blocks(cfg):
    # The selection's one-pass pooling (shared with decode) on prefill rows against the reference's
    # gather, exactly (a max of the same
    # float32 values), on scores with exact ties, rows of every n_win (0, not a multiple of P, the
    # whole row) and widths below and above n_blocks * P.
    rng = np.random.default_rng(2)
    P = cfg.pool_stride
    for nb, W in ((9, 9 * P), (9, 9 * P - 3), (7, 7 * P + 5)):
        B, Hk, Tc = 4, 2, 5
        s = rng.integers(0, 5, (B, Hk, Tc, W)).astype(np.float32) / 4
        n_win = np.array([0, 1, W - 2, W], np.int32)[:B]
        q_pos = rng.integers(0, nb * cfg.block_size, (B, Tc)).astype(np.int32)
        s_inf = np.where(np.arange(W) < n_win[:, None, None, None], s, -np.inf)
        got = sel._pool_windows(jnp.asarray(s_inf), jnp.asarray(q_pos), nb, cfg)
        want = nosa.pool_blocks(jnp.asarray(s), jnp.asarray(q_pos), jnp.asarray(n_win), nb, cfg)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_no_windows_gives_zeros():
    # Every query is below the first complete window: all scores 0, and the ids are the forced
    # blocks only (the reference's -inf / 0 pattern), for both modes.
    check_case(5, cfg=SMALL, B=2, Tc=5, Hq=4, Hk=2, D=16, L=1, layer=0, kv_len=[6, 7], start=[0, 2], C_alloc=8,
               dtype="bfloat16", block_c=16)


def test_layer_is_traced_single_compile():
    q, q_pos, kt, cw, kv_len, n_win = make_inputs(3, cfg=SMALL, B=1, Tc=4, Hq=4, Hk=2, D=16, L=3, layer=2,
                                                  kv_len=[60], start=[50], C_alloc=16, dtype="bfloat16")
    f = jax.jit(lambda q, qp, kt, nw, layer: sp.prefill_window_scores(q, qp, kt, nw, layer, nosa_cfg=SMALL,
                                                                      interpret=True, block_c=16))
    for layer in (2, 0):  # layer 0 of this pool is NaN: the kernel must read exactly the layer asked
        got = np.asarray(f(q, q_pos, kt, n_win, jnp.int32(layer)))
        ref = np.asarray(nosa.stage1_scores(jnp.asarray(q), jnp.asarray(q_pos), jnp.asarray(kt)[layer],
                                            jnp.asarray(n_win), SMALL))
        if layer == 2:
            assert_scores_match(got, ref, "layer 2")
        else:
            assert np.isnan(got).any() and np.isnan(ref).any()  # both read the NaN layer
    assert f._cache_size() == 1


def test_bad_inputs_raise():
    q = jnp.zeros((1, 4, 4, 24), jnp.bfloat16)
    kt = jnp.zeros((1, 1, 8, 2, 24), jnp.bfloat16)
    pos = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="power of two"):
        sp.prefill_window_scores(q, pos, kt, jnp.array([2]), 0, nosa_cfg=SMALL, interpret=True)
    q = jnp.zeros((1, 4, 4, 16), jnp.bfloat16)
    kt = jnp.zeros((1, 1, 8, 2, 16), jnp.bfloat16)
    with pytest.raises(ValueError, match="shape mismatch"):
        sp.prefill_window_scores(q, pos[:, :3], kt, jnp.array([2]), 0, nosa_cfg=SMALL, interpret=True)
    with pytest.raises(ValueError, match="tile_t"):
        sp.prefill_window_scores(q, pos, kt, jnp.array([2]), 0, nosa_cfg=SMALL, interpret=True, tile_t=3)
    with pytest.raises(ValueError, match="mode"):
        sp.prefill_select(q, pos, kt, None, jnp.array([40]), 0, nosa_cfg=SMALL, n_blocks=5, mode="full",
                          interpret=True)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_lowers_to_triton_for_cuda(dtype):
    """Cross-lower (no GPU needed) prefill_select at the model's sizes (a 256-token chunk at 16K,
    Hq=32, Hk=2, D=128): the Triton lowering accepts the scores kernel for this dtype with grid
    (B, Hk, token tiles) in each of the three lane buckets, every Triton module passes the MLIR
    verifier, and no layer of the stacked ktilde pool is sliced out outside the kernel."""
    from model_utils import verified_triton_modules

    L, B, Tc, Hq, Hk, D, context = 4, 1, 256, 32, 2, 128, 16384
    C, n_blocks = context // 16 + 2, context // 64 + 1
    sd = jax.ShapeDtypeStruct
    args = (sd((B, Tc, Hq, D), dtype), sd((B, Tc), jnp.int32), sd((L, B, C, Hk, D), dtype),
            sd((L, B, C, Hk), jnp.float32), sd((B,), jnp.int32), sd((), jnp.int32))
    txt, modules = verified_triton_modules(lambda q, qp, kt, cw, kl, layer: sp.prefill_select(
        q, qp, kt, cw, kl, layer, nosa_cfg=UPSTREAM, n_blocks=n_blocks, mode="nosa"), *args)
    calls = [ln for ln in txt.splitlines() if "xla.gpu.triton" in ln]
    scores = [ln for ln in calls if "nosa_prefill_stage1_scores" in ln]
    n_b = len(sp.lane_buckets(n_blocks))
    assert n_b == 3 and len(scores) == n_b and len(modules) == len(calls) == 2 * n_b  # scores, top-k per bucket
    for ln in scores:
        assert f"grid_x = {B} " in ln and f"grid_y = {Hk} " in ln
        assert f"grid_z = {Tc // sp.default_tile_t(Hq // Hk)} " in ln
    assert f"tensor<{B}x{C}x{Hk}x{D}x{'bf16' if dtype == 'bfloat16' else 'f32'}>" not in txt


# ----------------------------------------------------------------------------- GPU (Triton)

@pytest.mark.gpu
@pytest.mark.parametrize("start,Tc", [(31744, 1024), (0, 2048)])
def test_gpu_realistic(start, Tc):
    context = 32768
    r, f = check_case(start + Tc, cfg=UPSTREAM, B=1, Tc=Tc, Hq=32, Hk=2, D=128, L=2, layer=1, kv_len=[context],
                      start=[start], C_alloc=context // 16 + 2, dtype="bfloat16")
    assert f <= MAX_FRAGILE_FRACTION * r + 1, (f, r)
