"""Generation engine: decode with incremental caches equals recomputation, batching, chunked
prefill, samplers, stopping and input errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model_utils import random_model, small_config
from nosa_jax.generate import GenerationError, Generator, Sampler, generate

MODES = ["nosa", "infllmv2", "full"]


def _step_fns(model, capacity):
    gd, st = nnx.split(model)

    @jax.jit
    def prefill(st, ids):
        m = nnx.merge(gd, st)
        out = m.extend(ids, jnp.zeros(ids.shape[0], jnp.int32), jnp.full(ids.shape[0], ids.shape[1], jnp.int32),
                       m.init_cache(ids.shape[0], capacity))
        return m.logits(out.h), out.block_ids, out.cache

    @jax.jit
    def step(st, tok, cache):
        m = nnx.merge(gd, st)
        out = m.extend(tok, cache.length, jnp.ones(tok.shape[0], jnp.int32), cache)
        return m.logits(out.h[:, 0]), out.block_ids[:, :, :, 0], out.cache

    return st, prefill, step


def _valid_sets(ids):
    return [set(int(x) for x in row if x >= 0) for row in ids.reshape(-1, ids.shape[-1])]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("prompt_len", [5, 37])
def test_decode_equals_recompute(mode, prompt_len):
    """Prefill N, decode M = 300 steps (block 8: crosses ~38 blocks, the top-6 budget, every stride
    and window boundary) == one forward over N + M tokens: identical selections, logits to f32."""
    cfg = small_config()
    model = random_model(cfg, mode, seed=prompt_len)
    N, M = prompt_len, 300
    seq = np.random.default_rng(prompt_len).integers(0, cfg.vocab_size, N + M)
    st, prefill, step = _step_fns(model, N + M)
    _, _, cache = prefill(st, jnp.asarray(seq[None, :N]))
    logits, blocks = [], []
    for t in range(N, N + M):
        lg, blk, cache = step(st, jnp.asarray([[seq[t]]]), cache)
        logits.append(np.asarray(lg[0]))
        blocks.append(np.asarray(blk[:, 0]))  # [L, Hk, K]
    full_lg, full_blk, _ = prefill(st, jnp.asarray(seq[None]))
    full_lg, full_blk = np.asarray(full_lg[0]), np.asarray(full_blk[:, 0])  # [T, V], [L, Hk, T, K]
    scale = np.abs(full_lg).max()
    for i in range(M):
        np.testing.assert_allclose(logits[i], full_lg[N + i], atol=2e-5 * scale, rtol=0)
        if mode != "full":
            assert _valid_sets(blocks[i]) == _valid_sets(full_blk[:, :, N + i]), f"step {i}"
    if mode != "full":  # the budget is really exceeded: selections are sparse at the end
        assert all(len(s) == cfg.nosa.topk for s in _valid_sets(blocks[-1]))


@pytest.mark.parametrize("mode", MODES)
def test_jitted_loop_equals_teacher_forced(mode):
    """The while_loop generator's greedy tokens and per-step logits == a forward over the result."""
    cfg = small_config()
    model = random_model(cfg, mode, seed=3)
    prompt = np.random.default_rng(3).integers(0, cfg.vocab_size, 29).tolist()
    res = generate(model, [prompt], max_new_tokens=80, save_logits=True, eos_ids=[], chunk_steps=32)
    toks = res.tokens[0]
    assert len(toks) == 80
    seq = jnp.asarray([prompt + toks])
    full = np.asarray(model(seq).logits[0])
    lg = res.logits[0]
    np.testing.assert_allclose(lg, full[len(prompt) - 1: len(prompt) - 1 + 80], atol=2e-5 * np.abs(full).max())
    assert toks == np.argmax(lg, -1).tolist()


@pytest.mark.parametrize("mode", MODES)
def test_ragged_batch_equals_alone(mode):
    cfg = small_config()
    model = random_model(cfg, mode, seed=5)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (5, 41, 18)]
    batch = generate(model, prompts, max_new_tokens=48, save_logits=True, eos_ids=[])
    for i, p in enumerate(prompts):
        alone = generate(model, [p], max_new_tokens=48, save_logits=True, eos_ids=[])
        assert batch.tokens[i] == alone.tokens[0]
        np.testing.assert_allclose(batch.logits[i], alone.logits[0], atol=1e-4 * np.abs(alone.logits).max())


