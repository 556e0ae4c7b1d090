"""Host-offloaded KV cache: offloaded decode equals on-device decode, the pool's invariants hold
after every step, loads are exactly the newly needed blocks, no per-step copies, clear errors."""

import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model_utils import copies_of, hlo_shape, random_model, small_config, triton_small_config
from nosa_jax.generate import (GenerationError, Generator, OffloadSettings, Sampler, decode_loop,
                               decode_step, generate)
from nosa_jax.offload import assign_slots, num_selected
from pallas_kernels.kv_loader import loader_path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ (the prefill probe)

PROMPTS = [list(range(3, 8)), [int(x) for x in np.random.default_rng(1).integers(0, 61, 37)],
           [int(x) for x in np.random.default_rng(2).integers(0, 61, 20)]]


def _memory_kind(x) -> str:
    return getattr(x.sharding, "memory_kind", None)


@pytest.mark.parametrize("mode", ["nosa", "infllmv2"])
@pytest.mark.parametrize("pool", ["topk", "2topk"])
def test_offloaded_generation_equals_on_device(mode, pool):
    """1000 greedy steps of a ragged batch: the same tokens and the same per-step logits as the
    on-device cache, with a pool of exactly top-k slots and with twice that (victim cache)."""
    cfg = small_config()
    model = random_model(cfg, mode, seed=3)
    n_new = 1000
    K = num_selected(cfg, max(map(len, PROMPTS)) + n_new)
    slots = K if pool == "topk" else 2 * K
    print(f"loader path: {loader_path('auto')}")
    ref = generate(model, PROMPTS, max_new_tokens=n_new, eos_ids=[], save_logits=True)
    off = generate(model, PROMPTS, max_new_tokens=n_new, eos_ids=[], save_logits=True, kv_offload=True,
                   pool_slots=slots)
    assert off.tokens == ref.tokens
    scale = np.abs(ref.logits).max()
    np.testing.assert_allclose(off.logits, ref.logits, atol=1e-5 * scale, rtol=0)
    s = off.offload_stats
    assert s["misses"].shape == (n_new - 1, cfg.num_hidden_layers)
    # the first decode step loads every selected block into the empty pool
    np.testing.assert_array_equal(s["misses"][0], s["selected"][0])
    assert 0 < s["hit_rate_mean"] <= 1 and 0 < s["gamma_mean"] <= 1
    if pool == "2topk":
        top = generate(model, PROMPTS, max_new_tokens=64, eos_ids=[], kv_offload=True, pool_slots=K)
        big = generate(model, PROMPTS, max_new_tokens=64, eos_ids=[], kv_offload=True, pool_slots=2 * K)
        assert big.offload_stats["misses"].sum() <= top.offload_stats["misses"].sum()


def test_fit_pool_is_the_largest_the_budget_holds():
    """offload.fit_pool_slots: device state + one sequence's prefill (its cache and two layers'
    staging copies) within the budget, one slot more over it (or every block of the capacity already
    in the pool); top-k when short."""
    from nosa_jax.config import SHAPES, ModelConfig
    from nosa_jax.offload import fit_pool_slots, offload_bytes, prefill_bytes

    cfg = ModelConfig(**SHAPES["8b"])
    for ctx, batch, budget_gib in ((131072, 27, 62.75), (65536, 55, 62.75), (16384, 16, 62.75), (131072, 27, 1.0)):
        budget = int(budget_gib * 2**30)
        K, blocks = num_selected(cfg, ctx), ctx // cfg.nosa.block_size
        S = fit_pool_slots(cfg, batch, ctx, jnp.bfloat16, "nosa", budget)

        def need(slots):
            return offload_bytes(cfg, batch, ctx, jnp.bfloat16, "nosa", slots)[0] + prefill_bytes(cfg, ctx, jnp.bfloat16,
                                                                                                   "nosa")
        if need(K) > budget:
            assert S == K  # nothing fits: the generator's memory check reports it
            continue
        assert K <= S <= blocks and need(S) <= budget
        assert S == blocks or need(S + 1) > budget
    # 16 sequences at 16K: 60 GiB holds every block of the context (256), the most a pool can use
    assert fit_pool_slots(cfg, 16, 16384, jnp.bfloat16, "nosa", 60 * 2**30) == 16384 // 64  # the whole context


