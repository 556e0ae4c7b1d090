"""The offloaded step's slot assignment: `nosa_jax.offload.assign_slots` (XLA) and the one-kernel
path `pallas_kernels.slots.update_slots` (interpret mode on the CPU, cross-lowered for the H200)
against a plain-Python LRU policy on random pool states."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model_utils import verified_triton_modules
from nosa_jax.offload import assign_slots
from pallas_kernels.slots import update_slots


def _lru(table, stamp, ids, now, live):
    """Plain-Python policy, one (sequence, head) row at a time: a selected block already in the pool
    keeps its slot; each miss, in selection order, takes the next slot that holds no selected block,
    empty slots first (lowest slot first), then the least recently selected (lowest stamp, then
    lowest slot). Stopped sequences load nothing and keep their rows."""
    B, Hk, K = ids.shape
    slots, loads = np.full((B, Hk, K), -1, np.int32), np.full((B, Hk, K), -1, np.int32)
    table, stamp = table.copy(), stamp.copy()
    for b in range(B):
        for h in range(Hk):
            row, chosen = list(table[b, h]), [int(i) for i in ids[b, h] if i >= 0]
            free = sorted((s for s in range(len(row)) if row[s] not in chosen),
                          key=lambda s: (-1 if row[s] < 0 else stamp[b, h, s], s))
            for k, i in enumerate(ids[b, h]):
                if i < 0:
                    continue
                if i in row:
                    slots[b, h, k] = row.index(i)
                else:
                    slots[b, h, k] = free.pop(0)
                    loads[b, h, k] = i if live[b] else -1
            if live[b]:
                for k, i in enumerate(ids[b, h]):
                    if i >= 0:
                        table[b, h, slots[b, h, k]] = i
                        stamp[b, h, slots[b, h, k]] = now[b]
    return slots, loads, table, stamp


def _state(rng, L, B, Hk, S, K, n_blocks=300):
    """Pool tables holding distinct blocks (or -1), stamps, and selections of K distinct blocks
    (some of them in the pool, -1 padding at random places)."""
    table = np.full((L, B, Hk, S), -1, np.int32)
    ids = np.full((B, Hk, K), -1, np.int32)
    for idx in np.ndindex(L, B, Hk):
        n = rng.integers(0, S + 1)
        table[idx][rng.permutation(S)[:n]] = rng.choice(n_blocks, n, replace=False)
    for b, h in np.ndindex(B, Hk):
        n = rng.integers(0, K + 1)
        cur = table[1, b, h][table[1, b, h] >= 0]
        from_pool = rng.choice(cur, min(len(cur), rng.integers(0, n + 1)), replace=False)
        rest = rng.permutation(np.setdiff1d(np.arange(n_blocks), table[1, b, h]))[: n - len(from_pool)]
        chosen = rng.permutation(np.concatenate([from_pool, rest]).astype(np.int32))
        ids[b, h, np.sort(rng.permutation(K)[:n])] = chosen
    stamp = rng.integers(0, 6, (L, B, Hk, S)).astype(np.int32)  # few values: many stamp ties
    now = rng.integers(10, 20, B).astype(np.int32)
    live = rng.random(B) < 0.75
    return table, stamp, ids, now, live


def _stats_state(rng, ids, L):
    """Previous selections [L, B, Hk, K] sharing some blocks with `ids` (-1 padding at random
    places) and count arrays [L, B, Hk] of old values."""
    B, Hk, K = ids.shape
    prev = np.full((L, B, Hk, K), -1, np.int32)
    for l, b, h in np.ndindex(L, B, Hk):
        cur = ids[b, h][ids[b, h] >= 0]
        same = rng.choice(cur, rng.integers(0, len(cur) + 1), replace=False) if len(cur) else cur
        other = rng.integers(0, 10**6, rng.integers(0, K - len(same) + 1)) + 10**6  # never selected now
        row = rng.permutation(np.concatenate([same, other]).astype(np.int32))
        prev[l, b, h, np.sort(rng.permutation(K)[:len(row)])] = row
    counts = [rng.integers(0, 99, (L, B, Hk)).astype(np.int32) for _ in range(3)]
    return prev, counts


def _stats(ids, prev, loads, live):
    """Plain-Python statistics of one layer's step: (prev_ids, misses, reused, selected) after it."""
    B, Hk, K = ids.shape
    new_prev, misses, reused, selected = prev.copy(), np.zeros((B, Hk), np.int32), np.zeros((B, Hk), np.int32), \
        np.zeros((B, Hk), np.int32)
    for b, h in np.ndindex(B, Hk):
        chosen = [int(i) for i in ids[b, h] if i >= 0]
        misses[b, h] = sum(int(x) >= 0 for x in loads[b, h])  # loads of stopped sequences are -1 already
        if live[b]:
            reused[b, h] = sum(i in set(prev[b, h].tolist()) for i in chosen)
            selected[b, h] = len(chosen)
            new_prev[b, h] = ids[b, h]
    return new_prev, misses, reused, selected


