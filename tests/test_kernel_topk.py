"""pallas_kernels.topk (the fused two-stage block top-k) against its reference nosa.two_stage_select:
exact equality of the ids on every input, ties (values from a tiny set), +inf / -inf entries,
-0.0 next to +0.0, huge and subnormal magnitudes, rows with fewer finite entries than k, k > n,
k == n, n not a power of two, qb anywhere (also below k and past the last block), leading dims
[B, Hk] and [B, Hk, Tq] with the broadcast qb of nosa.select_blocks.

CPU: Pallas interpret mode, small shapes, plus a cross-lowering for an abstract H200 whose Triton
module must pass the MLIR verifier. GPU (`-m gpu`, NOSA_TEST_GPU=1): the Triton kernel at decode
(32 rows x 2048 blocks) and prefill (8192 rows x 512 blocks) sizes.

Subnormals: XLA:CPU runs with denormals-are-zero, so nosa.two_stage_select on the host compares
+-subnormal scores as 0, while the GPU (XLA and Triton alike) and the kernel (integer keys, no float
op) order them as IEEE does. The expected ids therefore come from `reference_ieee`, a numpy
transcription of the reference (numpy does not flush), and every check also asserts that
nosa.two_stage_select on this host equals reference_ieee of the flushed scores. (The GPU test once
took its expectation from the host's XLA and failed on the n = 100 rows: there the top-64 reaches
the "magnitudes" rows' +-1e-45 entries, which the host merged with 0.)
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nosa_jax import nosa
from nosa_jax.config import NosaConfig
from pallas_kernels import selection as sel
from pallas_kernels import topk
from pallas_kernels.topk import two_stage_select_pallas
from model_utils import verified_triton_modules
import np_reference as npr

SMALL = NosaConfig(kernel_size=8, kernel_stride=4, block_size=8, init_blocks=1, local_blocks=1,
                   topk=6, qk_select=4)
K17 = NosaConfig(kernel_size=8, kernel_stride=4, block_size=8, init_blocks=1, local_blocks=1,
                 topk=17, qk_select=9)  # k == n for n = 17
UPSTREAM = NosaConfig()  # topk 64, qk_select 33


# ----------------------------------------------------------------------------- inputs

ROW_KINDS = ("ties", "ties_inf", "normal", "few_finite", "all_neg_inf", "all_pos_inf", "signed_zero",
             "magnitudes", "one_value")


def make_row(rng, kind: str, n: int) -> np.ndarray:
    """One float32 row of pooled scores of the given kind."""
    if kind == "ties":
        x = rng.integers(0, 3, n).astype(np.float32)
    elif kind == "ties_inf":
        x = rng.integers(0, 3, n).astype(np.float32)
        x[rng.random(n) < 0.15] = np.inf
        x[rng.random(n) < 0.3] = -np.inf
    elif kind == "normal":
        x = rng.standard_normal(n).astype(np.float32)
    elif kind == "few_finite":  # fewer finite entries than any k: -inf ties fill the selection
        x = np.full(n, -np.inf, np.float32)
        idx = rng.choice(n, size=min(n, 2), replace=False)
        x[idx] = rng.standard_normal(len(idx))
    elif kind == "all_neg_inf":
        x = np.full(n, -np.inf, np.float32)
    elif kind == "all_pos_inf":
        x = np.full(n, np.inf, np.float32)
    elif kind == "signed_zero":  # -0.0 == +0.0 for the reference: one tie class
        x = rng.choice(np.array([-0.0, 0.0, 1.0, -1.0], np.float32), n)
    elif kind == "magnitudes":  # the float -> int key across exponents, subnormals and signs
        vals = np.array([3.0e38, -3.0e38, 1e-45, -1e-45, 1.2e-38, -1.2e-38, 7.5, -7.5, 1.0, 0.0],
                        np.float32)
        x = rng.choice(vals, n) * rng.choice(np.array([1.0, 1.0000001], np.float32), n)
    elif kind == "one_value":
        x = np.full(n, 0.25, np.float32)
    else:
        raise ValueError(kind)
    return x.astype(np.float32)


def make_scores(seed: int, lead: tuple, n: int) -> np.ndarray:
    """[*lead, n]: row kinds cycled over the rows (each kind appears once lead has >= 9 rows),
    with random kinds beyond, all different per row."""
    rng = np.random.default_rng(seed)
    rows = int(np.prod(lead))
    kinds = [ROW_KINDS[(seed + r) % len(ROW_KINDS)] if r < len(ROW_KINDS) else
             ROW_KINDS[rng.integers(len(ROW_KINDS))] for r in range(rows)]
    return np.stack([make_row(rng, k, n) for k in kinds]).reshape(lead + (n,))


def make_qb(seed: int, shape: tuple, n: int, k: int) -> np.ndarray:
    """qb anywhere in [0, n + 1]: half of the rows below k (the -1 tail), a few past the last block."""
    rng = np.random.default_rng(seed + 1000)
    low = rng.integers(0, max(1, min(k, n)), shape)
    high = rng.integers(0, n + 2, shape)
    return np.where(rng.random(shape) < 0.5, low, high).astype(np.int32)


# ----------------------------------------------------------------------------- runners

@functools.partial(jax.jit, static_argnames=("cfg", "mode", "radix_bits", "search"))
def _pallas(b_qk, b_cis, qb, cfg, mode, radix_bits=4, search="early"):
    return two_stage_select_pallas(b_qk, b_cis, qb, cfg, mode, interpret=True, radix_bits=radix_bits, search=search)


@functools.partial(jax.jit, static_argnames=("cfg", "mode"))
def _reference(b_qk, b_cis, qb, cfg, mode):
    return nosa.two_stage_select(b_qk, b_cis, qb, cfg, mode)


def _top_k_mask_np(x: np.ndarray, k: int) -> np.ndarray:
    """nosa.top_k_mask in numpy (IEEE compares): the k largest, ties lowest-index-first."""
    n = x.shape[-1]
    kth = np.sort(x, axis=-1)[..., n - k:n - k + 1]
    above = x > kth
    tied = x == kth
    room = k - above.sum(axis=-1, keepdims=True)
    return above | (tied & (np.cumsum(tied, axis=-1) <= room))


def reference_ieee(b_qk, b_cis, qb, cfg, mode) -> np.ndarray:
    """nosa.two_stage_select transcribed to numpy, line for line: the same ids wherever floats
    compare as IEEE says (the GPU), also for subnormal scores, which XLA:CPU compares as 0."""
    b_qk = np.asarray(b_qk, np.float32)
    qb = np.asarray(qb)
    n = b_qk.shape[-1]
    k = min(cfg.topk, n)
    if mode == "infllmv2":
        mask = _top_k_mask_np(b_qk, k)
    else:
        c = np.where(np.arange(n) > qb, np.float32(-np.inf), np.asarray(b_cis, np.float32))
        c = np.where(_top_k_mask_np(b_qk, min(cfg.qk_select, n)), np.float32(np.inf), c)
        mask = _top_k_mask_np(c, k)
    idx = np.sort(np.where(mask, np.arange(n), n), axis=-1)[..., :k]
    return np.where(idx > qb, -1, idx).astype(np.int32)


def flush_subnormals(x):
    """+-subnormals -> +0.0: what XLA:CPU's denormals-are-zero compares see."""
    if x is None:
        return None
    x = np.asarray(x, np.float32)
    return np.where(np.abs(x) < np.finfo(np.float32).tiny, np.float32(0.0), x)