def test_offloaded_generation_with_a_fit_pool():
    """pool_slots="fit": the pool takes what the device budget leaves (up to every block), and the
    tokens and logits stay those of the on-device cache; bad pool_slots values are refused."""
    from nosa_jax.offload import fit_pool_slots, offload_bytes, prefill_bytes

    cfg = small_config()
    model = random_model(cfg, "nosa", seed=6)
    n_new = 200
    cap = max(map(len, PROMPTS)) + n_new
    K = num_selected(cfg, cap)
    chunk = max(map(len, PROMPTS))  # the prompts are prefilled in one call each
    # a budget for about 1.5 x top-k slots (between top-k and every block) and one prefill
    budget = ((offload_bytes(cfg, len(PROMPTS), cap, model.dtype, "nosa", K)[0]
               + offload_bytes(cfg, len(PROMPTS), cap, model.dtype, "nosa", 2 * K)[0]) // 2
              + prefill_bytes(cfg, cap, model.dtype, "nosa", chunk))
    S = fit_pool_slots(cfg, len(PROMPTS), cap, model.dtype, "nosa", budget, chunk)
    assert K < S < -(-cap // cfg.nosa.block_size)
    gen = Generator(model, eos_ids=(), offload=OffloadSettings(pool_slots="fit"))
    st, _, _ = gen.start(PROMPTS, max_new_tokens=n_new, memory_budget=budget)
    assert st.cache.table.shape[-1] == S
    ref = generate(model, PROMPTS, max_new_tokens=n_new, eos_ids=[], save_logits=True)
    off = generate(model, PROMPTS, max_new_tokens=n_new, eos_ids=[], save_logits=True, kv_offload=True,
                   pool_slots="fit", memory_budget=budget)
    assert off.tokens == ref.tokens
    np.testing.assert_allclose(off.logits, ref.logits, atol=1e-5 * np.abs(ref.logits).max(), rtol=0)
    for bad in (0, -3, "all", 2.5):
        with pytest.raises(GenerationError, match="pool_slots"):
            OffloadSettings(pool_slots=bad)
    # a fit pool leaves room for one prefill: an explicit group of two is refused up front
    # (it ran out of memory inside the start on the GPU, 8B / 128K, session 10), one is accepted
    two = Generator(model, eos_ids=(), offload=OffloadSettings(pool_slots="fit", prefill_group=2))
    with pytest.raises(GenerationError, match="prefill_group=2 needs .* lower prefill_group"):
        two.start(PROMPTS, max_new_tokens=n_new, memory_budget=budget)
    one = Generator(model, eos_ids=(), offload=OffloadSettings(pool_slots="fit", prefill_group=1))
    assert one.start(PROMPTS, max_new_tokens=n_new, memory_budget=budget)[0].cache.table.shape[-1] == S


def test_offloaded_generation_stops_like_on_device():
    """Per-sequence EOS: a sequence that stops early writes nothing more and the others go on."""
    cfg = small_config()
    model = random_model(cfg, "nosa", seed=4)
    free = generate(model, PROMPTS, max_new_tokens=80, eos_ids=[])
    eos = free.tokens[0][30]  # sequence 0 stops at (or before) step 30
    ref = generate(model, PROMPTS, max_new_tokens=80, eos_ids=[eos], save_logits=True)
    off = generate(model, PROMPTS, max_new_tokens=80, eos_ids=[eos], save_logits=True, kv_offload=True)
    assert off.tokens == ref.tokens
    assert len(ref.tokens[0]) <= 31
    live = np.zeros(ref.logits.shape[:2], bool)
    for i, t in enumerate(ref.tokens):
        live[i, : len(t)] = True
    np.testing.assert_allclose(off.logits[live], ref.logits[live], atol=1e-5 * np.abs(ref.logits).max(), rtol=0)


def _step_device(model, prompts, n_new):
    gen = Generator(model, eos_ids=())
    st, _, _ = gen.start(prompts, max_new_tokens=n_new)
    return gen, st


@pytest.mark.parametrize("slots_factor", [1, 2])
def test_pool_invariants_every_step(slots_factor):
    """After every step, for every (layer, sequence, kv head): the slot table holds the selected
    blocks (the same as the on-device cache selects) plus victims, each resident slot's contents
    equal the host block, the loads are exactly the selected blocks that were not resident, and the
    host store holds every token written so far."""
    cfg = small_config()
    model = random_model(cfg, "nosa", seed=5)
    n_new = 160
    K = num_selected(cfg, max(map(len, PROMPTS)) + n_new)
    S = slots_factor * K
    dev_gen, dev_st = _step_device(model, PROMPTS, n_new)
    gen = Generator(model, eos_ids=(), offload=OffloadSettings(pool_slots=S))
    st, _, _ = gen.start(PROMPTS, max_new_tokens=n_new)
    assert _memory_kind(st.cache.host_kv) == "pinned_host"
    bs = cfg.nosa.block_size
    L, B, Hk = cfg.num_hidden_layers, len(PROMPTS), cfg.num_key_value_heads
    for step in range(n_new - 1):
        before = np.asarray(st.cache.table)
        dev_st, _ = decode_step(dev_gen.graphdef, dev_gen.state, dev_st, sampler=Sampler(), eos_ids=())
        st, _ = decode_step(gen.graphdef, gen.state, st, sampler=Sampler(), eos_ids=())
        c = st.cache
        np.testing.assert_array_equal(np.asarray(st.tokens), np.asarray(dev_st.tokens))
        table, ids, misses = np.asarray(c.table), np.asarray(c.prev_ids), np.asarray(c.misses)
        pool_k, pool_v = np.asarray(c.pool_k), np.asarray(c.pool_v)
        host = np.asarray(c.host_kv)
        host_k, host_v = host[:, :, :, :, 0], host[:, :, :, :, 1]  # [L, B, Hk, NB, bs, D]
        length = np.asarray(c.length)
        dev_k, dev_v = np.asarray(dev_st.cache.k), np.asarray(dev_st.cache.v)
        for l in range(L):
            for b in range(B):
                # host store == on-device cache for every token written so far, to float32 noise
                # (the two decode programs are compiled separately; same bound as the logits test)
                n = length[b]
                for got, ref in ((host_k, dev_k), (host_v, dev_v)):
                    hx = got[l, b].reshape(Hk, -1, cfg.head_dim)[:, :n]
                    rx = np.moveaxis(ref[l, b, :n], 1, 0)
                    np.testing.assert_allclose(hx, rx, atol=1e-5 * np.abs(rx).max(), rtol=0)
                for h in range(Hk):
                    sel = {int(x) for x in ids[l, b, h] if x >= 0}
                    res = [int(x) for x in table[l, b, h] if x >= 0]
                    assert len(res) == len(set(res)) <= S
                    assert sel <= set(res)
                    assert (n - 1) // bs in sel  # the token's own block is always resident
                    was = {int(x) for x in before[l, b, h] if x >= 0}
                    assert misses[l, b, h] == len(sel - was)
                    for s, blk in enumerate(table[l, b, h]):
                        if blk < 0:
                            continue
                        valid = min(bs, n - blk * bs)  # rows past the sequence's end are never read
                        np.testing.assert_array_equal(pool_k[l, b, s * bs:s * bs + valid, h],
                                                      host_k[l, b, h, blk, :valid])
                        np.testing.assert_array_equal(pool_v[l, b, s * bs:s * bs + valid, h],
                                                      host_v[l, b, h, blk, :valid])
        if slots_factor == 1 and step > 0:
            # an exact-fit pool holds the selection only (plus what an unfilled selection left)
            assert all(len({int(x) for x in table[l, b, h] if x >= 0}) <= K
                       for l in range(L) for b in range(B) for h in range(Hk))


def _offloaded_decode(model, prompts, n_new: int, steps: int, **start_kw):
    """Start offloaded, run one decode loop call of `steps` steps; check that every sequence grew by
    `steps` and that the call's closing flush covered it. Returns (state, the start's logits)."""
    gen = Generator(model, eos_ids=(), offload=OffloadSettings())
    st, logits, _ = gen.start(prompts, max_new_tokens=n_new, **start_kw)
    st, _ = decode_loop(gen.graphdef, gen.state, st, logits, sampler=Sampler(), eos_ids=(), n_steps=steps)
    length = np.asarray(st.cache.length)
    assert list(length) == [len(p) + steps for p in prompts]
    assert list(np.asarray(st.cache.flushed)) == list(length)
    return st, logits


@pytest.mark.parametrize("aligned", [True, False])
def test_decode_loop_flush_writes_every_token_to_the_host_store(aligned):
    """After a decode loop call (its flush at the end covers 70 steps: two blocks and a part), the
    host store holds every token of every sequence as the on-device cache does. Prompts of one
    length give every sequence's flush window the same first block (one host write for the batch);
    ragged prompts do not (one write per sequence)."""
    cfg = small_config()
    model = random_model(cfg, "nosa", seed=9)
    rng = np.random.default_rng(3)
    lengths = (45, 45, 45) if aligned else (45, 9, 30)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in lengths]
    n_new, steps = 80, 70
    dev_gen, dev_st = _step_device(model, prompts, n_new)
    st, logits = _offloaded_decode(model, prompts, n_new, steps)
    dev_st, _ = decode_loop(dev_gen.graphdef, dev_gen.state, dev_st, logits, sampler=Sampler(), eos_ids=(),
                            n_steps=steps)
    np.testing.assert_array_equal(np.asarray(st.tokens), np.asarray(dev_st.tokens))
    host = np.asarray(st.cache.host_kv)  # [L, B, Hk, NB + F, 2, bs, D]
    length = np.asarray(st.cache.length)
    Hk, D = cfg.num_key_value_heads, cfg.head_dim
    for i, ref in enumerate((np.asarray(dev_st.cache.k), np.asarray(dev_st.cache.v))):
        for b, n in enumerate(length):
            got = host[:, b, :, :, i].reshape(cfg.num_hidden_layers, Hk, -1, D)[:, :, :n]
            want = np.moveaxis(ref[:, b, :n], 2, 1)  # [L, Hk, n, D]
            np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=0)