@pytest.mark.parametrize("S,K", [(16, 16), (128, 64), (12, 5), (40, 33), (167, 64), (300, 64), (1024, 33)])
def test_update_slots_and_assign_slots_equal_the_lru_policy(S, K):
    """Rows of up to 128 slots take the all-at-once kernel, longer ones the tiled kernel; both also
    count the step's statistics in place."""
    rng = np.random.default_rng(S * 100 + K)
    for _ in range(4):
        table, stamp, ids, now, live = _state(rng, 3, 4, 2, S, K, n_blocks=max(300, 2 * S))
        prev, counts = _stats_state(rng, ids, 3)
        want = _lru(table[1], stamp[1], ids, now, live)
        want_stats = _stats(ids, prev[1], want[1], live)
        got = update_slots(*map(jnp.asarray, (table, stamp, prev, *counts)), 1, jnp.asarray(ids), jnp.asarray(now),
                           jnp.asarray(live), interpret=True)
        for g, w in zip(got[:2], want[:2]):
            np.testing.assert_array_equal(np.asarray(g), w)
        for g, w, before in zip(got[2:], want[2:] + want_stats, (table, stamp, prev, *counts)):
            g = np.asarray(g)
            np.testing.assert_array_equal(g[1], w)
            np.testing.assert_array_equal(np.delete(g, 1, axis=0), np.delete(before, 1, axis=0))  # other layers
        # the XLA version (the decode step's default), the live mask applied as decode_attend does
        s, ld, t, st = assign_slots(jnp.asarray(table[1]), jnp.asarray(stamp[1]), jnp.asarray(ids), jnp.asarray(now))
        keep = live[:, None, None]
        np.testing.assert_array_equal(np.asarray(s), want[0])
        np.testing.assert_array_equal(np.where(keep, np.asarray(ld), -1), want[1])
        np.testing.assert_array_equal(np.where(keep, np.asarray(t), table[1]), want[2])
        np.testing.assert_array_equal(np.where(keep, np.asarray(st), stamp[1]), want[3])