@pytest.mark.parametrize("mode", ["nosa", "full"])
def test_chunked_prefill_equals_one_shot(mode):
    cfg = small_config()
    model = random_model(cfg, mode, seed=7)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (70, 23)]
    one = Generator(model, eos_ids=[])
    st1, lg1, _ = one.start(prompts, max_new_tokens=10)
    for chunk in (8, 13):
        st2, lg2, _ = Generator(model, eos_ids=[]).start(prompts, max_new_tokens=10, prefill_chunk=chunk)
        np.testing.assert_allclose(np.asarray(lg2), np.asarray(lg1), atol=1e-4 * np.abs(np.asarray(lg1)).max())
        np.testing.assert_array_equal(np.asarray(st2.cache.length), [70, 23])
        for name in ("k", "v", "cis", "ktilde", "cisw"):
            a, b = np.asarray(getattr(st1.cache, name)), np.asarray(getattr(st2.cache, name))
            if a.size == 0:  # not kept in this mode
                continue
            for i, n in enumerate((70, 23)):
                lim = n if name in ("k", "v", "cis") else max(0, (n - cfg.nosa.kernel_size) // cfg.nosa.kernel_stride + 1)
                np.testing.assert_allclose(b[:, i, :lim], a[:, i, :lim], rtol=1e-5, atol=1e-5 * np.abs(a).max(), err_msg=name)
    a = generate(model, prompts, max_new_tokens=30, eos_ids=[])
    b = generate(model, prompts, max_new_tokens=30, eos_ids=[], prefill_chunk=16)
    assert a.tokens == b.tokens
    # the last chunk's padding runs far past the allocation (2 x 100 positions for a capacity of
    # 132): its writes must not disturb the real tokens or their windows
    long = rng.integers(0, cfg.vocab_size, 129).tolist()
    a = generate(model, [long], max_new_tokens=3, save_logits=True, eos_ids=[])
    b = generate(model, [long], max_new_tokens=3, save_logits=True, eos_ids=[], prefill_chunk=100)
    assert a.tokens == b.tokens
    np.testing.assert_allclose(b.logits, a.logits, atol=1e-4 * np.abs(a.logits).max())


def test_prefill_chunks_by_default(monkeypatch):
    # Without prefill_chunk the prompt goes in DEFAULT_PREFILL_CHUNK tokens per call (here 16: a
    # 70-token prompt takes 5 calls), with the logits of a one-shot prefill; a bad chunk is refused.
    import nosa_jax.generate as gen_mod

    cfg = small_config()
    model = random_model(cfg, "nosa", seed=3)
    prompts = [np.random.default_rng(3).integers(0, cfg.vocab_size, 70).tolist()]
    _, one, _ = Generator(model, eos_ids=[]).start(prompts, max_new_tokens=4, prefill_chunk=70)
    monkeypatch.setattr(gen_mod, "DEFAULT_PREFILL_CHUNK", 16)
    calls = []
    real = gen_mod._prefill_chunk
    monkeypatch.setattr(gen_mod, "_prefill_chunk", lambda *a: calls.append(a[2].shape) or real(*a))
    _, lg, _ = Generator(model, eos_ids=[]).start(prompts, max_new_tokens=4)
    assert calls == [(1, 16)] * 5
    np.testing.assert_allclose(np.asarray(lg), np.asarray(one), atol=1e-4 * np.abs(np.asarray(one)).max())
    with pytest.raises(GenerationError, match="prefill_chunk"):
        Generator(model, eos_ids=[]).start(prompts, max_new_tokens=4, prefill_chunk=0)


def test_eos_stops_each_sequence():
    cfg = small_config()
    model = random_model(cfg, "nosa", seed=11)
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9]]
    free = generate(model, prompts, max_new_tokens=20, eos_ids=[])
    eos = free.tokens[0][4]  # make sequence 0 stop at its 5th token
    res = generate(model, prompts, max_new_tokens=20, eos_ids=[eos])
    assert res.tokens[0] == free.tokens[0][:5]
    j = free.tokens[1].index(eos) + 1 if eos in free.tokens[1] else 20
    assert res.tokens[1] == free.tokens[1][:j]


