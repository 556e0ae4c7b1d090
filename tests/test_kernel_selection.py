"""pallas_kernels.selection (decode block scores / selection kernel) against the jnp reference
(nosa.stage1_scores + nosa.pool_blocks, nosa.select_blocks) and an independent float64 NumPy
computation written here from shared/spec/nosa-upstream.md 2.4-2.7.

CPU: Pallas interpret mode, small shapes. GPU (`-m gpu`, NOSA_TEST_GPU=1): the Triton lowering at
realistic sizes (B=16, Hq=32, Hk=2, D=128, 32K and 128K contexts). Inputs are fresh random arrays
in the ktilde dtype under test: bfloat16 (the model's case: q and ktilde bf16, one native bf16 dot
with float32 accumulation) or float32 (the float32-accurate multi-pass dot); the float64 reference
is fed the same rounded values. The pool is stacked over layers and every layer but the one read is
NaN (must never be read), as are the windows past each sequence's n_win in the layer read.
"""

import os

import jax

if os.environ.get("NOSA_TEST_GPU") != "1":
    jax.config.update("jax_platforms", "cpu")

import functools

import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from np_reference import boundary_fragile
from nosa_jax import nosa
from nosa_jax.config import NosaConfig
from pallas_kernels import selection as sel

SMALL = NosaConfig(kernel_size=8, kernel_stride=4, block_size=8, init_blocks=1, local_blocks=1,
                   topk=6, qk_select=4)
WIDE = NosaConfig(kernel_size=16, kernel_stride=4, block_size=8, init_blocks=2, local_blocks=2,
                  topk=9, qk_select=7)
UPSTREAM = NosaConfig()
ATOL = 1e-5
REL = 1e-5  # float64 top-k boundary gap (relative) under which float32 may reorder legitimately
MAX_FRAGILE_FRACTION = 0.05


# ----------------------------------------------------------------------------- float64 NumPy