def _token_rows(slots, ids, start, live, bs):
    """Plain-Python pool row of each (sequence, head)'s new token at position start[b]: the slot of the
    entry selecting block start // bs, times bs, plus start % bs; -1 if not selected or not live."""
    B, Hk, _ = ids.shape
    rows = np.full((B, Hk), -1, np.int32)
    for b, h in np.ndindex(B, Hk):
        at = [k for k in range(ids.shape[-1]) if ids[b, h, k] == start[b] // bs]
        if live[b] and at:
            rows[b, h] = slots[b, h, at[0]] * bs + start[b] % bs
    return rows


@pytest.mark.parametrize("S,K,bs", [(16, 16, 4), (128, 64, 64), (300, 64, 16)])
def test_update_slots_finds_the_new_tokens_rows(S, K, bs):
    """With block_size and start, the kernel's ninth output is the new token's pool row (the slot of
    its block, if selected, for live sequences); the other outputs are unchanged by asking."""
    rng = np.random.default_rng(S + K + bs)
    for _ in range(2):
        table, stamp, ids, now, live = _state(rng, 3, 6, 2, S, K, n_blocks=max(300, 2 * S))
        start = rng.integers(0, 300 * bs, 6).astype(np.int32)
        for b in range(0, 6, 2):  # half the sequences: the token's block is selected by one head
            ids[b, 0, rng.integers(K)] = -1
            if start[b] // bs not in ids[b, 0]:
                ids[b, 0, np.flatnonzero(ids[b, 0] < 0)[0]] = start[b] // bs
        prev, counts = _stats_state(rng, ids, 3)
        args = (*map(jnp.asarray, (table, stamp, prev, *counts)), 1, jnp.asarray(ids), jnp.asarray(now),
                jnp.asarray(live))
        got = update_slots(*args, start=jnp.asarray(start), block_size=bs, interpret=True)
        plain = update_slots(*args, interpret=True)
        assert len(got) == 9 and len(plain) == 8
        for g, p in zip(got, plain):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(p))
        want = _token_rows(np.asarray(plain[0]), ids, start, live, bs)
        assert (want >= 0).any() and (want < 0).any()
        np.testing.assert_array_equal(np.asarray(got[8]), want)
    with pytest.raises(ValueError, match="together"):
        update_slots(*args, block_size=bs, interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("S", [128, 167, 1024, 4096])
def test_gpu_update_slots_compiled_equals_the_lru_policy(S):
    """On the GPU: the compiled kernels (all-at-once at 128 slots, tiled above) at the 8B
    decode's sizes (K = 64, batch 27) against the plain-Python policy, the new token's rows too."""
    rng = np.random.default_rng(S)
    table, stamp, ids, now, live = _state(rng, 3, 27, 2, S, 64, n_blocks=2 * S)
    start = (now - 1).astype(np.int32)
    for b in range(0, 27, 2):  # some tokens' blocks selected
        if start[b] // 64 not in ids[b, 1]:
            ids[b, 1, 0] = start[b] // 64
    prev, counts = _stats_state(rng, ids, 3)
    want = _lru(table[1], stamp[1], ids, now, live)
    want = want + _stats(ids, prev[1], want[1], live) + (_token_rows(want[0], ids, start, live, 64),)
    got = jax.jit(functools.partial(update_slots, block_size=64))(
        *map(jnp.asarray, (table, stamp, prev, *counts)), 1, jnp.asarray(ids), jnp.asarray(now), jnp.asarray(live),
        start=jnp.asarray(start))
    assert len(got) == len(want) == 9
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g)[1] if g.ndim > w.ndim else np.asarray(g), w)


def test_update_slots_refuses_rows_over_the_lane_limit():
    table = jnp.full((1, 1, 1, 8193), -1, jnp.int32)
    prev, count = jnp.full((1, 1, 1, 64), -1, jnp.int32), jnp.zeros((1, 1, 1), jnp.int32)
    with pytest.raises(ValueError, match="assign_slots"):
        update_slots(table, table, prev, count, count, count, 0, jnp.zeros((1, 1, 64), jnp.int32),
                     jnp.zeros(1, jnp.int32), jnp.ones(1, bool), interpret=True)


@pytest.mark.parametrize("S,rows", [(128, False), (128, True), (1024, True)])
def test_update_slots_lowers_to_one_in_place_triton_kernel(S, rows):
    """Cross-lowered for the H200 (no GPU needed): one Triton call, grid (B, Hk), the table, stamps
    and the four statistics arrays aliased to their outputs, and a Triton module the MLIR verifier
    accepts (both kernels, with and without the new token's rows)."""
    L, B, Hk, K = 32, 16, 2, 64
    table = jnp.zeros((L, B, Hk, S), jnp.int32)
    prev, count = jnp.zeros((L, B, Hk, K), jnp.int32), jnp.zeros((L, B, Hk), jnp.int32)
    extra = dict(start=jnp.zeros(B, jnp.int32), block_size=64) if rows else {}
    txt, modules = verified_triton_modules(
        lambda *a: update_slots(*a, **extra),
        table, table, prev, count, count, count, jnp.int32(3), jnp.zeros((B, Hk, K), jnp.int32),
        jnp.zeros(B, jnp.int32), jnp.ones(B, bool))
    calls = [ln for ln in txt.splitlines() if "xla.gpu.triton" in ln]
    assert len(calls) == 1 and len(modules) == 1
    assert "grid_x = 16 " in calls[0] and "grid_y = 2 " in calls[0]
    assert calls[0].count("#stablehlo.output_operand_alias<") == 6