def test_sampler_top_k_top_p_temperature():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((4, 50)) * 3, jnp.float32)
    keys = jax.random.split(jax.random.key(0), 400)
    # top-k: never outside the k best
    s = Sampler(temperature=1.0, top_k=5)
    draws = np.stack([np.asarray(s(logits, k)) for k in keys[:200]])
    best = np.argsort(-np.asarray(logits), axis=-1)[:, :5]
    for b in range(4):
        assert set(draws[:, b]) <= set(best[b])
    # top-p: only the smallest prefix reaching mass p (float64 reference), and it is sampled broadly
    p = 0.6
    s = Sampler(temperature=1.0, top_p=p)
    draws = np.stack([np.asarray(s(logits, k)) for k in keys])
    probs = np.exp(np.asarray(logits, np.float64))
    probs /= probs.sum(-1, keepdims=True)
    for b in range(4):
        order = np.argsort(-probs[b])
        before = np.cumsum(probs[b][order]) - probs[b][order]
        allowed = set(order[before < p])
        assert set(draws[:, b]) <= allowed
        assert len(set(draws[:, b])) == len(allowed) or len(allowed) > 8
    # temperature 0 == greedy; same key, same draw; frequencies follow softmax(logits / T)
    np.testing.assert_array_equal(np.asarray(Sampler()(logits, keys[0])), np.argmax(np.asarray(logits), -1))
    s = Sampler(temperature=0.7)
    np.testing.assert_array_equal(np.asarray(s(logits, keys[3])), np.asarray(s(logits, keys[3])))
    row = jnp.asarray([[0.0, 1.0, 2.0]], jnp.float32)
    draws = np.concatenate([np.asarray(jax.vmap(lambda k: s(row, k))(jax.random.split(jax.random.key(i), 1000)))[:, 0]
                            for i in range(4)])
    ref = np.exp(np.array([0.0, 1.0, 2.0]) / 0.7)
    ref /= ref.sum()
    freq = np.bincount(draws, minlength=3) / len(draws)
    np.testing.assert_allclose(freq, ref, atol=0.03)


def test_sampled_generation_is_seeded():
    cfg = small_config()
    model = random_model(cfg, "nosa", seed=2)
    s = Sampler(temperature=1.0, top_k=10, top_p=0.9)
    a = generate(model, [[1, 2, 3]], max_new_tokens=25, sampler=s, seed=4, eos_ids=[])
    b = generate(model, [[1, 2, 3]], max_new_tokens=25, sampler=s, seed=4, eos_ids=[])
    c = generate(model, [[1, 2, 3]], max_new_tokens=25, sampler=s, seed=5, eos_ids=[])
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens


def test_generation_input_errors():
    cfg = small_config()
    model = random_model(cfg, "nosa")
    with pytest.raises(GenerationError, match="empty"):
        generate(model, [[1, 2], []], max_new_tokens=4)
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        generate(model, [[1, 2, cfg.vocab_size]], max_new_tokens=4)
    with pytest.raises(GenerationError, match="exceeds the capacity"):
        generate(model, [[1] * 30], max_new_tokens=10, capacity=32)
    with pytest.raises(GenerationError, match="GiB"):
        generate(model, [[1] * 30], max_new_tokens=10, memory_budget=1000)
    with pytest.raises(GenerationError, match="no prompts"):
        generate(model, [], max_new_tokens=4)


@pytest.mark.parametrize("rope", [{"rope_type": "dynamic", "factor": 4.0},
                                  {"rope_type": "longrope", "factor": 4.0, "short_factor": [1.0, 1.5, 2.0, 3.0],
                                   "long_factor": [2.0, 3.0, 5.0, 8.0], "original_max_position_embeddings": 64}])
def test_length_dependent_rope_decode_equals_recompute(rope):
    """Length-dependent RoPE is evaluated at each sequence's final length (prompt + new tokens),
    so generation past the original context equals a forward over the final sequence."""
    extra = {"longrope_switch": True} if rope["rope_type"] == "longrope" else {}
    cfg = small_config(rope_scaling=rope, max_position_embeddings=64 if rope["rope_type"] == "dynamic" else 256,
                       **extra)
    model = random_model(cfg, "nosa", seed=9)
    prompt = np.random.default_rng(9).integers(0, cfg.vocab_size, 40).tolist()
    res = generate(model, [prompt], max_new_tokens=60, save_logits=True, eos_ids=[])
    full = np.asarray(model(jnp.asarray([prompt + res.tokens[0]])).logits[0])
    np.testing.assert_allclose(res.logits[0], full[39:99], atol=2e-5 * np.abs(full).max())


def test_unrolled_layers_equal_scanned_layers():
    """layer_unroll (a straight-line program over layers, for launch-bound small batches) computes
    exactly what the scan over layers computes."""
    from nosa_jax.model import from_params

    cfg = small_config(num_hidden_layers=3)
    scanned = random_model(cfg, "nosa", seed=13)
    params = nnx.to_pure_dict(nnx.state(scanned, nnx.Param))
    unrolled = from_params(cfg, params, mode="nosa", layer_unroll=True)
    prompt = np.random.default_rng(13).integers(0, cfg.vocab_size, 50).tolist()
    a = generate(scanned, [prompt], max_new_tokens=20, save_logits=True, eos_ids=[])
    b = generate(unrolled, [prompt], max_new_tokens=20, save_logits=True, eos_ids=[])
    assert a.tokens == b.tokens
    np.testing.assert_allclose(b.logits, a.logits, atol=1e-5 * np.abs(a.logits).max())