def np_block_scores(q, kt, n_win, q_pos, cfg, n_blocks):
    """q [B, Hq, D]; kt [B, C, Hk, D] (one layer); n_win, q_pos [B] -> [B, Hk, n_blocks] float64."""
    q, kt = np.asarray(q, np.float64), np.asarray(kt, np.float64)
    B, Hq, D = q.shape
    C, Hk = kt.shape[1], kt.shape[2]
    G = Hq // Hk
    P = cfg.block_size // cfg.kernel_stride
    out = np.empty((B, Hk, n_blocks))
    for b in range(B):
        p = int(q_pos[b])
        nv = min(int(n_win[b]), C)
        nv = min(nv, max(0, (p + 1 - cfg.kernel_size) // cfg.kernel_stride + 1))
        qb = p // cfg.block_size
        for h in range(Hk):
            s1 = np.zeros(nv)
            if nv:
                k = kt[b, :nv, h]  # [nv, D]
                for g in range(G):
                    z = k @ q[b, h * G + g] / np.sqrt(D)
                    e = np.exp(z - z.max())
                    s1 += e / e.sum()
            for j in range(n_blocks):
                if j < cfg.init_blocks or (qb - cfg.local_blocks <= j <= qb):
                    out[b, h, j] = np.inf
                    continue
                lo, hi = max(P * j - 1, 0), min(P * j + P, nv)
                out[b, h, j] = s1[lo:hi].max() if hi > lo else -np.inf
    return out


def np_topk(scores, k):
    """Indices of the k largest, ties lowest-index-first."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return order[:k]


def fragile_rows(scores64, cfg, n_blocks, mode):
    """[B, Hk] bool: rows whose query-aware top-k (stage 1) has a near tie in float64."""
    k = min(cfg.qk_select if mode == "nosa" else cfg.topk, n_blocks)
    B, Hk, _ = scores64.shape
    return np.array([[boundary_fragile(scores64[b, h], k, REL) for h in range(Hk)] for b in range(B)])


# ----------------------------------------------------------------------------- inputs

DTYPES = ["bfloat16", "float32"]


def make_inputs(seed, *, cfg, B, Hq, Hk, D, L, layer, kv_len, C_alloc, scale=2.0, dtype="float32",
                q_dtype=None):
    """q [B, Hq, D] in q_dtype (default: dtype) and the ktilde pool [L, B, C_alloc, Hk, D] in dtype
    (NumPy arrays; bfloat16 ones are ml_dtypes arrays, widened exactly by np.float64); cisw float32."""
    rng = np.random.default_rng(seed)
    kv_len = np.asarray(kv_len, np.int32)
    n_win = np.asarray(nosa.num_windows(jnp.asarray(kv_len), cfg))
    q = rng.standard_normal((B, Hq, D)).astype(np.float32)
    kt = np.full((L, B, C_alloc, Hk, D), np.nan, np.float32)
    cw = np.full((L, B, C_alloc, Hk), np.nan, np.float32)
    for b in range(B):
        n = int(n_win[b])
        kt[layer, b, :n] = rng.standard_normal((n, Hk, D)).astype(np.float32) * scale
        cw[layer, b, :n] = rng.standard_normal((n, Hk)).astype(np.float32)
    n_blocks = -(-(int(kv_len.max()) + 1) // cfg.block_size)
    n_blocks = max(n_blocks, (C_alloc * cfg.kernel_stride) // cfg.block_size)
    q = np.array(jnp.asarray(q, q_dtype or dtype))  # round to nearest, as the model's casts do
    kt = np.array(jnp.asarray(kt, dtype))
    return q, kt, cw, kv_len, n_win, n_blocks


@functools.lru_cache(maxsize=None)
def _jitted(interpret, kw_items):
    kw = dict(kw_items)
    scores = jax.jit(lambda q, kt, nw, qp, layer, cfg, nb: sel.decode_block_scores(
        q, kt, nw, qp, layer, nosa_cfg=cfg, n_blocks=nb, interpret=interpret, **kw), static_argnums=(5, 6))
    select = jax.jit(lambda q, kt, cw, nw, kl, layer, cfg, nb, mode: sel.decode_select(
        q, kt, cw, nw, kl, layer, nosa_cfg=cfg, n_blocks=nb, mode=mode, interpret=interpret, **kw),
        static_argnums=(6, 7, 8))
    return scores, select


_ref_scores = jax.jit(lambda q, kt, nw, qp, layer, cfg, nb: sel.decode_block_scores_reference(
    q, kt, nw, qp, layer, nosa_cfg=cfg, n_blocks=nb), static_argnums=(5, 6))
_ref_select = jax.jit(lambda q, kt, cw, kl, layer, cfg, nb, mode: nosa.select_blocks(
    q[:, None], (kl - 1)[:, None], kt[layer], cw[layer], kl, nb, cfg, mode)[:, :, 0], static_argnums=(5, 6, 7))


def _on_cpu(*xs):
    """Commit arrays to the CPU backend: there lax.top_k breaks ties lowest-index-first, which the
    reference nosa.select_blocks assumes; XLA's GPU top-k does not always do so."""
    cpu = jax.devices("cpu")[0]
    return [jax.device_put(np.asarray(x), cpu) for x in xs]


def assert_scores_match(got, want, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert not np.isnan(got).any(), f"{what}: NaN in kernel scores"
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want), err_msg=f"{what}: +inf pattern")
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want), err_msg=f"{what}: -inf pattern")
    fin = np.isfinite(want)
    if fin.any():
        err = np.abs(got[fin] - want[fin]).max()
        assert err <= ATOL, f"{what}: max abs error {err:.3g} > {ATOL}"


def check_case(seed, *, cfg, B, Hq, Hk, D, L, layer, kv_len, C_alloc, interpret=True, modes=("nosa", "infllmv2"),
               dtype="float32", q_dtype=None, **kw):
    q, kt, cw, kv_len, n_win, nb = make_inputs(seed, cfg=cfg, B=B, Hq=Hq, Hk=Hk, D=D, L=L, layer=layer,
                                                kv_len=kv_len, C_alloc=C_alloc, dtype=dtype, q_dtype=q_dtype)
    scores_fn, select_fn = _jitted(interpret, tuple(sorted(kw.items())))
    q_pos = kv_len - 1
    lay = jnp.int32(layer)
    got = scores_fn(q, kt, n_win, q_pos, lay, cfg, nb)
    ref = _ref_scores(q, kt, n_win, q_pos, lay, cfg, nb)
    s64 = np_block_scores(q, kt[layer], n_win, q_pos, cfg, nb)
    assert_scores_match(ref, s64, "jnp reference vs float64")  # sanity of the test's own reference
    assert_scores_match(got, s64, "kernel vs float64")
    assert_scores_match(got, ref, "kernel vs jnp reference")
    n_rows, n_fragile = 0, 0
    for mode in modes:
        ids = np.asarray(select_fn(q, kt, cw, n_win, kv_len, lay, cfg, nb, mode))
        want = np.asarray(_ref_select(*_on_cpu(q, kt, cw, kv_len), layer, cfg, nb, mode))
        assert ids.shape == want.shape == (B, Hk, min(cfg.topk, nb))
        assert ids.dtype == np.int32
        frag = fragile_rows(s64, cfg, nb, mode)
        for b in range(B):
            for h in range(Hk):
                n_rows += 1
                if frag[b, h]:
                    n_fragile += 1
                    continue
                np.testing.assert_array_equal(ids[b, h], want[b, h], err_msg=f"{mode} b={b} h={h}")
    return n_rows, n_fragile