def check(b_qk, b_cis, qb, cfg, mode, radix_bits=4, search="early"):
    b_cis_in = None if mode == "infllmv2" else jnp.asarray(b_cis)
    b_cis_np = None if mode == "infllmv2" else b_cis
    got = np.asarray(_pallas(jnp.asarray(b_qk), b_cis_in, jnp.asarray(qb), cfg, mode, radix_bits=radix_bits,
                             search=search))
    want = reference_ieee(b_qk, b_cis_np, qb, cfg, mode)
    host = np.asarray(_reference(jnp.asarray(b_qk), b_cis_in, jnp.asarray(qb), cfg, mode))
    assert got.dtype == np.int32
    assert got.shape == want.shape == host.shape
    msg = f"mode={mode} cfg topk={cfg.topk} qk={cfg.qk_select}"
    np.testing.assert_array_equal(got, want, err_msg=msg)
    # reference_ieee is nosa.two_stage_select: on this host up to its flushed compares
    np.testing.assert_array_equal(
        host, reference_ieee(flush_subnormals(b_qk), flush_subnormals(b_cis_np), qb, cfg, mode),
        err_msg="reference_ieee vs nosa.two_stage_select: " + msg)
    return want


# ----------------------------------------------------------------------------- CPU (interpret)

@pytest.mark.parametrize("mode", ["nosa", "infllmv2"])
@pytest.mark.parametrize("n,cfg", [
    (3, SMALL),       # k > n (topk 6, qk_select 4 -> both clipped to 3)
    (17, SMALL),      # n not a power of two
    (17, K17),        # k == n
    (64, UPSTREAM),   # k == n == 64, qk_select 33
    (100, UPSTREAM),  # the upstream k on a non-power-of-two row
])
def test_matches_reference_b_hk(mode, n, cfg):
    lead = (3, 4)  # [B, Hk]: 12 rows, every row kind
    for seed in range(2):
        b_qk = make_scores(seed, lead, n)
        b_cis = make_scores(seed + 50, lead, n)
        qb = make_qb(seed, (3, 1, 1), n, cfg.topk)  # per sequence, broadcast over the heads
        check(b_qk, b_cis, qb, cfg, mode)