def test_selection_matches_on_device():
    """The offloaded cache selects exactly the blocks the on-device cache selects, step by step."""
    cfg = small_config()
    model = random_model(cfg, "nosa", seed=6)
    gd, state = nnx.split(model)

    @jax.jit
    def dev_step(state, tok, cache):
        m = nnx.merge(gd, state)
        out = m.extend(tok, cache.length, jnp.ones(tok.shape[0], jnp.int32), cache)
        return out.block_ids[:, :, :, 0], out.cache

    n_new = 120
    dev_gen, dev_st = _step_device(model, PROMPTS, n_new)
    gen = Generator(model, eos_ids=(), offload=OffloadSettings())
    st, _, _ = gen.start(PROMPTS, max_new_tokens=n_new)
    cache = dev_st.cache
    for _ in range(n_new - 1):
        tok = st.last
        blk, cache = dev_step(dev_gen.state, jnp.maximum(tok, 0)[:, None], cache)
        st, _ = decode_step(gen.graphdef, gen.state, st, sampler=Sampler(), eos_ids=())
        got = np.sort(np.asarray(st.cache.prev_ids), -1)
        np.testing.assert_array_equal(got, np.sort(np.asarray(blk), -1))


def test_assign_slots_lru():
    """Hits keep their slots; misses fill empty slots first, then evict the least recently
    selected slot that holds no selected block."""
    table = jnp.asarray([[[5, 7, -1, 2]]], jnp.int32)
    stamp = jnp.asarray([[[10, 3, 0, 8]]], jnp.int32)
    ids = jnp.asarray([[[2, 9, 11, -1]]], jnp.int32)
    slots, loads, t2, s2 = assign_slots(table, stamp, ids, jnp.asarray([20], jnp.int32))
    np.testing.assert_array_equal(slots[0, 0], [3, 2, 1, -1])  # 2 hit; 9 -> empty slot 2; 11 evicts 7 (oldest)
    np.testing.assert_array_equal(loads[0, 0], [-1, 9, 11, -1])
    np.testing.assert_array_equal(t2[0, 0], [5, 11, 9, 2])
    np.testing.assert_array_equal(s2[0, 0], [10, 20, 20, 20])