# ----------------------------------------------------------------------------- CPU (interpret)

_FRAGILE = {"rows": 0, "fragile": 0}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("G,finish,precision,prefetch", [(1, "jnp", None, False), (4, "pallas", None, True),
                                                       (16, "pallas", "split3", True)])
def test_small_config_ragged(dtype, G, finish, precision, prefetch):
    # kv_len 5 and 7 give 0 windows; C_alloc = 61 is not a multiple of the 16-window tile; two
    # tiles per program exercise the in-program loop and the split combine. `precision` picks the
    # float32 dot; bf16 operands always take the one native pass.
    kv_len = [200, 137, 5, 7, 31, 90]
    r, f = check_case(100 + G, cfg=SMALL, B=len(kv_len), Hq=2 * G, Hk=2, D=16, L=3, layer=1, kv_len=kv_len,
                      C_alloc=61, block_c=16, tiles_per_program=2, finish=finish,
                      precision=precision if dtype == "float32" else None, prefetch=prefetch, dtype=dtype)
    _FRAGILE["rows"] += r
    _FRAGILE["fragile"] += f


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("finish", ["pallas", "jnp"])
def test_wide_config_default_plan(finish, dtype):
    kv_len = [240, 17, 161]
    r, f = check_case(7, cfg=WIDE, B=3, Hq=8, Hk=2, D=32, L=2, layer=1, kv_len=kv_len, C_alloc=63, finish=finish,
                      dtype=dtype)
    _FRAGILE["rows"] += r
    _FRAGILE["fragile"] += f


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("G,block_c,tiles,finish", [(4, 32, None, "jnp"), (6, 16, 3, "pallas")])
def test_upstream_config(G, block_c, tiles, finish, dtype):
    # Upstream hyperparameters (top-64 of >64 blocks: genuinely sparse); Hk = 1 and 2.
    kv_len = [5000, 1023, 31, 4100]
    Hk = 2 if G == 4 else 1
    r, f = check_case(11 + G, cfg=UPSTREAM, B=4, Hq=Hk * G, Hk=Hk, D=16, L=2, layer=1, kv_len=kv_len,
                      C_alloc=317, block_c=block_c, tiles_per_program=tiles, finish=finish, dtype=dtype)
    _FRAGILE["rows"] += r
    _FRAGILE["fragile"] += f


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_zero_windows_and_layer0(dtype):
    # Every sequence too short for a window; layer 0 read (the NaN layers are above it).
    kv_len = [1, 3, 8]
    q, kt, cw, kv_len, n_win, nb = make_inputs(3, cfg=SMALL, B=3, Hq=4, Hk=2, D=16, L=2, layer=0,
                                                kv_len=kv_len, C_alloc=20, dtype=dtype)
    got = sel.decode_block_scores(q, kt, n_win, kv_len - 1, 0, nosa_cfg=SMALL, n_blocks=nb, interpret=True,
                                  block_c=16)
    assert_scores_match(got, np_block_scores(q, kt[0], n_win, kv_len - 1, SMALL, nb), "no windows")
    ids = sel.decode_select(q, kt, cw, n_win, kv_len, 0, nosa_cfg=SMALL, n_blocks=nb, mode="nosa",
                            interpret=True, block_c=16)
    want = _ref_select(q, kt, cw, kv_len, 0, SMALL, nb, "nosa")
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(want))