@pytest.mark.parametrize("mode", ["nosa", "infllmv2"])
def test_matches_reference_b_hk_tq(mode):
    # The prefill layout of nosa.select_blocks: b_qk [B, Hk, Tq, n], b_cis [B, Hk, Tq, n] and
    # qb [B, 1, Tq, 1] broadcast over the heads.
    B, Hk, Tq, n = 2, 2, 5, 40
    b_qk = make_scores(7, (B, Hk, Tq), n)
    b_cis = make_scores(8, (B, Hk, Tq), n)
    qb = make_qb(9, (B, 1, Tq, 1), n, SMALL.topk)
    check(b_qk, b_cis, qb, SMALL, mode)
    # b_cis with a broadcast query axis [B, Hk, 1, n] (the reference broadcasts it too)
    check(b_qk, b_cis[:, :, :1], qb, SMALL, mode)


@pytest.mark.parametrize("mode", ["nosa", "infllmv2"])
def test_decode_size_row(mode):
    # One realistic row length (128K context: 2048 blocks), few rows (interpret mode is slow).
    n = 2048
    b_qk = make_scores(11, (1, 3), n)
    b_cis = make_scores(12, (1, 3), n)
    b_qk[0, 1] = np.random.default_rng(3).standard_normal(n).astype(np.float32)  # the usual case
    qb = np.array([[[2047], [40], [1000]]], np.int32)
    check(b_qk, b_cis, qb, UPSTREAM, mode)


@pytest.mark.parametrize("mode", ["nosa", "infllmv2"])
def test_full_search_baseline(mode):
    # search="full" (the benchmark's baseline: every radix step) gives the same ids.
    n = 100
    for seed in range(2):
        qb = make_qb(seed + 40, (3, 1, 1), n, UPSTREAM.topk)
        check(make_scores(seed + 41, (3, 4), n), make_scores(seed + 42, (3, 4), n), qb, UPSTREAM, mode,
              search="full")


