"""Host KV store -> device slot pool: load_blocks and the "auto" path choice (pallas_kernels/kv_loader.py).

CPU: the "xla" path runs natively with pinned_host host stores; the "pallas" path runs in interpret
mode (which accepts pinned_host operands). Every copy must be bit-exact against a NumPy replay.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.experimental import pallas as pl
from jax.sharding import SingleDeviceSharding

from pallas_kernels import kv_loader
from pallas_kernels.kv_loader import load_blocks, loader_path
from model_utils import copies_of, h200_lowering_text, np_load_blocks

L, B, Hk, NB, BS, D, S, M = 3, 2, 2, 6, 16, 16, 5, 3
DT = jnp.bfloat16
# path, interpret: the two implementations as they run on this machine
PATHS = [("xla", False), ("pallas", True)]


def _pinned():
    return SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host")


def _bits(x):
    x = np.asarray(x)
    return x.view(np.uint16) if x.dtype.itemsize == 2 else x.view(np.uint32)


def _data(seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    hk = f(L, B, Hk, NB, BS, D).astype(DT)
    hv = f(L, B, Hk, NB, BS, D).astype(DT)
    cis = f(L, B, NB * BS, Hk)
    pk = f(L, B, S * BS, Hk, D).astype(DT)
    pv = f(L, B, S * BS, Hk, D).astype(DT)
    pb = f(L, B, S * BS, Hk)
    pk[0, 0, :3, 0, :2] = np.nan  # untouched garbage must survive bit-exactly
    blocks = np.stack([[rng.choice(NB, M, replace=False) for _ in range(Hk)] for _ in range(B)]).astype(np.int32)
    slots = np.stack([[rng.choice(S, M, replace=False) for _ in range(Hk)] for _ in range(B)]).astype(np.int32)
    blocks[0, 1, 2] = -1  # padding
    blocks[1, 0, 0] = -1
    blocks[1, 1, :] = -1  # a head with nothing to load
    slots[1, 1, :] = -1   # ... and garbage slots for it
    hkv = np.stack([hk, hv], axis=4)  # the store: K and V of each block side by side
    return dict(hkv=hkv, cis=cis, pk=pk, pv=pv, pb=pb, blocks=blocks, slots=slots)


def _ref_load(d, layer, new=None):
    return np_load_blocks((d["pk"], d["pv"], d["pb"]), d["hkv"], d["cis"], layer, d["blocks"], d["slots"], BS, new=new)


def _assert_same(got, want):
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_array_equal(_bits(g), _bits(w))


def test_loader_path_is_reported_loudly():
    load = loader_path()
    print(f"\n*** kv_loader: backend={jax.default_backend()} load_blocks path='{load}' ***")
    if jax.default_backend() != "gpu":
        assert load == "xla"
    else:  # "xla" only if the zero-copy check failed, which warned
        assert load in ("pallas", "xla")
    assert loader_path("pallas") == "pallas" and loader_path("xla") == "xla"
    with pytest.raises(ValueError):
        loader_path("mosaic")


_INTERPRETED = functools.partial(load_blocks, path="pallas", interpret=True)


def _boom(*args, **kwargs):
    raise RuntimeError("triton says no")


def _no_op(hkv, cis, pk, pv, pb, *args, **kwargs):  # "loads" nothing: a wrong result
    return pk, pv, pb


def test_auto_check_outcomes():
    """The GPU "auto" check, with the loader injected: works -> "pallas" silently; raises or loads
    wrong data -> "xla" with a warning that carries the reason."""
    assert kv_loader._zero_copy_works(_INTERPRETED) is None
    assert kv_loader._zero_copy_works(functools.partial(load_blocks, path="xla")) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kv_loader._auto_path(_INTERPRETED) == "pallas"
    with pytest.warns(RuntimeWarning, match=r"RuntimeError: triton says no.*XLA dynamic_slice \+ device_put"):
        assert kv_loader._auto_path(_boom) == "xla"
    with pytest.warns(RuntimeWarning, match=r"wrong result in pool_k, pool_v, pool_bias"):
        assert kv_loader._auto_path(_no_op) == "xla"


@pytest.mark.parametrize("loader,want,m", [(_INTERPRETED, "pallas", M), (_boom, "xla", M - 1)])
def test_auto_on_a_pretend_gpu(monkeypatch, loader, want, m):
    """loader_path("auto") as on the GPU, checked once per process, also when first asked while a
    jit is being traced (load_blocks resolves "auto" at trace time; the check must still run)."""
    monkeypatch.setattr(kv_loader, "_on_gpu", lambda: True)
    monkeypatch.setattr(kv_loader, "_pallas_load", loader)
    kv_loader._gpu_auto_path.cache_clear()
    try:
        d = _data(12)
        calls = []
        real = kv_loader._zero_copy_works
        monkeypatch.setattr(kv_loader, "_zero_copy_works", lambda fn=None: calls.append(1) or real(fn))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # the pallas path would need interpret=True here, so only trace (the choice is what matters)
            jaxpr = jax.make_jaxpr(functools.partial(load_blocks, block_size=BS, path="auto"))(
                jnp.asarray(d["hkv"]), jnp.asarray(d["cis"]), jnp.asarray(d["pk"]),
                jnp.asarray(d["pv"]), jnp.asarray(d["pb"]), jnp.int32(0), jnp.asarray(d["blocks"][..., :m]),
                jnp.asarray(d["slots"][..., :m]))  # m differs per case: jit would reuse an earlier trace
            assert loader_path("auto") == want and loader_path() == want
        assert len(calls) == 1  # cached
        assert ("pallas_call" in str(jaxpr)) == (want == "pallas")
        msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        if want == "xla":
            assert len(msgs) == 1 and "triton says no" in msgs[0]
        else:
            assert msgs == []
    finally:
        kv_loader._gpu_auto_path.cache_clear()


@pytest.mark.parametrize("path,interpret,unroll_max", [("xla", False, 256), ("xla", False, 0), ("pallas", True, 0)])
@pytest.mark.parametrize("host_mem", ["pinned_host", "device"])
def test_load_blocks_exact(path, interpret, unroll_max, host_mem):
    d = _data(1)
    put = (lambda x: jax.device_put(x, _pinned())) if host_mem == "pinned_host" else jnp.asarray
    hkv = put(d["hkv"])
    if host_mem == "pinned_host":
        assert hkv.sharding.memory_kind == "pinned_host" and jax.typeof(hkv).memory_space == jax.memory.Space.Host
    layer = 2
    out = load_blocks(hkv, jnp.asarray(d["cis"]), jnp.asarray(d["pk"]), jnp.asarray(d["pv"]),
                      jnp.asarray(d["pb"]), jnp.int32(layer), jnp.asarray(d["blocks"]), jnp.asarray(d["slots"]),
                      block_size=BS, path=path, interpret=interpret, xla_unroll_max=unroll_max)
    want = _ref_load(d, layer)
    _assert_same(out, want)
    # the reference really changed something, and left the other layers / untouched slots alone
    assert not np.array_equal(_bits(want[0]), _bits(d["pk"]))
    np.testing.assert_array_equal(_bits(out[0][:layer]), _bits(d["pk"][:layer]))
    np.testing.assert_array_equal(_bits(out[0][0, 0, :3, 0, :2]), _bits(d["pk"][0, 0, :3, 0, :2]))  # NaNs kept
    assert all(o.sharding.memory_kind == "device" for o in out)


@pytest.mark.parametrize("path,interpret", PATHS)
def test_load_blocks_writes_the_new_token(path, interpret):
    """With the decode step's token: after the copies, each (b, h) with a row >= 0 gets the token's
    K, V and cis in that row - inside a block copied there this call (b0 h0), in a slot not loaded
    (b0 h1, b1 h0) - and a row of -1 writes nothing (b1 h1)."""
    _check_token_write(path, interpret)


@pytest.mark.gpu
@pytest.mark.parametrize("load_path", ["pallas", "xla"])
def test_gpu_load_blocks_writes_the_new_token(load_path):
    """The same on the GPU: the compiled kernel (copies and token in one call) from pinned_host."""
    _check_token_write(load_path, False)


def _check_token_write(path, interpret):
    d = _data(3)
    rng = np.random.default_rng(3)
    new_k = rng.standard_normal((B, Hk, D)).astype(np.float32).astype(DT)
    new_v = rng.standard_normal((B, Hk, D)).astype(np.float32).astype(DT)
    new_c = rng.standard_normal((B, Hk)).astype(np.float32)
    loaded = d["slots"][0, 0][d["blocks"][0, 0] >= 0][0]
    free = lambda b, h: next(s for s in range(S) if s not in set(d["slots"][b, h][d["blocks"][b, h] >= 0].tolist()))
    rows = np.array([[loaded * BS + 5, free(0, 1) * BS + BS - 1], [free(1, 0) * BS, -1]], np.int32)
    layer = 1
    out = load_blocks(jax.device_put(d["hkv"], _pinned()), jnp.asarray(d["cis"]), jnp.asarray(d["pk"]),
                      jnp.asarray(d["pv"]), jnp.asarray(d["pb"]), jnp.int32(layer), jnp.asarray(d["blocks"]),
                      jnp.asarray(d["slots"]), block_size=BS, new_k=jnp.asarray(new_k), new_v=jnp.asarray(new_v),
                      new_cis=jnp.asarray(new_c), new_row=jnp.asarray(rows), path=path, interpret=interpret)
    rk, rv, rb = _ref_load(d, layer, new=(new_k, new_v, new_c, rows))
    _assert_same(out, (rk, rv, rb))
    assert not np.array_equal(_bits(rk), _bits(_ref_load(d, layer)[0]))  # the token rows changed something


@pytest.mark.parametrize("path,interpret", PATHS)
def test_load_blocks_in_jitted_loop_pinned(path, interpret):
    """Traced layer index inside a jitted fori_loop, host stores in pinned_host, pools donated."""
    d = _data(2)
    pin = _pinned()
    hkv = jax.device_put(d["hkv"], pin)
    blocks = np.stack([d["blocks"], np.roll(d["blocks"], 1, axis=2)])  # a different plan per step
    slots = np.stack([d["slots"], d["slots"]])

    def f(pk, pv, pb, hkv, cis, blocks, slots):
        def body(i, c):
            return load_blocks(hkv, cis, *c, (i + 1) % L, blocks[i], slots[i], block_size=BS, path=path,
                               interpret=interpret)
        return lax.fori_loop(0, 2, body, (pk, pv, pb))

    out = jax.jit(f, donate_argnums=(0, 1, 2))(jnp.asarray(d["pk"]), jnp.asarray(d["pv"]), jnp.asarray(d["pb"]),
                                               hkv, jnp.asarray(d["cis"]), jnp.asarray(blocks),
                                               jnp.asarray(slots))
    want = _ref_load(d, 1)
    d2 = dict(d, pk=want[0], pv=want[1], pb=want[2], blocks=blocks[1])
    _assert_same(out, _ref_load(d2, 2))


def test_load_blocks_xla_in_place_under_donation():
    """Compiled HLO of a jitted fori_loop with donated pools: no copy of any pool (nor host store)."""
    d = _data(3)
    pin = _pinned()
    hkv = jax.device_put(d["hkv"], pin)

    def f(pk, pv, pb, hkv, cis, blocks, slots):
        def body(i, c):
            return load_blocks(hkv, cis, *c, i % L, blocks, slots, block_size=BS, path="xla")
        return lax.fori_loop(0, 4, body, (pk, pv, pb))

    args = (jnp.asarray(d["pk"]), jnp.asarray(d["pv"]), jnp.asarray(d["pb"]), hkv, jnp.asarray(d["cis"]),
            jnp.asarray(d["blocks"]), jnp.asarray(d["slots"]))
    hlo = jax.jit(f, donate_argnums=(0, 1, 2)).lower(*args).compile().as_text()
    shapes = [f"bf16[{L},{B},{S * BS},{Hk},{D}]", f"f32[{L},{B},{S * BS},{Hk}]", f"bf16[{L},{B},{Hk},{NB},2,{BS},{D}]"]
    assert any(shapes[0] in ln for ln in hlo.splitlines())  # the pattern does match the pool
    assert copies_of(hlo, shapes) == []


def test_load_blocks_pallas_cuda_lowering_in_place():
    """The Triton kernel as the H200 will compile it: one custom call per load, the three pools
    aliased to its outputs, the pinned_host stores passed straight in (no device_put / placement
    annotation), inside the fori_loop. (The interpret-mode CPU HLO is not representative: the
    interpreter copies the aliased pools; bench/probe_offload.py checks the compiled GPU HLO.)"""
    pin = _pinned()
    hkv = jax.device_put(jnp.zeros((L, B, Hk, NB, 2, 64, 128), DT), pin)
    pk = jnp.zeros((L, B, S * 64, Hk, 128), DT)
    pb = jnp.zeros((L, B, S * 64, Hk), jnp.float32)
    cis = jnp.zeros((L, B, NB * 64, Hk), jnp.float32)
    ids = jnp.zeros((B, Hk, M), jnp.int32)

    def f(pk, pv, pb, hkv, cis, blocks, slots):
        def body(i, c):
            return load_blocks(hkv, cis, *c, i % L, blocks, slots, block_size=64, path="pallas")
        return lax.fori_loop(0, 3, body, (pk, pv, pb))

    txt = h200_lowering_text(f, pk, pk, pb, hkv, cis, ids, ids)
    calls = [ln for ln in txt.splitlines() if "__gpu$xla.gpu.triton" in ln]
    assert len(calls) == 1 and "nosa_kv_load_blocks" in calls[0]
    assert calls[0].count("output_operand_alias<") == 3
    assert f"grid_x = {B} : i32, grid_y = {Hk} : i32, grid_z = {M} : i32" in calls[0]
    main = next(ln for ln in txt.splitlines() if "func.func public @main" in ln)
    assert main.count('mhlo.memory_kind = "pinned_host"') == 1
    assert "annotate_device_placement" not in txt


def test_load_blocks_with_the_token_lowers_to_one_verified_triton_kernel():
    """With the token, still one in-place Triton call (one more program per (b, h)), and its module
    passes the MLIR verifier (cross-lowered for the H200; the 8B decode's block, head and top-k
    sizes, few layers and blocks: the store is a real pinned array)."""
    from model_utils import verified_triton_modules

    Lb, Bb, Hb, NBb, Sb, Mb = 2, 4, 2, 16, 32, 64
    hkv = jax.device_put(jnp.zeros((Lb, Bb, Hb, NBb, 2, 64, 128), DT), _pinned())
    pk = jnp.zeros((Lb, Bb, Sb * 64, Hb, 128), DT)
    pb = jnp.zeros((Lb, Bb, Sb * 64, Hb), jnp.float32)
    cis = jnp.zeros((Lb, Bb, NBb * 64, Hb), jnp.float32)
    ids = jnp.zeros((Bb, Hb, Mb), jnp.int32)
    new = jnp.zeros((Bb, Hb, 128), DT)

    def f(pk, pv, pb, hkv, cis, blocks, slots, nk, nv, nc, row):
        return load_blocks(hkv, cis, pk, pv, pb, jnp.int32(5), blocks, slots, block_size=64, new_k=nk, new_v=nv,
                           new_cis=nc, new_row=row, path="pallas")

    txt, modules = verified_triton_modules(f, pk, pk, pb, hkv, cis, ids, ids, new, new,
                                           jnp.zeros((Bb, Hb), jnp.float32), jnp.zeros((Bb, Hb), jnp.int32))
    calls = [ln for ln in txt.splitlines() if "__gpu$xla.gpu.triton" in ln]
    assert len(calls) == 1 and len(modules) == 1 and calls[0].count("output_operand_alias<") == 3
    assert f"grid_x = {Bb} : i32, grid_y = {Hb} : i32, grid_z = {Mb + 1} : i32" in calls[0]


def test_pallas_call_output_is_device_typed_even_when_aliased_to_pinned_host():
    """jax 0.11.2 fact (fails loudly if jax changes it; the kv_loader docstring cites it): a
    pallas_call accepts a pinned_host operand but types every output, aliased or not, as device
    memory, so a Pallas kernel cannot hand back an updated host store."""
    x = jax.device_put(jnp.zeros((2, 16), jnp.float32), _pinned())

    def kernel(x_in, o_ref):
        o_ref[0, :] = jnp.ones((16,), jnp.float32)

    def f(x):
        return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                              in_specs=[pl.BlockSpec(memory_space=pl.ANY)], out_specs=pl.BlockSpec(memory_space=pl.ANY),
                              input_output_aliases={0: 0}, interpret=True)(x)

    out_aval = jax.jit(f).trace(x).jaxpr.out_avals[0]
    assert jax.typeof(x).memory_space == jax.memory.Space.Host
    assert out_aval.memory_space == jax.memory.Space.Device
    np.testing.assert_array_equal(np.asarray(jax.jit(f)(x)), np.array([[1.0] * 16, [0.0] * 16], np.float32))


def test_copy_detector_sees_the_interpreter_copies():
    """The no-copy checks above can fail: the interpret-mode pallas path does copy the pools."""
    d = _data(8)

    def f(pk, pv, pb, hkv, cis, blocks, slots):
        def body(i, c):
            return load_blocks(hkv, cis, *c, i % L, blocks, slots, block_size=BS, path="pallas", interpret=True)
        return lax.fori_loop(0, 2, body, (pk, pv, pb))

    args = [jnp.asarray(d[n]) for n in ("pk", "pv", "pb", "hkv", "cis", "blocks", "slots")]
    hlo = jax.jit(f, donate_argnums=(0, 1, 2)).lower(*args).compile().as_text()
    assert copies_of(hlo, [f"bf16[{L},{B},{S * BS},{Hk},{D}]"])


@pytest.mark.parametrize("path,interpret", PATHS)
def test_decode_loop_shape_scan_over_layers_in_fori_loop(path, interpret):
    """How the decode loop loads: fori_loop over steps carrying the donated pinned host stores and
    the pools, scan over layers inside, one load per layer with a different plan per (step, layer).
    Bit-exact; for the xla path no copy of the host stores or pools in the compiled HLO."""
    d = _data(6)
    pin = _pinned()
    steps = 3
    rng = np.random.default_rng(7)
    blocks = np.stack([np.stack([np.roll(d["blocks"], int(rng.integers(M)), axis=2) for _ in range(L)])
                       for _ in range(steps)])  # [steps, L, B, Hk, M]
    slots = np.broadcast_to(d["slots"], blocks.shape).copy()

    def f(hkv, pk, pv, pb, cis, blocks, slots):
        def step(t, carry):
            def layer_fn(c, xs):
                hkv, pk, pv, pb = c
                layer, bl, sl = xs
                pk, pv, pb = load_blocks(hkv, cis, pk, pv, pb, layer, bl, sl, block_size=BS, path=path,
                                         interpret=interpret)
                return (hkv, pk, pv, pb), None

            return lax.scan(layer_fn, carry, (jnp.arange(L, dtype=jnp.int32), blocks[t], slots[t]))[0]

        return lax.fori_loop(0, steps, step, (hkv, pk, pv, pb))

    args = (jax.device_put(d["hkv"], pin), jnp.asarray(d["pk"]), jnp.asarray(d["pv"]),
            jnp.asarray(d["pb"]), jnp.asarray(d["cis"]), jnp.asarray(blocks), jnp.asarray(slots))
    jf = jax.jit(f, donate_argnums=(0, 1, 2, 3))
    if path == "xla":  # in place: no copy of the host store or pools per step
        hlo = jf.lower(*args).compile().as_text()
        shapes = [f"bf16[{L},{B},{S * BS},{Hk},{D}]", f"f32[{L},{B},{S * BS},{Hk}]", f"bf16[{L},{B},{Hk},{NB},2,{BS},{D}]"]
        assert any(shapes[0] in ln for ln in hlo.splitlines())
        assert copies_of(hlo, shapes) == []
    out = jf(*args)
    assert out[0].sharding.memory_kind == "pinned_host"

    r = {k_: v_.copy() for k_, v_ in d.items()}
    for t in range(steps):
        for layer in range(L):
            r["blocks"], r["slots"] = blocks[t, layer], slots[t, layer]
            r["pk"], r["pv"], r["pb"] = _ref_load(r, layer)
    _assert_same(out, (d["hkv"], r["pk"], r["pv"], r["pb"]))


@pytest.mark.gpu
@pytest.mark.parametrize("load_path", ["pallas", "xla"])
def test_gpu_load_blocks_pinned_host(load_path):
    """On the GPU: the compiled Triton kernel (and the xla path) read the pinned_host store, bit-exact."""
    d = _data(9)
    pin = _pinned()
    print(f"\n*** kv_loader GPU: load_blocks path='{load_path}' (auto='{loader_path()}') ***")
    out = load_blocks(jax.device_put(d["hkv"], pin), jnp.asarray(d["cis"]),
                      jnp.asarray(d["pk"]), jnp.asarray(d["pv"]), jnp.asarray(d["pb"]), jnp.int32(1),
                      jnp.asarray(d["blocks"]), jnp.asarray(d["slots"]), block_size=BS, path=load_path)
    _assert_same(out, _ref_load(d, 1))