def test_traced_layer_single_compile():
    # `layer` is a traced scalar: one compiled function serves every layer (bf16 pool, as the model's).
    kv_len = [120, 64]
    q, kt, cw, kv_len, n_win, nb = make_inputs(5, cfg=SMALL, B=2, Hq=8, Hk=2, D=16, L=3, layer=2,
                                                kv_len=kv_len, C_alloc=40, dtype="bfloat16")
    kt[1] = np.where(np.isnan(kt[2]), np.nan, -kt[2])  # a different valid layer
    f = jax.jit(lambda q, kt, layer: sel.decode_block_scores(q, kt, n_win, kv_len - 1, layer, nosa_cfg=SMALL,
                                                             n_blocks=nb, interpret=True, block_c=16))
    # The first trace in a process can register config values that enter the tracing context (the
    # second call then traces again, whatever its layer): count the compiles after the first call.
    f(q, kt, jnp.int32(0))
    f(q, kt, jnp.int32(0))
    compiled = f._cache_size()
    for layer in (2, 1):
        assert_scores_match(f(q, kt, jnp.int32(layer)), np_block_scores(q, kt[layer], n_win, kv_len - 1, SMALL, nb),
                            f"layer {layer}")
    assert f._cache_size() == compiled


@pytest.mark.parametrize("q_dtype,dtype", [("float32", "bfloat16"), ("bfloat16", "float32")])
def test_mixed_dtypes_take_the_float32_dot(q_dtype, dtype):
    # q and ktilde of different dtypes: both sides upcast to float32 (nosa.stage1_dot_dtype).
    kv_len = [150, 61, 33]
    r, f = check_case(21, cfg=SMALL, B=3, Hq=8, Hk=2, D=16, L=2, layer=1, kv_len=kv_len, C_alloc=40,
                      block_c=16, dtype=dtype, q_dtype=q_dtype)
    _FRAGILE["rows"] += r
    _FRAGILE["fragile"] += f


def _kernel_dots(q, kt, **kw):
    """The dot_general equations inside the logits kernel's jaxpr (traced for the GPU: interpret=False)."""
    jaxpr = jax.make_jaxpr(lambda q, kt: sel.window_logits(q, kt, jnp.array([5, 9], jnp.int32), 1, **kw))(q, kt)
    kernels = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "pallas_call"]
    assert len(kernels) == 1

    def walk(j):
        for e in j.eqns:
            if e.primitive.name == "dot_general":
                yield e
            for sub in jax.extend.core.jaxprs_in_params(e.params):
                yield from walk(sub)

    return list(walk(kernels[0].params["jaxpr"]))


def test_bf16_kernel_is_one_native_pass():
    """bf16 q and ktilde: ONE dot per tile, on the bf16 operands as loaded, accumulated in float32;
    float32 operands keep the float32-accurate paths (one TF32x3 dot, or three split TF32 dots)."""
    q16 = jax.ShapeDtypeStruct((2, 8, 32), jnp.bfloat16)
    kt16 = jax.ShapeDtypeStruct((2, 2, 40, 2, 32), jnp.bfloat16)
    dots = _kernel_dots(q16, kt16, block_c=16)
    assert len(dots) == 1
    (d,) = dots
    assert [v.aval.dtype for v in d.invars] == [jnp.bfloat16, jnp.bfloat16]
    assert d.params["preferred_element_type"] == jnp.float32
    assert d.outvars[0].aval.dtype == jnp.float32
    q32 = jax.ShapeDtypeStruct((2, 8, 32), jnp.float32)
    kt32 = jax.ShapeDtypeStruct((2, 2, 40, 2, 32), jnp.float32)
    (d,) = _kernel_dots(q32, kt32, block_c=16)
    assert [v.aval.dtype for v in d.invars] == [jnp.float32, jnp.float32]
    assert d.params["precision"] is not None
    assert len(_kernel_dots(q32, kt32, block_c=16, precision="split3")) == 3