def test_decode_loop_does_not_copy_the_store_or_pool():
    """The compiled decode loop updates the donated host store and device pools in place."""
    cfg = small_config()
    model = random_model(cfg, "nosa", seed=7)
    gen = Generator(model, eos_ids=(), offload=OffloadSettings())
    st, logits, _ = gen.start(PROMPTS, max_new_tokens=16)
    hlo = decode_loop.lower(gen.graphdef, gen.state, st, logits, sampler=Sampler(), eos_ids=(),
                            n_steps=8).compile().as_text()
    for name in ("host_kv", "pool_k"):
        copies = copies_of(hlo, [hlo_shape(getattr(st.cache, name))])
        assert not copies, (name, copies[:3])


def test_decode_step_takes_constant_layer_indices():
    """The offloaded step is a straight-line program over the layers; each layer's index reaches its
    kernels as a constant. An iota of the layer count would be sliced per layer, and XLA keeps such a
    slice as a kernel per layer (no constant folding of iotas)."""
    L = 5  # a length no other iota of this small model has
    cfg = small_config(num_hidden_layers=L)
    gen = Generator(random_model(cfg, "nosa", seed=7), eos_ids=(), offload=OffloadSettings())
    st, logits, _ = gen.start(PROMPTS, max_new_tokens=4)
    hlo = decode_loop.lower(gen.graphdef, gen.state, st, logits, sampler=Sampler(), eos_ids=(),
                            n_steps=2).compile().as_text()
    iotas = [ln for ln in hlo.splitlines() if f"s32[{L}]" in ln and "iota(" in ln]
    assert not iotas, iotas[:3]