@pytest.mark.parametrize("radix_bits", [2, 4])
def test_threshold_stops_early_and_separates_the_top_k(radix_bits):
    # _kth_threshold (plain jnp outside a kernel) against numpy: on distinct random keys it stops
    # early (exact) with exactly k keys >= its threshold; with a tie across the k-th place it cannot
    # stop early and returns the k-th largest key itself; without the early stop always that.
    rng = np.random.default_rng(radix_bits)
    k, n = 33, 2048
    early = 0
    for _ in range(8):
        x = rng.standard_normal(n).astype(np.float32)
        key = topk._order_keys(jnp.asarray(x), jnp.ones(n, bool))
        kth = np.sort(np.asarray(key))[n - k]
        t, exact = map(int, topk._kth_threshold(key, k, radix_bits))
        assert np.sum(np.asarray(key) >= t) == k
        assert exact or t == kth  # no early stop: the full search's k-th largest
        early += exact
        assert int(topk._kth_threshold(key, k, radix_bits, early_exit=False)[0]) == kth
    assert early >= 6  # a float32's low bits almost never decide between neighbouring normals
    x = rng.standard_normal(n).astype(np.float32)
    x[np.argsort(-x)[k]] = x[np.argsort(-x)[k - 1]]  # the (k+1)-th equals the k-th
    key = topk._order_keys(jnp.asarray(x), jnp.ones(n, bool))
    t, exact = map(int, topk._kth_threshold(key, k, radix_bits))
    assert (t, exact) == (np.sort(np.asarray(key))[n - k], 0)


@pytest.mark.parametrize("radix_bits", [1, 2, 8])
def test_radix_widths(radix_bits):
    n = 100
    b_qk = make_scores(21, (2, 5), n)
    b_cis = make_scores(22, (2, 5), n)
    qb = make_qb(23, (2, 1, 1), n, UPSTREAM.topk)
    check(b_qk, b_cis, qb, UPSTREAM, "nosa", radix_bits=radix_bits)


@pytest.mark.parametrize("mode", ["nosa", "infllmv2"])
def test_gpu_padded_case_in_interpret_mode(mode):
    # The GPU test's n = 100 case (8 rows padded to 128 lanes), its inputs and its expectation
    # exactly: the kernel in interpret mode computes what Triton computes (no float op in the
    # kernel, so no dependence on the denormal mode), so this is the GPU test run on the CPU. The
    # expectation must not come from the host's XLA: on these rows it differs (asserted below).
    args, want = _gpu_case((4, 2), 100, mode, seed=100)
    jargs = [None if x is None else jnp.asarray(x) for x in args]
    got = np.asarray(_pallas(*jargs, UPSTREAM, mode))
    np.testing.assert_array_equal(got, want, err_msg=mode)
    host = np.asarray(_reference(*jargs, UPSTREAM, mode))
    assert np.any(host != want), "the case no longer reaches subnormal scores: it tests nothing"


@pytest.mark.parametrize("mode", ["nosa", "infllmv2"])
def test_subnormal_scores_keep_ieee_order(mode):
    # Rows where the k-th largest falls among -1e-45, -0.0, +0.0, 1e-45 (and the smallest normal),
    # interleaved so that merging the subnormals with 0 (denormals-are-zero) changes the ids.
    n, cfg = 40, SMALL  # topk 6, qk_select 4
    tiny = np.finfo(np.float32).tiny
    sub = np.float32(1e-45)
    rng = np.random.default_rng(31)
    pool = np.array([tiny, sub, 0.0, -0.0, -sub, -tiny, 2 * sub, -2 * sub], np.float32)
    b_qk = rng.choice(pool, (3, 2, n)).astype(np.float32)
    b_cis = rng.choice(pool, (3, 2, n)).astype(np.float32)
    b_qk[:, :, :3] = 1.0  # a few clear winners, then the boundary among the tiny values
    qb = np.array([n + 1, n - 1, 20], np.int32).reshape(3, 1, 1)
    want = check(b_qk, b_cis, qb, cfg, mode)
    host = np.asarray(_reference(jnp.asarray(b_qk), None if mode == "infllmv2" else jnp.asarray(b_cis),
                                 jnp.asarray(qb), cfg, mode))
    assert np.any(host != want)  # the data does separate IEEE from flushed compares