@pytest.mark.parametrize("finish", ["jnp", "pallas"])
@pytest.mark.parametrize("context", [16384, 131072])
@pytest.mark.parametrize("dtype", DTYPES)
def test_lowers_to_triton_for_cuda(dtype, context, finish):
    """Cross-lower (no GPU needed) decode_select at the model's sizes (B=16, Hq=32, Hk=2, D=128,
    16K and 128K): the Triton lowering accepts the stage-1 kernel for this ktilde dtype, with grid
    (B, Hk, splits), and each finish's kernels, every Triton module passing the MLIR verifier; no
    layer of the stacked pools is sliced out outside the kernels, and the top-k is the fused Pallas
    kernel when that is the default."""
    from model_utils import verified_triton_modules

    L, B, Hq, Hk, D = 4, 16, 32, 2, 128
    C, n_blocks = context // 16 + 2, context // 64 + 1
    sd = jax.ShapeDtypeStruct
    args = (sd((B, Hq, D), dtype), sd((L, B, C, Hk, D), dtype), sd((L, B, C, Hk), jnp.float32),
            sd((B,), jnp.int32), sd((), jnp.int32))
    txt, modules = verified_triton_modules(lambda q, kt, cw, kl, layer: sel.decode_select(
        q, kt, cw, nosa.num_windows(kl, UPSTREAM), kl, layer, nosa_cfg=UPSTREAM, n_blocks=n_blocks, mode="nosa",
        finish=finish), *args)
    calls = [ln for ln in txt.splitlines() if "xla.gpu.triton" in ln]
    stage1 = [ln for ln in calls if "nosa_decode_stage1_logits" in ln]
    pool = [ln for ln in calls if "nosa_decode_stage1_pool" in ln]
    topk = [ln for ln in calls if "nosa_two_stage_topk" in ln]
    assert len(stage1) == 1 and len(pool) == (finish == "pallas") and len(topk) == (sel.TOPK_IMPL == "pallas")
    assert len(calls) == len(modules) == 1 + len(pool) + len(topk)
    assert f"grid_x = {B} " in stage1[0] and f"grid_y = {Hk} " in stage1[0]
    splits = int(stage1[0].split("grid_z = ")[1].split()[0])
    assert splits & (splits - 1) == 0  # a power of two (17 tiles of windows at 16K: 32 splits) ...
    assert "stablehlo.pad" not in txt  # ... so the finish takes the split statistics unpadded
    assert "stablehlo.transpose" not in txt  # the kernel takes q's rows as they are (G = 16: no pad either)
    assert f"tensor<{B}x{C}x{Hk}x{D}x{'bf16' if dtype == 'bfloat16' else 'f32'}>" not in txt
    # the top-k pools the cis windows itself: no layer of the stacked cis pool is sliced out either
    assert (f"tensor<{B}x{C}x{Hk}xf32>" in txt) == (sel.TOPK_POOL == "xla" or sel.TOPK_IMPL == "xla")


def test_fragile_rows_are_rare():
    # Runs after the cases above (file order); they add their row counts to _FRAGILE.
    if _FRAGILE["rows"] == 0:
        pytest.skip("no selection rows were compared (run the whole file)")
    assert _FRAGILE["fragile"] <= MAX_FRAGILE_FRACTION * _FRAGILE["rows"], _FRAGILE


@pytest.mark.parametrize("topk_impl", ["xla", "pallas"])
@pytest.mark.parametrize("mode", ["nosa", "infllmv2"])
def test_select_ties_lowest_index_first(mode, topk_impl):
    # Integer-valued scores: many exact ties straddle both top-k boundaries (including -inf ties).
    rng = np.random.default_rng(1)
    B, Hk, nb, C = 5, 2, 40, 170
    cfg = SMALL
    b_qk = rng.integers(0, 4, (B, Hk, nb)).astype(np.float32)
    b_qk[0, 0, 30:] = -np.inf
    cw = rng.integers(0, 3, (B, C, Hk)).astype(np.float32)
    kv_len = np.array([320, 161, 100, 9, 250], np.int32)
    n_eff = np.asarray(nosa.num_windows(jnp.asarray(kv_len), cfg))
    q_pos = kv_len - 1
    forced = np.asarray(sel._forced(jnp.asarray(q_pos), nb, cfg))
    b_qk = np.where(forced, np.inf, b_qk).astype(np.float32)
    got = np.asarray(sel.select_from_scores(jnp.asarray(b_qk), jnp.asarray(cw), jnp.asarray(n_eff),
                                            jnp.asarray(q_pos), nosa_cfg=cfg, n_blocks=nb, mode=mode,
                                            topk_impl=topk_impl, interpret=topk_impl == "pallas"))
    # NumPy: pooled cis via the reference pooling, explicit lowest-index-first top-k.
    cwp = np.asarray(nosa.pool_blocks(jnp.moveaxis(jnp.asarray(cw), 2, 1)[:, :, None], jnp.asarray(q_pos)[:, None],
                                      jnp.asarray(n_eff), nb, cfg))[:, :, 0]
    for b in range(B):
        qb = q_pos[b] // cfg.block_size
        for h in range(Hk):
            if mode == "infllmv2":
                ids = np_topk(b_qk[b, h], cfg.topk)
            else:
                picks = np_topk(b_qk[b, h], cfg.qk_select)
                c = np.where(np.arange(nb) > qb, -np.inf, cwp[b, h])
                c[picks] = np.inf
                ids = np_topk(c, cfg.topk)
            ids = np.sort(ids)
            want = np.where(ids > qb, -1, ids)
            np.testing.assert_array_equal(got[b, h], want, err_msg=f"b={b} h={h}")