def _scan_unrolls(fn, *args) -> list[int]:
    """The `unroll` of every scan in fn's jaxpr (sub-jaxprs included), outer scans first."""
    found = []

    def walk(jaxpr):
        for e in jaxpr.eqns:
            if e.primitive.name == "scan":
                found.append(e.params["unroll"])
            for p in e.params.values():
                for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        walk(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def test_layer_unroll_auto_unrolls_the_decode_that_updates_in_place(monkeypatch):
    """layer_unroll "auto" (the default): a decode step against the offloaded cache runs the layers
    as a straight-line program (faster on the GPU, bench/NOTES.md session 18), and so does the
    on-device cache's decode with the Pallas kernels and their in-place cache write (session 19);
    with XLA's scatters (the reference path, or WRITE_IMPL "xla") the on-device decode keeps the
    scan (unrolled, each layer copied the whole on-device cache), and prefill always does; an
    explicit setting applies everywhere; a bad one is refused."""
    from nosa_jax.model import from_params
    from pallas_kernels import cache_write as cw

    cfg = small_config()
    model = random_model(cfg, "nosa", seed=7)
    L = cfg.num_hidden_layers
    assert L > 1
    st, _, _ = Generator(model, eos_ids=(), offload=OffloadSettings()).start(PROMPTS, max_new_tokens=16)
    B = len(PROMPTS)
    one = jnp.ones((B,), jnp.int32)

    def unrolls(m, cache, n_tokens):
        gd, state = nnx.split(m)
        ids = jnp.zeros((B, n_tokens), jnp.int32)
        return _scan_unrolls(lambda s, c: nnx.merge(gd, s).extend(ids, c.length, one * n_tokens, c).h, state, cache)

    dev = model.init_cache(B, 128)
    assert unrolls(model, st.cache, 1) == [L]
    assert unrolls(model, dev, 1) == [1]
    assert unrolls(model, dev, 8)[0] == 1  # the layers' scan (the query chunks' scan is inside it)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tcfg = triton_small_config()
    tparams = nnx.to_pure_dict(nnx.state(random_model(tcfg, "nosa", seed=7), nnx.Param))
    pallas = from_params(tcfg, tparams, mode="nosa", impl="pallas", interpret=True)
    tdev = pallas.init_cache(B, 128)
    for write, want in (("pallas", tcfg.num_hidden_layers), ("xla", 1)):
        monkeypatch.setattr(cw, "WRITE_IMPL", write)
        assert unrolls(pallas, tdev, 1)[0] == want, write  # the layers (scans inside them follow)
        assert unrolls(pallas, tdev, 8)[0] == 1, write
    for setting, want in ((1, 1), (True, L)):
        fixed = from_params(cfg, params, mode="nosa", layer_unroll=setting)
        assert unrolls(fixed, st.cache, 1) == [want] and unrolls(fixed, dev, 1) == [want]
    for bad in ("full", 0, False, 1.5):
        with pytest.raises(ValueError, match="layer_unroll"):
            from_params(cfg, params, mode="nosa", layer_unroll=bad)


def test_host_store_is_filled_by_host_compute():
    """The pinned store is created by host compute, not built on the device and moved there: the
    compiled program computes the fill in host memory and moves nothing between the two (a device
    copy of the store would need as much free device memory as the store)."""
    from nosa_jax.offload import host_filled

    x = host_filled((3, 4, 5), jnp.bfloat16, -1)
    assert x.sharding.memory_kind == "pinned_host" and jax.typeof(x).memory_space == jax.memory.Space.Host
    np.testing.assert_array_equal(np.asarray(jax.device_put(x, jax.memory.Space.Device)), -np.ones((3, 4, 5)))
    hlo = jax.jit(lambda: host_filled((3, 4, 5), jnp.bfloat16, 0)).lower().as_text()
    fills = [ln for ln in hlo.splitlines() if "broadcast_in_dim" in ln]
    assert fills and all('_xla_compute_type = "host"' in ln for ln in fills), fills  # computed on the host
    old = jax.jit(lambda: jax.device_put(jnp.zeros((3, 4, 5), jnp.bfloat16), jax.memory.Space.Host)).lower().as_text()
    assert '_xla_compute_type = "host"' not in old  # what the check tells apart: a fill on the device

def test_offload_errors():
    cfg = small_config()
    with pytest.raises(GenerationError, match="full"):
        generate(random_model(cfg, "full"), PROMPTS, max_new_tokens=4, kv_offload=True)
    model = random_model(cfg, "nosa")
    with pytest.raises(GenerationError, match="pool_slots"):
        generate(model, PROMPTS, max_new_tokens=4, kv_offload=True, pool_slots=2)
    with pytest.raises(GenerationError, match="host memory"):
        generate(model, PROMPTS, max_new_tokens=4, kv_offload=OffloadSettings(host_memory_budget=1000))
    with pytest.raises(GenerationError, match="on the device"):
        generate(model, PROMPTS, max_new_tokens=4, kv_offload=True, memory_budget=1000)


def test_offload_refuses_a_store_larger_than_the_pinned_pool(monkeypatch):
    """On the GPU the pinned store comes from XLA's pinned host pool (64 GiB unless
    XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB is set): a larger store is refused up front, naming the
    variable, even when the host budget given is larger."""
    import nosa_jax.generate as gen

    monkeypatch.setattr(gen, "pinned_host_limit_bytes", lambda: 1000)
    assert gen.host_memory_bytes() <= 1000
    with pytest.raises(GenerationError, match="XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"):
        generate(random_model(small_config(), "nosa"), PROMPTS, max_new_tokens=4,
                 kv_offload=OffloadSettings(host_memory_budget=2**40))



MiB, GiB = 2**20, 2**30


def test_pinned_pool_reservation_follows_the_bfc_growth_rule():
    """XLA's growing pinned pool (a BFC allocator) adds regions of doubling size, capped by what is
    left of its limit; the numbers here are worked by hand from that rule, and the first one was
    measured on the H200 (bench/results/probe-host-peak-*: a 4.04 GiB store took 8.00 GiB)."""
    from nosa_jax.offload import pinned_pool_reservation as reserve

    store = [2168455168, 2168455168]  # 1B shape, 4 layers, batch 32, 32K tokens: K and V
    assert reserve(store, 112 * GiB, preallocated=False) == 8 * GiB  # a 4 GiB region each
    assert reserve(store, 7 * GiB, preallocated=False) == 7 * GiB  # the second region capped at 3 GiB
    assert reserve(store, 5 * GiB, preallocated=False) is None  # 1 GiB left after the first region
    assert reserve(store, 5 * GiB, preallocated=True) == 5 * GiB  # one region: the store fits
    assert reserve([50 * GiB] * 2, 112 * GiB, preallocated=False) is None  # 64 GiB region, 48 left
    assert reserve([50 * GiB] * 2, 112 * GiB, preallocated=True) == 112 * GiB
    assert reserve([3 * MiB, 3 * MiB, 1 * MiB], 64 * GiB, preallocated=False) == 8 * MiB  # 4 + 4, then a tail
    assert reserve([1 * MiB, 3 * MiB], 64 * GiB, preallocated=False) == 2 * MiB + 4 * MiB
    assert reserve([3 * MiB] * 3, 64 * GiB, preallocated=False) == 4 * MiB + 4 * MiB + 8 * MiB  # the size doubled
    assert reserve([6 * GiB], 5 * GiB, preallocated=True) is None
    from nosa_jax.offload import pinned_pool_limit_needed as need

    assert need(store) == 7  # 4 GiB + 2.02 GiB: 6.02, in whole GiB
    assert need([50 * GiB] * 2) == 64 + 50
    assert need([33 * GiB] * 2) == 64 + 33


def test_offload_checks_the_store_against_the_pinned_pool_and_its_region(monkeypatch):
    """The store is one array: the pool places it whenever it fits (a store just over the pool is
    refused up front, naming the limit to set), but a growing pool reserves a power-of-two region
    for it, and that region is what the host budget must hold."""
    import nosa_jax.generate as gen
    from nosa_jax.offload import offload_bytes, pool_size

    cfg = small_config(max_position_embeddings=65536)
    model = random_model(cfg, "nosa")
    capacity = 12288
    store = offload_bytes(cfg, len(PROMPTS), capacity, jnp.float32, "nosa", pool_size(cfg, capacity))[1]
    assert 8 * MiB < store <= 12 * MiB  # a 16 MiB region in a large growing pool
    monkeypatch.delenv(gen.PINNED_HOST_PREALLOCATE_ENV, raising=False)
    g = Generator(model, offload=OffloadSettings(host_memory_budget=2**40))
    monkeypatch.setattr(gen, "pinned_host_limit_bytes", lambda: store - 256)
    with pytest.raises(GenerationError, match="pinned pool is 0.0 GiB; start the process with "
                                              "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB=2 "):  # 1 GiB + 1 spare
        g.validate(PROMPTS, 4, capacity, None)
    monkeypatch.setattr(gen, "pinned_host_limit_bytes", lambda: store)  # a first region capped at the limit
    assert g.validate(PROMPTS, 4, capacity, None) >= 1

    monkeypatch.setattr(gen, "pinned_host_limit_bytes", lambda: 64 * GiB)
    g = Generator(model, offload=OffloadSettings(host_memory_budget=12 * MiB))  # holds the store, not its region
    with pytest.raises(GenerationError, match=r"needs 0\.02 GiB of host memory \(a 0\.01 GiB store in the power-of-two"):
        g.validate(PROMPTS, 4, capacity, None)
    g = Generator(model, offload=OffloadSettings(host_memory_budget=16 * MiB))
    assert g.validate(PROMPTS, 4, capacity, None) >= 1


def test_capacity_plan_places_the_offloaded_store_in_the_pinned_pool():
    """With a pinned pool the plan's offloaded batch is the largest whose store (one array of S
    bytes) the growing pool places within the host budget: S <= pool, and the region it takes -
    the next power of two from 2 MiB, or the whole pool if that is smaller - within the budget."""
    from nosa_jax.offload import capacity_plan

    cfg = small_config(max_position_embeddings=65536)
    kw = dict(context=8192, gpu_budget=2**40, pool_slots=12)
    free = capacity_plan(cfg, jnp.float32, host_budget=2**40, **kw)["offloaded"]
    S1 = free["host_bytes_per_seq"]

    def fits(b, pool, budget):
        S, region = b * S1, 2 * MiB
        while region < S:
            region *= 2
        return S <= pool and min(region, pool) <= budget

    for pool, budget in ((37 * MiB, 2**40), (100 * MiB, 70 * MiB), (100 * MiB, 64 * MiB), (64 * MiB, 40 * MiB)):
        want = max(b for b in range(0, 2 * pool // S1) if fits(b, pool, budget))
        got = capacity_plan(cfg, jnp.float32, host_budget=budget, pinned_pool=pool, **kw)["offloaded"]["max_batch"]
        assert got == want, (pool, budget, got, want)
    # the region, not the store's bytes, meets the budget: 70 MiB of budget hold 64 MiB regions only
    assert capacity_plan(cfg, jnp.float32, host_budget=70 * MiB, pinned_pool=100 * MiB, **kw)["offloaded"][
        "max_batch"] == 64 * MiB // S1 < 70 * MiB // S1


@pytest.mark.gpu
def test_offloaded_equals_on_device_gpu_1b():
    """1B shape, bf16, ~16K-token ragged prompts, Pallas kernels: the offloaded cache (zero-copy
    loader) generates the same greedy tokens as the on-device cache, logits within bf16 noise."""
    from nosa_jax.config import SHAPES, ModelConfig
    from nosa_jax.model import NosaForCausalLM

    print(f"\n*** offload loader on this machine: {loader_path('auto')} ***")
    cfg = ModelConfig(**SHAPES["1b"])
    model = NosaForCausalLM(cfg, mode="nosa", dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (16000, 15003)]
    ref = generate(model, prompts, max_new_tokens=48, eos_ids=[], save_logits=True, prefill_chunk=4096)
    off = generate(model, prompts, max_new_tokens=48, eos_ids=[], save_logits=True, prefill_chunk=4096,
                   kv_offload=True)
    assert off.tokens == ref.tokens
    rel = np.linalg.norm(off.logits - ref.logits) / np.linalg.norm(ref.logits)
    assert rel < 1e-2, rel
    print(f"offloaded == on-device over 48 steps; logits relative difference {rel:.2e}; "
          f"gamma {off.offload_stats['gamma_mean']:.3f}, misses/(layer,head,seq,step) "
          f"{off.offload_stats['misses_per_layer_head_seq']:.2f}")


@pytest.mark.gpu
@pytest.mark.parametrize("append", ["xla", "pallas"])
def test_decode_loop_does_not_copy_the_cache_gpu(append, monkeypatch):
    """1B shape, Pallas kernels, on the GPU: the compiled decode loop updates every array of the
    offloaded cache in place - the host store, the pools, the ring, the cis history and the
    compressed keys and scores - with either append (session 21 saw XLA copy the whole cis history
    each layer when a reader of its old buffer came after the update)."""
    from nosa_jax.config import SHAPES, ModelConfig
    from nosa_jax.model import NosaForCausalLM
    from pallas_kernels import cache_write

    monkeypatch.setattr(cache_write, "APPEND_IMPL", append)
    jax.clear_caches()

    cfg = ModelConfig(**SHAPES["1b"])
    model = NosaForCausalLM(cfg, mode="nosa", dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(2)
    gen = Generator(model, eos_ids=(), offload=OffloadSettings())
    st, logits, _ = gen.start([rng.integers(0, cfg.vocab_size, n).tolist() for n in (3000, 2100)], max_new_tokens=64)
    hlo = decode_loop.lower(gen.graphdef, gen.state, st, logits, sampler=Sampler(), eos_ids=(),
                            n_steps=8).compile().as_text()
    for name in ("host_kv", "pool_k", "pool_v", "ring_k", "cis", "ktilde", "cisw"):
        copies = copies_of(hlo, [hlo_shape(getattr(st.cache, name))])
        assert not copies, (name, copies[:3])


@pytest.mark.gpu
@pytest.mark.parametrize("model_name,context", [("1b", 16384), ("8b", 131072)])
def test_prefill_activation_estimate_covers_xla_temporaries_gpu(model_name, context):
    """The prefill group size counts `cache.prefill_activation_bytes` per sequence for a call's own
    temporaries (before, nothing: a nine-sequence group at 8B / 128K would have met its activations
    only on the device). XLA's memory analysis of the compiled prefill call (the last 4096-token
    chunk of the prompt; shapes only, nothing allocated) must stay within the estimate times the
    group, for groups of 1, 2 and 4, and the estimate must not exceed it more than twice (an estimate
    that large would shrink the fit pool for nothing)."""
    from bench.probe_prefill_memory import prefill_temporaries
    from nosa_jax.cache import prefill_activation_bytes
    from nosa_jax.config import SHAPES, ModelConfig
    from nosa_jax.model import NosaForCausalLM

    cfg = ModelConfig(**SHAPES[model_name])
    model = nnx.eval_shape(lambda: NosaForCausalLM(cfg, mode="nosa", dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    capacity, chunk = context + 256, 4096
    est = prefill_activation_bytes(cfg, capacity, jnp.bfloat16, "nosa", chunk)
    for g in (1, 2, 4):
        temp = prefill_temporaries(model, g, capacity, chunk)
        print(f"{model_name} {context} group {g}: XLA temporaries {temp / 2**30:.3f} GiB, estimate x group "
              f"{g * est / 2**30:.3f} GiB")
        assert temp <= g * est, (g, temp, est)
        assert g * est <= 2 * temp, (g, temp, est)


@pytest.mark.gpu
def test_store_prefill_stages_one_layer_at_a_time_gpu():
    """Moving a prefill group to the host store needs device memory for one layer's block-layout
    copy at a time, not the group's whole K/V: the copy of all layers at once took 36 GiB beside a
    9-sequence group at 8B / 128K and ran out of memory, and so did a loop over the layers in one
    program (bench/NOTES.md, session 11). Checked on XLA's memory analysis of the compiled per-layer
    write at the 8B shape (4 sequences of 8K tokens: 1 GiB of K/V), against `prefill_bytes`'
    staging allowance (two layers), which the generator's group size counts; and the store it
    writes equals the cache."""
    from nosa_jax.cache import cache_bytes, init_cache, prefill_activation_bytes
    from nosa_jax.config import SHAPES, ModelConfig
    from nosa_jax.offload import _store_layer, init_offloaded, prefill_bytes, store_prefill

    cfg = ModelConfig(**SHAPES["8b"])
    g, cap = 4, 8192
    off = init_offloaded(cfg, g, cap, jnp.bfloat16, "nosa", 128)
    dev = init_cache(cfg, g, cap, jnp.bfloat16, "nosa")
    dev = dataclasses.replace(dev, k=jax.random.normal(jax.random.key(0), dev.k.shape, dev.k.dtype),
                              v=jax.random.normal(jax.random.key(1), dev.v.shape, dev.v.dtype),
                              length=jnp.full((g,), cap - 100, jnp.int32))
    i = jnp.int32(0)
    temp = _store_layer.lower(off.host_kv, dev.k, dev.v, i, i).compile().memory_analysis().temp_size_in_bytes
    staging = g * (prefill_bytes(cfg, cap, jnp.bfloat16, "nosa") - cache_bytes(cfg, 1, cap, jnp.bfloat16, "nosa")
                   - prefill_activation_bytes(cfg, cap, jnp.bfloat16, "nosa"))  # what is left: the staging
    kv = dev.k.nbytes + dev.v.nbytes
    print(f"per-layer store temporaries {temp / 2**20:.1f} MiB; staging allowance {staging / 2**20:.1f} MiB; "
          f"group K/V {kv / 2**20:.1f} MiB")
    assert temp <= staging < kv / 8
    host = np.asarray(jax.device_put(store_prefill(off, dev, 0, n=cfg.nosa).host_kv, jax.memory.Space.Device))
    bs, T = cfg.nosa.block_size, dev.k.shape[2]
    for i, x in enumerate((dev.k, dev.v)):
        want = np.asarray(x[:, :, :, :, :8].astype(jnp.float32))  # [L, g, T, Hk, 8]: the first 8 dims
        got = host[:, :, :, : T // bs, i, :, :8].astype(np.float32)  # [L, g, Hk, nb, bs, 8]
        np.testing.assert_array_equal(got.transpose(0, 1, 3, 4, 2, 5).reshape(want.shape), want)


def test_prefill_bytes_is_the_cache_activations_and_two_layers_kv():
    """The device memory the generator counts per prefilled sequence: its cache (init_cache), the
    prefill calls' activations (estimated; the GPU test below holds the estimate against XLA) and
    two layers' K and V (the store's staging copies)."""
    from nosa_jax.cache import init_cache, prefill_activation_bytes
    from nosa_jax.offload import prefill_bytes

    cfg = small_config()
    for cap, chunk in ((100, 4096), (512, 4096), (512, 64)):
        shapes = jax.eval_shape(lambda: init_cache(cfg, 1, cap, jnp.float32, "nosa"))
        whole = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(shapes))
        layer_kv = 2 * int(np.prod(shapes.k.shape[1:])) * 4
        act = prefill_activation_bytes(cfg, cap, jnp.float32, "nosa", chunk)
        assert prefill_bytes(cfg, cap, jnp.float32, "nosa", chunk) == whole + act + 2 * layer_kv
        # the MLP's three [chunk, intermediate] float32 values at least (chunks past the cache clipped)
        assert act >= 3 * min(chunk, shapes.k.shape[2]) * cfg.intermediate_size * 4


@pytest.mark.gpu
@pytest.mark.parametrize("lengths", [(4000, 4000, 4000), (4000, 2500, 3100)])
def test_decode_loop_flush_gpu_1b(lengths):
    """1B shape, bf16, on the GPU: after a decode loop call of 70 steps, every block the decode
    wrote (two blocks and a part per sequence) is in the host store exactly as in its pool slot,
    with prompts of one length (their flush windows start at the same block) and ragged ones."""
    from nosa_jax.config import SHAPES, ModelConfig
    from nosa_jax.model import NosaForCausalLM

    cfg = ModelConfig(**SHAPES["1b"])
    model = NosaForCausalLM(cfg, mode="nosa", dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in lengths]
    c = _offloaded_decode(model, prompts, 80, 70, prefill_chunk=2048)[0].cache
    host = np.asarray(jax.device_put(c.host_kv, jax.memory.Space.Device))  # [L, B, Hk, NB + F, 2, bs, D]
    table, length = np.asarray(c.table), np.asarray(c.length)
    pools = np.asarray(c.pool_k), np.asarray(c.pool_v)  # [L, B, S * bs, Hk, D]
    bs = cfg.nosa.block_size
    for l in range(cfg.num_hidden_layers):
        for b, n0 in enumerate(lengths):
            n = length[b]
            for h in range(cfg.num_key_value_heads):
                for blk in range(n0 // bs, (n - 1) // bs + 1):
                    slot = list(table[l, b, h]).index(blk)  # decode blocks are local, hence resident
                    rows = slice(0, min(bs, n - blk * bs))
                    for i, pool in enumerate(pools):
                        np.testing.assert_array_equal(host[l, b, h, blk, i, rows],
                                                      pool[l, b, slot * bs:(slot + 1) * bs, h][rows])


@pytest.mark.parametrize("offload", [False, True])
def test_streaming_compiles_the_decode_loop_once(offload):
    """Streaming in chunks of steps reuses one compiled loop: every chunk's state has the same
    types, shardings and memory kinds as the first (a recompile per call would cost seconds)."""
    cfg = small_config()
    model = random_model(cfg, "nosa", seed=8)
    gen = Generator(model, eos_ids=(), offload=OffloadSettings() if offload else None)
    st, logits, _ = gen.start(PROMPTS, max_new_tokens=1 + 3 * 5)
    before = decode_loop._cache_size()
    chunks = list(gen.stream(st, logits, 5))
    assert len(chunks) == 3
    assert decode_loop._cache_size() == before + 1


def _check_append(mode, n, L, B, R, T, Hk, D, interpret, monkeypatch):
    """offload._append with the Pallas append against its XLA scatters on one random state (bf16
    ring and compressed keys, float32 history and scores): the same bits in every array."""
    import types

    from nosa_jax.offload import _append
    from pallas_kernels import cache_write

    monkeypatch.setattr(cache_write, "APPEND_IMPL", "pallas")  # the "reference" impl takes the scatters

    C = (T - n.kernel_size) // n.kernel_stride + 1  # windows of the history
    rng = np.random.default_rng(11)

    def arr(*shape, dtype=jnp.float32):
        return jnp.asarray(rng.standard_normal(shape), dtype)

    off = types.SimpleNamespace(ring_k=arr(L, B, R, Hk, D, dtype=jnp.bfloat16), cis=arr(L, B, T, Hk),
                                ktilde=arr(L, B, C, Hk, D, dtype=jnp.bfloat16),
                                cisw=arr(L, B, C if mode == "nosa" else 0, Hk))
    end = lambda c: c * n.kernel_stride + n.kernel_size - 1  # noqa: E731  the token completing window c
    # completing window 2, inside a window, past a ring wrap, completing the last window, the same
    # position not live, past the history (not live either: the model never writes there), then
    # random positions
    pos = np.concatenate([[end(2), 13, R + 3, end(C - 1), end(2), T + 2], rng.integers(0, T, B - 6)])
    live = jnp.asarray(np.arange(B) != 4) & (jnp.asarray(pos) < T)
    pos = jnp.asarray(pos, jnp.int32)
    k, cis = arr(B, Hk, D), arr(B, Hk)
    out = {}
    for impl in ("pallas", "reference"):
        settings = types.SimpleNamespace(impl=impl, interpret=interpret)
        f = jax.jit(lambda o, p, lv, k, c: _append(types.SimpleNamespace(**o), 1, p, lv, k, c, n, settings))
        out[impl] = [np.asarray(x.astype(jnp.float32)) for x in f(vars(off), pos, live, k, cis)]
    for name, a, b in zip(("ring_k", "cis", "ktilde", "cisw"), out["pallas"], out["reference"]):
        np.testing.assert_array_equal(a, b, err_msg=name)
    # the reference wrote what it should (the comparison is not between no-ops)
    ring, hist, kt = out["reference"][:3]
    assert not np.array_equal(ring[1, 2, 3], np.asarray(off.ring_k[1, 2, 3], np.float32))  # (R + 3) % R
    assert np.array_equal(ring[1, 4], np.asarray(off.ring_k[1, 4], np.float32))  # not live
    assert hist[1, 1, 13, 0] == float(cis[1, 0])
    assert not np.array_equal(kt[1, 0, 2], np.asarray(off.ktilde[1, 0, 2], np.float32))


@pytest.mark.parametrize("mode", ["nosa", "infllmv2"])
def test_append_kernel_stores_what_the_scatters_store(mode, monkeypatch):
    """offload._append with the Pallas append (cache_write.append_token, interpret mode: one
    kernel, the window means included) stores the same bits as with XLA's scatters: the token's key
    at its ring row, its score in the cis history, and the window it completes in ktilde / cisw;
    sequences that are not live and positions past the history write nothing. Every array starts
    random, so a missed or misplaced write shows."""
    _check_append(mode, triton_small_config().nosa, L=3, B=8, R=16, T=64, Hk=2, D=16, interpret=True,
                  monkeypatch=monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["nosa", "infllmv2"])
def test_append_kernel_stores_what_the_scatters_store_gpu(mode, monkeypatch):
    """The same at the 8B shape (4 of 32 layers, batch 16, 16K, ring of 64, upstream windows)."""
    from nosa_jax.config import NosaConfig

    _check_append(mode, NosaConfig(), L=4, B=16, R=64, T=16384, Hk=2, D=128, interpret=False,
                  monkeypatch=monkeypatch)