def test_tie_break_is_exercised():
    # The data above must be able to catch a wrong tie break: with the same values, taking tied
    # entries highest-index-first gives other ids on many rows (so a kernel that did that fails).
    lead, n, cfg = (3, 4), 17, SMALL
    b_qk = make_scores(0, lead, n)
    qb = np.full(lead + (1,), n, np.int32)
    want = np.asarray(_reference(jnp.asarray(b_qk), None, jnp.asarray(qb), cfg, "infllmv2"))
    flipped = np.asarray(_reference(jnp.asarray(b_qk[..., ::-1].copy()), None, jnp.asarray(qb), cfg, "infllmv2"))
    highest_first = np.sort(np.where(flipped >= 0, n - 1 - flipped, flipped), axis=-1)
    differs = np.any(highest_first != want, axis=-1)
    assert differs.sum() >= 4, differs


def test_select_from_scores_impls_agree():
    # The selection.py switch: topk_impl="pallas" equals the default XLA path on the same scores.
    rng = np.random.default_rng(5)
    B, Hk, nb, C = 3, 2, 40, 170
    b_qk = rng.integers(0, 4, (B, Hk, nb)).astype(np.float32)
    b_qk[0, 0, 30:] = -np.inf
    cw = rng.integers(0, 3, (B, C, Hk)).astype(np.float32)
    kv_len = np.array([320, 9, 161], np.int32)
    n_eff = nosa.num_windows(jnp.asarray(kv_len), SMALL)
    q_pos = jnp.asarray(kv_len - 1)
    for mode in ("nosa", "infllmv2"):
        kw = dict(nosa_cfg=SMALL, n_blocks=nb, mode=mode)
        want = sel.select_from_scores(jnp.asarray(b_qk), jnp.asarray(cw), n_eff, q_pos, topk_impl="xla", **kw)
        got = sel.select_from_scores(jnp.asarray(b_qk), jnp.asarray(cw), n_eff, q_pos, topk_impl="pallas",
                                     interpret=True, **kw)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=mode)
    with pytest.raises(ValueError, match="topk_impl"):
        sel.select_from_scores(jnp.asarray(b_qk), jnp.asarray(cw), n_eff, q_pos, topk_impl="sort", **kw)


def test_decode_select_passes_topk_impl():
    rng = np.random.default_rng(6)
    L, B, Hq, Hk, D, C, nb = 1, 2, 4, 2, 16, 60, 30
    q = jnp.asarray(rng.standard_normal((B, Hq, D)), jnp.float32)
    kt = jnp.asarray(rng.standard_normal((L, B, C, Hk, D)), jnp.float32)
    cw = jnp.asarray(rng.standard_normal((L, B, C, Hk)), jnp.float32)
    kv_len = jnp.asarray([230, 41], jnp.int32)
    n_win = nosa.num_windows(kv_len, SMALL)
    kw = dict(nosa_cfg=SMALL, n_blocks=nb, mode="nosa", interpret=True)
    want = sel.decode_select(q, kt, cw, n_win, kv_len, 0, topk_impl="xla", **kw)
    got = sel.decode_select(q, kt, cw, n_win, kv_len, 0, topk_impl="pallas", **kw)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


P4 = NosaConfig(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=2, local_blocks=2,
                topk=9, qk_select=6)  # 4 windows per block step, as upstream's 64 / 16