def _check_bf16_window_means(k, ktilde, n_tokens, cfg):
    """k [T, Hk, D] bfloat16 keys as stored; ktilde [C, Hk, D] bfloat16 as stored. Each valid window
    must be the float64 mean of its 32 (here K) stored keys rounded to the nearest bfloat16, computed
    here in NumPy (np_reference.round_to_bfloat16). The cache accumulates in float32, so where the
    exact mean lies within float32 rounding of a halfway point either neighbour is allowed (checked
    as: got lies between the roundings of mean -/+ that error bound); such cases must be rare.
    Returns the number of windows checked."""
    import np_reference as ref

    n = cfg.nosa
    C = ref.num_windows(n_tokens, n.kernel_size, n.kernel_stride)
    k64 = np.asarray(k, np.float64)
    mean = ref.window_means(k64[:n_tokens], n)  # [C, Hk, D] float64
    mag = np.stack([np.abs(k64[n.kernel_stride * c: n.kernel_stride * c + n.kernel_size]).mean(0) for c in range(C)])
    tol = mag * 2.0 ** -18  # >= (K - 1) float32 roundings of the running sum, divided by K
    got = np.asarray(ktilde[:C], np.float64)
    want = ref.round_to_bfloat16(mean)
    lo, hi = ref.round_to_bfloat16(mean - tol), ref.round_to_bfloat16(mean + tol)
    assert np.all((lo <= got) & (got <= hi)), np.argwhere(~((lo <= got) & (got <= hi)))[:5]
    assert np.mean(got != want) <= 1e-3, np.mean(got != want)
    assert not np.array_equal(want, mean), "keys too coarse: the means need no rounding"
    return C


@pytest.mark.parametrize("mode", ["nosa", "infllmv2"])
def test_bf16_cache_ktilde_is_rounded_window_mean(mode):
    """A bfloat16 model stores ktilde in bfloat16 (upstream: float32-accumulated mean, bf16 out),
    after a one-shot prefill, a chunked prefill and many decode steps (windows completed one token
    at a time), and the cache's size accounts 2 bytes per ktilde element."""
    from nosa_jax.cache import allocation, cache_bytes
    from nosa_jax.model import from_params

    cfg = small_config()
    params = nnx.to_pure_dict(nnx.state(random_model(cfg, mode, seed=21), nnx.Param))
    model = from_params(cfg, params, mode=mode, dtype=jnp.bfloat16)
    prompts = [np.random.default_rng(21).integers(0, cfg.vocab_size, n).tolist() for n in (45, 12)]
    new = 70
    for chunk in (None, 13):
        st, _, _ = Generator(model, eos_ids=[]).start(prompts, max_new_tokens=new, prefill_chunk=chunk)
        checked = 0
        for b, p in enumerate(prompts):
            for layer in range(cfg.num_hidden_layers):
                checked += _check_bf16_window_means(st.cache.k[layer, b], st.cache.ktilde[layer, b], len(p), cfg)
        assert st.cache.ktilde.dtype == jnp.bfloat16 and checked > 0
    gd, state = nnx.split(model)
    step = jax.jit(lambda state, tok, cache: nnx.merge(gd, state).extend(
        tok, cache.length, jnp.ones(tok.shape[0], jnp.int32), cache).cache)
    cache = st.cache
    toks = np.random.default_rng(22).integers(0, cfg.vocab_size, (new, len(prompts)))
    for t in range(new):
        cache = step(state, jnp.asarray(toks[t][:, None]), cache)
    for b, p in enumerate(prompts):
        for layer in range(cfg.num_hidden_layers):
            _check_bf16_window_means(cache.k[layer, b], cache.ktilde[layer, b], len(p) + new, cfg)
    # bytes: k, v and ktilde in bf16; cis (and cisw in nosa mode) float32; length, rope_len and the
    # decode kernel's split counter int32
    B, cap = 3, 200
    L, Hk, D = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    T, C = allocation(cfg, cap)
    want = 2 * L * B * T * Hk * D * 2 + L * B * T * Hk * 4 + L * B * C * Hk * D * 2 + 2 * B * 4 + B * Hk * 4
    want += L * B * C * Hk * 4 if mode == "nosa" else 0
    assert cache_bytes(cfg, B, cap, jnp.bfloat16, mode) == want
    assert cache_bytes(cfg, B, cap, jnp.float32, mode) == want + L * B * T * Hk * D * 4 + L * B * C * Hk * D * 2