def test_offloaded_generation_same_with_either_slot_path_and_loader(monkeypatch):
    """The offloaded decode with the Pallas model (interpret mode) gives the same tokens, logits and
    pool statistics with the slot kernel as with assign_slots, with the loader kernel (which also
    writes the new token) as with the XLA loads and scatters, and with the loads inside the
    attention kernel (offload.LOADS "fused") as with either, also after a sequence stops; and the
    tokens and logits of the reference model's offloaded decode (every Pallas run also has the
    append's one-kernel write and the top-k pooling its inputs)."""
    from flax import nnx

    from model_utils import random_model, triton_small_config
    from nosa_jax.generate import OffloadSettings, generate
    from nosa_jax import offload
    from nosa_jax.model import from_params
    from pallas_kernels import cache_write, selection, sparse_decode
    from pallas_kernels import slots as slots_kernel

    cfg = triton_small_config()
    ref = random_model(cfg, "nosa", seed=5)
    model = from_params(cfg, nnx.to_pure_dict(nnx.state(ref, nnx.Param)), mode="nosa", impl="pallas", interpret=True)
    prompts = [np.random.default_rng(5).integers(0, cfg.vocab_size, n).tolist() for n in (70, 30)]
    eos = generate(ref, prompts, max_new_tokens=20, eos_ids=[]).tokens[1][8]  # sequence 1 stops early
    monkeypatch.setattr(cache_write, "APPEND_IMPL", "pallas")
    monkeypatch.setattr(selection, "TOPK_POOL", "kernel")
    settings = dict(max_new_tokens=20, save_logits=True, kv_offload=OffloadSettings(pool_slots=6))
    want = generate(ref, prompts, eos_ids=[eos], **settings)
    runs = {}
    fetch_kernel = sparse_decode.sparse_decode_attention_fetch
    for impl, loader, loads in (("xla", "xla", "fused"), ("pallas", "xla", "fused"), ("pallas", "pallas", "separate"),
                                ("pallas", "pallas", "fused")):
        monkeypatch.setattr(slots_kernel, "SLOTS_IMPL", impl)
        monkeypatch.setattr(offload, "LOADS", loads)
        traced, fetched = [], []
        kernel = slots_kernel._slots_kernel
        monkeypatch.setattr(slots_kernel, "_slots_kernel",
                            lambda *a, k=kernel, t=traced, **kw: (t.append(1), k(*a, **kw))[1])
        monkeypatch.setattr(sparse_decode, "sparse_decode_attention_fetch",
                            lambda *a, t=fetched, **kw: (t.append(1), fetch_kernel(*a, **kw))[1])
        jax.clear_caches()  # the settings are read at trace time
        runs[impl, loader, loads] = generate(model, prompts, max_new_tokens=20, eos_ids=[eos], save_logits=True,
                                             kv_offload=OffloadSettings(pool_slots=6, loader=loader))
        assert bool(traced) == (impl == "pallas")
        assert bool(fetched) == (loader == "pallas" and loads == "fused")  # only on the zero-copy loader path
    a = runs["xla", "xla", "fused"]
    assert len(a.tokens[1]) < 20
    assert a.tokens == want.tokens
    np.testing.assert_allclose(a.logits, want.logits, atol=1e-4 * np.abs(want.logits).max())
    for b in (runs["pallas", "xla", "fused"], runs["pallas", "pallas", "separate"], runs["pallas", "pallas", "fused"]):
        assert a.tokens == b.tokens
        np.testing.assert_array_equal(b.logits, a.logits)
        for name in ("misses", "selected", "reused"):
            np.testing.assert_array_equal(b.offload_stats[name], a.offload_stats[name])