def decode_pool_case(seed: int, B: int, Hk: int, n: int, C: int, cfg, L: int = 3, layer: int = 1):
    """Inputs of topk.decode_two_stage_select and its expected ids. b_qk [B, Hk, n]: unforced
    pooled scores of every row kind (row (0, 0) all +inf); cisw [L, B, C, Hk]: window scores of
    every row kind below n_eff[b] of layer `layer`, NaN elsewhere (other layers, windows >= n_eff:
    never to be read); n_eff anywhere in [0, C] (0: no window), qb anywhere. Expected:
    reference_ieee of the forced b_qk and np_reference.pool_row of each row's valid windows
    (float64, exact for float32 inputs).
    The cis scores are flushed of subnormals: the kernel's max in interpret mode runs on XLA:CPU,
    whose denormals-are-zero the GPU does not share (the keys, integer-only, are tested above)."""
    rng = np.random.default_rng(seed)
    b_qk = make_scores(seed, (B, Hk), n)
    rows = flush_subnormals(make_scores(seed + 1, (B, Hk), C))  # [B, Hk, C] window scores
    n_eff = rng.integers(0, C + 1, B).astype(np.int32)
    n_eff[0] = C
    if B > 2:
        n_eff[1] = 0
    qb = make_qb(seed, (B,), n, cfg.topk)
    # row (0, 0): every b_qk +inf, so stage 1 picks the lowest ids and not the local blocks at the
    # row's end, whose cis windows score lowest: only the cis row's own forcing selects them
    b_qk[0, 0] = np.inf
    qb[0] = n - 1
    rows[0, 0, max(0, cfg.pool_stride * (n - 1 - cfg.local_blocks) - 1):] = -1e30
    cisw = np.full((L, B, C, Hk), np.nan, np.float32)
    for b in range(B):
        cisw[layer, b, :n_eff[b]] = rows[b, :, :n_eff[b]].T
    forced = np.array([[npr.forced(j, int(qb[b]), cfg) for j in range(n)] for b in range(B)])
    qk_forced = np.where(forced[:, None, :], np.float32(np.inf), b_qk)
    b_cis = np.stack([[npr.pool_row(rows[b, h, :n_eff[b]], int(qb[b]), n, cfg) for h in range(Hk)]
                      for b in range(B)]).astype(np.float32)
    want = {mode: reference_ieee(qk_forced, b_cis, qb[:, None, None], cfg, mode) for mode in ("nosa", "infllmv2")}
    return b_qk, cisw, n_eff, qb, want


@pytest.mark.parametrize("mode", ["nosa", "infllmv2"])
@pytest.mark.parametrize("n,C,cfg", [
    (17, 40, SMALL),      # P = 2; C > P n: the windows past block n are not read
    (40, 61, P4),         # P = 4; C < P n: the last blocks have no window (-inf)
    (100, 397, UPSTREAM),  # upstream's P = 4 and k
])
def test_decode_pools_and_forces_in_kernel(mode, n, C, cfg):
    """decode_two_stage_select reads the layer's cis windows from the stacked pool, masks those at or
    past n_eff, max-pools them to blocks (window P j - 1 .. P j + P - 1) and forces the sink / local
    blocks of both rows in its kernel: the ids equal the float64 pooling's through reference_ieee."""
    for seed in range(2):
        b_qk, cisw, n_eff, qb, want = decode_pool_case(seed + 20, 5, 2, n, C, cfg)
        got = topk.decode_two_stage_select(jnp.asarray(b_qk), jnp.asarray(cisw) if mode == "nosa" else None,
                                           jnp.int32(1), jnp.asarray(n_eff), jnp.asarray(qb), cfg, mode,
                                           interpret=True)
        np.testing.assert_array_equal(np.asarray(got), want[mode], err_msg=f"{mode} n={n} C={C} seed={seed}")