def test_bad_shapes_raise():
    q = jnp.zeros((1, 4, 24), jnp.float32)
    kt = jnp.zeros((1, 1, 8, 2, 24), jnp.float32)
    with pytest.raises(ValueError, match="power of two"):
        sel.decode_block_scores(q, kt, jnp.array([2]), jnp.array([40]), 0, nosa_cfg=SMALL, n_blocks=8,
                                interpret=True)


def test_precision_must_fit_the_dtype():
    # bf16 operands have one exact-product path; the float32 precisions (and "native" for float32
    # operands) are refused rather than silently ignored.
    for dt, bad in ((jnp.bfloat16, "split3"), (jnp.bfloat16, "tf32x3"), (jnp.float32, "native")):
        q = jnp.zeros((1, 4, 16), dt)
        kt = jnp.zeros((1, 1, 8, 2, 16), dt)
        with pytest.raises(ValueError, match="precision"):
            sel.decode_block_scores(q, kt, jnp.array([2]), jnp.array([40]), 0, nosa_cfg=SMALL, n_blocks=8,
                                    interpret=True, precision=bad)


# ----------------------------------------------------------------------------- GPU (Triton)

GPU_B, GPU_HQ, GPU_HK, GPU_D = 16, 32, 2, 128


@pytest.mark.gpu
@pytest.mark.parametrize("context", [32768, 131072])
@pytest.mark.parametrize("dtype,precision,finish,prefetch", [
    ("bfloat16", None, "jnp", False), ("bfloat16", None, "jnp", True), ("bfloat16", None, "pallas", True),
    ("float32", None, "jnp", True), ("float32", "bf16x6", "jnp", True), ("float32", "split3", "jnp", True)])
def test_gpu_realistic(context, dtype, precision, finish, prefetch):
    rng = np.random.default_rng(context)
    # Ragged batch: full context, a few shorter ones, one below the first window.
    kv_len = np.full(GPU_B, context, np.int32)
    kv_len[1:6] = rng.integers(33, context, 5)
    kv_len[6] = 20
    C_alloc = context // UPSTREAM.kernel_stride + 2
    r, f = check_case(context, cfg=UPSTREAM, B=GPU_B, Hq=GPU_HQ, Hk=GPU_HK, D=GPU_D, L=2, layer=1, kv_len=kv_len,
                      C_alloc=C_alloc, interpret=False, precision=precision, finish=finish, prefetch=prefetch,
                      dtype=dtype)
    assert f <= MAX_FRAGILE_FRACTION * r + 1, (f, r)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("G,finish", [(1, "jnp"), (6, "pallas"), (16, "jnp")])
def test_gpu_small_groups(G, finish, dtype):
    kv_len = [9000, 4100, 700, 31]
    r, f = check_case(G, cfg=UPSTREAM, B=4, Hq=2 * G, Hk=2, D=64, L=3, layer=2, kv_len=kv_len,
                      C_alloc=9000 // 16 + 2, interpret=False, finish=finish, prefetch=G == 6, dtype=dtype)
    assert f <= MAX_FRAGILE_FRACTION * r + 1, (f, r)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_no_layer_copy(dtype):
    # The compiled decode path must not materialise one layer [B, C, Hk, D] of the pool.
    L, C = 4, 8194
    q = jnp.zeros((GPU_B, GPU_HQ, GPU_D), dtype)
    kt = jnp.zeros((L, GPU_B, C, GPU_HK, GPU_D), dtype)
    cw = jnp.zeros((L, GPU_B, C, GPU_HK), jnp.float32)
    kv_len = jnp.full((GPU_B,), 131072, jnp.int32)
    n_win = nosa.num_windows(kv_len, UPSTREAM)
    f = jax.jit(lambda q, kt, cw, layer: sel.decode_select(q, kt, cw, n_win, kv_len, layer, nosa_cfg=UPSTREAM,
                                                           n_blocks=2049, mode="nosa"))
    text = f.lower(q, kt, cw, jnp.int32(3)).compile().as_text()
    layer_shape = f"{'bf16' if dtype == 'bfloat16' else 'f32'}[{GPU_B},{C},{GPU_HK},{GPU_D}]"
    assert layer_shape not in text, "a whole layer of ktilde is copied"
