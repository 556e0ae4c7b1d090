"""The decode cache write's Pallas path (`pallas_kernels.cache_write`) stores exactly what
`nosa_jax.cache.cache_write` stores: on the CPU in interpret mode at small shapes (every mode,
window-completing and partial positions, writes past the allocation), cross-lowered for the H200
(one Triton kernel updating the cache in place), and on the GPU at the 8B cache shape (marked)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model_utils import copies_of, hlo_instructions, hlo_shape, triton_small_config, verified_triton_modules
from nosa_jax.cache import cache_write, init_cache
from pallas_kernels.cache_write import decode_cache_write

FIELDS = ("k", "v", "cis", "ktilde", "cisw")
SMALL = triton_small_config()


def _random_cache(cfg, batch, capacity, dtype, mode, seed):
    """A cache whose every entry holds random values (so a missed or misplaced write shows)."""
    rng = np.random.default_rng(seed)
    c = init_cache(cfg, batch, capacity, dtype, mode)
    rand = lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype)  # noqa: E731
    return jax.tree.map(lambda a: rand(a) if a.ndim > 1 and jnp.issubdtype(a.dtype, jnp.floating) else a, c)


def _token(cfg, batch, seed):
    rng = np.random.default_rng(seed)
    Hk, D = cfg.num_key_value_heads, cfg.head_dim
    return (jnp.asarray(rng.standard_normal((batch, 1, Hk, D)), jnp.float32),
            jnp.asarray(rng.standard_normal((batch, 1, Hk, D)), jnp.float32),
            jnp.asarray(rng.standard_normal((batch, 1, Hk)), jnp.float32))


def _assert_same(a, b):
    for f in FIELDS:
        x, y = np.asarray(getattr(a, f)), np.asarray(getattr(b, f))
        assert x.dtype == y.dtype and x.shape == y.shape, f
        np.testing.assert_array_equal(x.view(np.uint16) if x.itemsize == 2 else x,
                                      y.view(np.uint16) if y.itemsize == 2 else y, err_msg=f)


@pytest.mark.parametrize("mode", ["nosa", "infllmv2", "full"])
@pytest.mark.parametrize("layer", [0, 1])
def test_equals_cache_write_cpu_interpret(mode, layer):
    cfg, n = SMALL, SMALL.nosa
    cache = _random_cache(cfg, 5, 70, jnp.bfloat16, mode, seed=layer)
    T = cache.k.shape[2]
    # 0; a token completing window 2 (2 S + K - 1); one inside a window; the last row; past the
    # allocation (dropped, as the scatters' mode="drop")
    start = jnp.asarray([0, 2 * n.kernel_stride + n.kernel_size - 1, 13, T - 1, T + 3], jnp.int32)
    k, v, cis = _token(cfg, 5, seed=10 + layer)
    want = cache_write(cache, layer, start, k, v, cis, n)
    got = decode_cache_write(cache, layer, start, k, v, cis, n, impl="pallas", interpret=True)
    _assert_same(got, want)
    # v handed over as the model's q|k|v projection: the values are its last Hk heads
    junk = jnp.asarray(np.random.default_rng(layer).standard_normal((5, 1, 3, v.shape[-1])), v.dtype)
    heads = jnp.concatenate([junk, v], axis=2)
    _assert_same(decode_cache_write(cache, layer, start, k, heads, cis, n, impl="pallas", interpret=True), want)
    with pytest.raises(ValueError, match="last"):
        decode_cache_write(cache, layer, start, k, v[:, :, :1], cis, n, impl="pallas", interpret=True)
    # the reference wrote something at each in-range row (the comparison is not between no-ops)
    changed = np.asarray(want.k[layer, :4] != cache.k[layer, :4]).any(axis=(-1, -2))  # [4, T]
    assert changed[np.arange(4), np.asarray(start[:4])].all()


def test_prefill_chunks_and_xla_impl_take_cache_write():
    cfg, n = SMALL, SMALL.nosa
    cache = _random_cache(cfg, 2, 70, jnp.bfloat16, "nosa", seed=3)
    rng = np.random.default_rng(4)
    Hk, D = cfg.num_key_value_heads, cfg.head_dim
    k = jnp.asarray(rng.standard_normal((2, 6, Hk, D)), jnp.float32)
    cis = jnp.asarray(rng.standard_normal((2, 6, Hk)), jnp.float32)
    start = jnp.asarray([3, 40], jnp.int32)
    _assert_same(decode_cache_write(cache, 1, start, k, k, cis, n, impl="pallas", interpret=True),
                 cache_write(cache, 1, start, k, k, cis, n))
    k1, v1, c1 = _token(cfg, 2, seed=5)
    _assert_same(decode_cache_write(cache, 0, start, k1, v1, c1, n, impl="xla"),
                 cache_write(cache, 0, start, k1, v1, c1, n))
    _assert_same(decode_cache_write(cache, 0, start, k1, jnp.concatenate([k1, v1], axis=2), c1, n, impl="xla"),
                 cache_write(cache, 0, start, k1, v1, c1, n))  # values in the last Hk heads
    with pytest.raises(ValueError, match="impl"):
        decode_cache_write(cache, 0, start, k1, v1, c1, n, impl="triton")


@pytest.mark.parametrize("mode", ["nosa", "infllmv2"])
def test_lowers_to_one_in_place_triton_kernel(mode):
    """8B cache shape (32 layers cut to 4, B=16, 16K, Hk=2, D=128; v as the model hands it, the
    q|k|v projection's 36 heads): one Triton kernel, grid (B, Hk), every cache operand aliased to
    its output and passed whole (the layer is picked in-kernel).
    (The window means read 32 rows of one layer through a slice that XLA fuses into their gather;
    the GPU test checks that no layer is materialised.)"""
    from nosa_jax.config import ModelConfig

    cfg = ModelConfig(vocab_size=64, hidden_size=256, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=32, num_key_value_heads=2, head_dim=128, max_position_embeddings=32768)
    cache = jax.eval_shape(lambda: init_cache(cfg, 16, 16384, jnp.bfloat16, mode))
    sd = jax.ShapeDtypeStruct
    tok = (sd((16, 1, 2, 128), jnp.bfloat16), sd((16, 1, 36, 128), jnp.bfloat16), sd((16, 1, 2), jnp.float32))
    txt, modules = verified_triton_modules(
        lambda c, layer, start, k, v, cis: decode_cache_write(c, layer, start, k, v, cis, cfg.nosa, impl="pallas"),
        cache, sd((), jnp.int32), sd((16,), jnp.int32), *tok)
    calls = [ln for ln in txt.splitlines() if "xla.gpu.triton" in ln]
    assert len(calls) == 1 and len(modules) == 1
    assert "grid_x = 16 " in calls[0] and "grid_y = 2 " in calls[0]
    n_caches = 5 if mode == "nosa" else 4
    assert calls[0].count("#stablehlo.output_operand_alias<") == n_caches
    T = cache.k.shape[2]
    assert calls[0].count(f"tensor<4x16x{T}x2x128xbf16>") >= 4  # k and v, as operands and results
    assert modules[0].count("tt.store") >= n_caches


@pytest.mark.parametrize("mode", ["nosa", "infllmv2"])
def test_offload_append_lowers_to_one_in_place_triton_kernel(mode):
    """The offloaded cache's append (append_token) at the 8B shape (4 of 32 layers, B=16, 16K, ring
    of 64): one Triton kernel, grid (B, Hk), the ring, the cis history and the window arrays (cisw
    in mode "nosa" only) aliased to its outputs and passed whole; the Triton module passes the
    MLIR verifier."""
    from nosa_jax.config import NosaConfig
    from pallas_kernels.cache_write import append_token

    n = NosaConfig()
    L, B, T, Hk, D, R = 4, 16, 16384, 2, 128, 64
    C = (T - n.kernel_size) // n.kernel_stride + 1
    sd = jax.ShapeDtypeStruct
    state = (sd((L, B, R, Hk, D), jnp.bfloat16), sd((L, B, T, Hk), jnp.float32), sd((L, B, C, Hk, D), jnp.bfloat16),
             sd((L, B, C if mode == "nosa" else 0, Hk), jnp.float32))
    txt, modules = verified_triton_modules(
        lambda r, c, kt, cw, layer, pos, live, k, cis: append_token(r, c, kt, cw, layer, pos, live, k, cis, n),
        *state, sd((), jnp.int32), sd((B,), jnp.int32), sd((B,), jnp.bool_), sd((B, Hk, D), jnp.bfloat16),
        sd((B, Hk), jnp.float32))
    calls = [ln for ln in txt.splitlines() if "xla.gpu.triton" in ln]
    assert len(calls) == 1 and len(modules) == 1
    assert "grid_x = 16 " in calls[0] and "grid_y = 2 " in calls[0]
    assert calls[0].count("#stablehlo.output_operand_alias<") == (4 if mode == "nosa" else 3)
    assert modules[0].count("tt.store") >= (4 if mode == "nosa" else 3)


# ----------------------------------------------------------------------------- GPU (Triton)

@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["nosa", "infllmv2"])
def test_equals_cache_write_gpu(mode):
    """The 8B cache layout (4 of 32 layers), batch 16, 16K, bf16: the same bits as cache_write, and
    the jitted write with the cache donated compiles without a copy of the k cache."""
    from nosa_jax.config import ModelConfig

    cfg = ModelConfig(vocab_size=64, hidden_size=256, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=32, num_key_value_heads=2, head_dim=128, max_position_embeddings=32768)
    n = cfg.nosa
    cache = _random_cache(cfg, 16, 16384, jnp.bfloat16, mode, seed=7)
    rng = np.random.default_rng(8)
    start = jnp.asarray(rng.integers(0, 16384, 16), jnp.int32).at[0].set(2 * n.kernel_stride + n.kernel_size - 1)
    k, v, cis = _token(cfg, 16, seed=9)
    want = jax.jit(cache_write, static_argnums=(6,))(cache, 2, start, k, v, cis, n)
    fn = jax.jit(lambda c, layer, s, k, v, cis: decode_cache_write(c, layer, s, k, v, cis, n, impl="pallas"),
                 donate_argnums=(0,))
    hlo = fn.lower(cache, 2, start, k, v, cis).compile().as_text()
    assert not copies_of(hlo, [hlo_shape(cache.k)])
    layer = ",".join(map(str, cache.k.shape[1:]))
    sliced = [ln for ty, _, ln in hlo_instructions(hlo, fused=False) if ty.startswith((f"bf16[{layer}]", f"bf16[1,{layer}]"))]
    assert not sliced  # no layer of the cache made into a buffer of its own (a fusion may slice and gather rows)
    got = fn(jax.tree.map(jnp.copy, cache), 2, start, k, v, cis)
    _assert_same(got, want)