@pytest.mark.parametrize("pool", ["kernel", "xla"])
@pytest.mark.parametrize("mode", ["nosa", "infllmv2"])
def test_decode_select_pool_choices_agree(pool, mode, monkeypatch):
    """decode_select with the Pallas top-k, its inputs pooled in its kernel or by XLA, equals the
    XLA top-k on XLA's pooling (cis windows past n_win hold NaN: no path may read them)."""
    monkeypatch.setattr(sel, "TOPK_POOL", pool)
    rng = np.random.default_rng(8)
    L, B, Hq, Hk, D, C, nb = 2, 3, 4, 2, 16, 60, 30
    q = jnp.asarray(rng.standard_normal((B, Hq, D)), jnp.float32)
    kt = jnp.asarray(rng.standard_normal((L, B, C, Hk, D)), jnp.float32)
    kv_len = jnp.asarray([230, 41, 3], jnp.int32)
    n_win = nosa.num_windows(kv_len, SMALL)
    cw = np.full((L, B, C, Hk), np.nan, np.float32)
    for b in range(B):
        cw[1, b, :int(n_win[b])] = rng.integers(0, 3, (int(n_win[b]), Hk))  # ties across blocks
    kw = dict(nosa_cfg=SMALL, n_blocks=nb, mode=mode, interpret=True)
    cw = jnp.asarray(cw)
    want = sel.decode_select(q, kt, cw, n_win, kv_len, 1, topk_impl="xla", **kw)
    got = sel.decode_select(q, kt, cw, n_win, kv_len, 1, topk_impl="pallas", **kw)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_bad_arguments_raise():
    x = jnp.zeros((2, 8), jnp.float32)
    with pytest.raises(ValueError, match="mode"):
        two_stage_select_pallas(x, x, jnp.zeros((2, 1), jnp.int32), SMALL, "full", interpret=True)
    with pytest.raises(ValueError, match="b_cis"):
        two_stage_select_pallas(x, None, jnp.zeros((2, 1), jnp.int32), SMALL, "nosa", interpret=True)
    with pytest.raises(ValueError, match="radix_bits"):
        two_stage_select_pallas(x, x, jnp.zeros((2, 1), jnp.int32), SMALL, "nosa", interpret=True, radix_bits=3)
    with pytest.raises(ValueError, match="search"):
        two_stage_select_pallas(x, x, jnp.zeros((2, 1), jnp.int32), SMALL, "nosa", interpret=True, search="fast")


@pytest.mark.parametrize("mode,lead,n,cfg", [
    ("nosa", (16, 2), 2048, UPSTREAM),      # decode at 128K: 32 rows of 2048 blocks
    ("infllmv2", (16, 2), 2048, UPSTREAM),
    ("nosa", (1, 2, 4096), 512, UPSTREAM),  # prefill: 8192 rows of 512 blocks
    ("nosa", (2, 2), 100, UPSTREAM),        # padded row
    ("infllmv2", (3,), 17, SMALL),          # padded row, K = 6 output slots (not a power of two)
])
@pytest.mark.parametrize("search", ["early", "full"])
def test_lowers_to_triton_for_cuda(mode, lead, n, cfg, search):
    sd = jax.ShapeDtypeStruct
    rows = int(np.prod(lead))
    qb_shape = lead[:1] + (1,) * (len(lead) - 1) + (1,)
    txt, modules = verified_triton_modules(
        lambda a, b, q: two_stage_select_pallas(a, b, q, cfg, mode, search=search),
        sd(lead + (n,), jnp.float32), sd(lead + (n,), jnp.float32), sd(qb_shape, jnp.int32))
    calls = [ln for ln in txt.splitlines() if "xla.gpu.triton" in ln]
    assert len(calls) == 1 and f"grid_x = {rows} " in calls[0]
    assert "sort" not in txt  # no XLA sort left
    (ir,) = modules
    assert ir.count("\"tt.scan\"(") == (3 if mode == "nosa" else 2)  # tie ranks per stage + output slots
    assert ir.count("scf.while") == (2 if mode == "nosa" else 1)  # one radix search per stage
    assert "tt.store" in ir


# ----------------------------------------------------------------------------- GPU (Triton)

def _gpu_case(lead, n, mode, seed):
    """The GPU test's inputs (b_qk, b_cis or None, qb) and expected ids. The expectation is
    reference_ieee, not nosa.two_stage_select on the host: XLA:CPU compares subnormals as 0 (its
    denormals-are-zero), the GPU does not, and the "magnitudes" rows hold +-1e-45."""
    b_qk = make_scores(seed, lead, n)
    b_cis = make_scores(seed + 1, lead, n)
    rng = np.random.default_rng(seed)
    normal = rng.random(lead) < 0.5  # half the rows: the usual distinct random scores
    b_qk = np.where(normal[..., None], rng.standard_normal(lead + (n,)).astype(np.float32), b_qk)
    b_cis = np.where(normal[..., None], rng.standard_normal(lead + (n,)).astype(np.float32), b_cis)
    qb_shape = lead[:1] + (1,) * (len(lead) - 1) + (1,)
    qb = make_qb(seed, qb_shape, n, UPSTREAM.topk)
    args = (b_qk, b_cis if mode == "nosa" else None, qb)
    return args, reference_ieee(*args, UPSTREAM, mode)


def _gpu_check(lead, n, mode, num_warps, radix_bits=4, seed=0):
    args, want = _gpu_case(lead, n, mode, seed)
    f = jax.jit(lambda a, b, q: two_stage_select_pallas(a, b, q, UPSTREAM, mode, num_warps=num_warps,
                                                        radix_bits=radix_bits))
    dev_args = [None if x is None else jnp.asarray(x) for x in args]
    got = np.asarray(f(*dev_args))
    np.testing.assert_array_equal(got, want, err_msg=f"{mode} lead={lead} n={n}: kernel vs reference_ieee")
    # the contract itself: nosa.two_stage_select on the same device (IEEE compares there too)
    same_device = np.asarray(_reference(*dev_args, UPSTREAM, mode))
    np.testing.assert_array_equal(got, same_device, err_msg=f"{mode} lead={lead} n={n}: kernel vs XLA on the GPU")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["nosa", "infllmv2"])
@pytest.mark.parametrize("lead,n", [((16, 2), 2048), ((1, 2, 4096), 512), ((4, 2), 100)])
@pytest.mark.parametrize("num_warps,radix_bits", [(4, 4), (8, 4), (4, 2)])
def test_gpu_realistic(mode, lead, n, num_warps, radix_bits):
    _gpu_check(lead, n, mode, num_warps, radix_bits, seed=n)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["nosa", "infllmv2"])
@pytest.mark.parametrize("n,C", [(257, 1026), (2049, 8194)])  # 16K and 128K decode rows, batch 16
def test_gpu_decode_pools_in_kernel(mode, n, C):
    b_qk, cisw, n_eff, qb, want = decode_pool_case(n, 16, 2, n, C, UPSTREAM)
    f = jax.jit(lambda a, c, e, q: topk.decode_two_stage_select(a, c, jnp.int32(1), e, q, UPSTREAM, mode))
    got = np.asarray(f(jnp.asarray(b_qk), jnp.asarray(cisw) if mode == "nosa" else None, jnp.asarray(n_eff),
                       jnp.asarray(qb)))
    np.testing.assert_array_equal(got, want[mode], err_msg=f"{mode} n={n}: kernel vs float64 pooling + reference_ieee")


def test_default_tiling_bounds_the_compare_tensor():
    """The default (num_warps, radix_bits) keeps the [2**bits, n_pad] compare at <= 64 int32 per
    thread wherever 16 warps and 1 bit allow it, with the measured best at 512 and 2048 lanes."""
    from pallas_kernels.topk import default_tiling

    assert default_tiling(512) == (4, 4) and default_tiling(2048) == (4, 2)
    for n_pad in (32, 64, 256, 1024, 4096, 8192, 16384):
        warps, bits = default_tiling(n_pad)
        assert warps in (4, 8, 16) and bits in (1, 2, 4)
        assert (2 ** bits) * n_pad <= 64 * 32 * warps
