"""The whole model with the Pallas kernels equals the jnp reference: on the CPU in interpret mode
at small shapes, and on the GPU at a 1B shape (marked `gpu`)."""

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model_utils import random_model, triton_small_config
from nosa_jax.config import SHAPES, ModelConfig
from nosa_jax.generate import generate
from nosa_jax.model import NosaForCausalLM, from_params, qkv_widths


def _with_impl(model, impl, interpret=False):
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return from_params(model.cfg, params, mode=model.mode, dtype=model.dtype, impl=impl, interpret=interpret)


def _sets(ids):
    if ids.shape[-1] == 0:  # full mode selects nothing
        return []
    return [frozenset(int(x) for x in r if x >= 0) for r in np.asarray(ids).reshape(-1, ids.shape[-1])]


@pytest.mark.parametrize("mode,cache_write", [("nosa", "xla"), ("infllmv2", "xla"), ("full", "xla"),
                                               ("nosa", "pallas")])
def test_pallas_model_equals_reference_cpu_interpret(mode, cache_write, monkeypatch):
    """Small shapes that the Triton rules allow (head_dim 16, block 16, G = 2 padded in-kernel);
    cache_write: the decode cache write's implementation (pallas_kernels.cache_write.WRITE_IMPL)."""
    from pallas_kernels import cache_write as cw

    monkeypatch.setattr(cw, "WRITE_IMPL", cache_write)
    traced = []  # the kernel body is traced (so the Pallas write runs) exactly in the "pallas" case
    kernel = cw._write_kernel
    monkeypatch.setattr(cw, "_write_kernel", lambda *a, **kw: (traced.append(1), kernel(*a, **kw))[1])
    jax.clear_caches()  # the setting is not part of the jit cache key

    cfg = triton_small_config()
    ref = random_model(cfg, mode, seed=4)
    pal = _with_impl(ref, "pallas", interpret=True)
    prompt = np.random.default_rng(4).integers(0, cfg.vocab_size, 90).tolist()
    a = generate(ref, [prompt, prompt[:40]], max_new_tokens=24, save_logits=True, eos_ids=[])
    b = generate(pal, [prompt, prompt[:40]], max_new_tokens=24, save_logits=True, eos_ids=[])
    assert a.tokens == b.tokens
    np.testing.assert_allclose(b.logits, a.logits, atol=1e-4 * np.abs(a.logits).max())
    seq = jnp.asarray([prompt])
    ra, rb = ref(seq), pal(seq)
    np.testing.assert_allclose(np.asarray(rb.logits), np.asarray(ra.logits), atol=1e-4 * float(jnp.abs(ra.logits).max()))
    assert _sets(ra.block_ids) == _sets(rb.block_ids)
    assert bool(traced) == (cache_write == "pallas")


def test_pallas_prefill_chunking_changes_nothing_cpu_interpret():
    """The Pallas path's default prefill chunk (one call for this prompt) against calls of 16
    queries: the same logits and block ids (each query's selection and attention depend on the
    cache, not on which call it is in). Bad chunk sizes are refused."""
    cfg = triton_small_config()
    ref = random_model(cfg, "nosa", seed=5)
    params = nnx.to_pure_dict(nnx.state(ref, nnx.Param))
    seq = jnp.asarray([np.random.default_rng(5).integers(0, cfg.vocab_size, 90).tolist()])
    out = [from_params(cfg, params, mode="nosa", impl="pallas", interpret=True, q_chunk=c)(seq) for c in (None, 16)]
    np.testing.assert_array_equal(np.asarray(out[0].block_ids), np.asarray(out[1].block_ids))
    np.testing.assert_allclose(np.asarray(out[0].logits), np.asarray(out[1].logits), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="q_chunk"):
        from_params(cfg, params, mode="nosa", q_chunk=0)


CONTEXT, FED = 8192, 8


@partial(jax.jit, static_argnames=("gd", "all_rows"))
def _gpu_prefill(gd, state, ids, emb, all_rows):
    m = nnx.merge(gd, state)
    n = ids.shape[1] if emb is None else emb.shape[1]
    rows = jnp.arange(n)[None] if all_rows else jnp.arange(n - 64, n)[None]
    out = m.extend(ids, jnp.zeros(1, jnp.int32), jnp.array([n], jnp.int32), m.init_cache(1, n + 16),
                   rows=rows, embeds=emb)
    return m.logits(out.h[0, -64:]), out.block_ids, out.layer_inputs, out.cache


@partial(jax.jit, static_argnames=("gd",))
def _gpu_step(gd, state, tok, emb, cache):
    m = nnx.merge(gd, state)
    out = m.extend(tok, cache.length, jnp.ones(1, jnp.int32), cache, embeds=emb)
    return m.logits(out.h[:, 0]), out.block_ids, out.layer_inputs, out.cache


def _gpu_run(model, prompt, fed, all_rows=False, embeds=None):
    """Prefill `prompt` (or the first layer's inputs `embeds[0]`), then feed `fed` one token (or
    one embedding row) per step. Returns (logits [64 + len(fed), V] float32: the prompt's last 64
    positions and each step; block ids per call; each layer's inputs per call, at the prompt's
    last 64 positions or, with all_rows, at all of them). The jitted functions are keyed on the
    graph definition, so models of one structure (the one-layer models) compile once."""
    gd, state = nnx.split(model)
    emb = (lambda i: None) if embeds is None else (lambda i: embeds[i])
    lg, blk, hid, cache = _gpu_prefill(gd, state, jnp.asarray(prompt[None]), emb(0), all_rows)
    logits, blocks, hidden = [np.asarray(lg)], [np.asarray(blk)], [hid]
    for i, t in enumerate(fed):
        lg, blk, hid, cache = _gpu_step(gd, state, jnp.asarray([[t]]), emb(i + 1), cache)
        logits.append(np.asarray(lg))
        blocks.append(np.asarray(blk))
        hidden.append(hid)
    return np.concatenate(logits), blocks, hidden


def _gpu_model(mode, scale_qk=1.0):
    """The 1B-shaped random model (std 0.02 init, bf16, reference path) with a non-trivial eviction
    head and the q and k projections scaled by `scale_qk`. Returns (its parameters, the model)."""
    cfg = ModelConfig(**SHAPES["1b"])
    ref = NosaForCausalLM(cfg, mode=mode, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), impl="reference")
    pure = nnx.to_pure_dict(nnx.state(ref, nnx.Param))
    attn = pure["layers"]["self_attn"]
    attn["A"] = jax.random.uniform(jax.random.key(1), attn["A"].shape, minval=-2.0, maxval=0.5).astype(jnp.bfloat16)
    wq, wk, _ = qkv_widths(cfg)  # columns q | k | v
    attn["qkv_proj"]["kernel"] = attn["qkv_proj"]["kernel"].at[..., :wq + wk].multiply(scale_qk)
    return pure, from_params(cfg, pure, mode=mode, impl="reference")


def _tokens():
    seq = np.random.default_rng(0).integers(0, SHAPES["1b"]["vocab_size"], CONTEXT + FED)
    return seq[:CONTEXT], seq[CONTEXT:]


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["nosa", "infllmv2"])
def test_pallas_model_logits_gpu_1b(mode):
    """1B shape, bf16, 8K-token prefill (prefill kernel) and 8 decode steps (selection + decode
    kernels), the whole model: logits within bf16 tolerance, measured against the same model in
    float32: the Pallas path may not be further from it than the bf16 reference path is (x1.25),
    so the kernels add no error beyond bf16's own. (The selections of the two whole-model runs are
    not compared here: after a few layers the bf16 hidden states of the two paths differ in their
    last bits and near-tied top-k boundaries flip; `..._selections_gpu_1b` compares them with both
    paths fed the same layer inputs.)"""
    prompt, fed = _tokens()
    pure, ref = _gpu_model(mode)
    la, _, _ = _gpu_run(ref, prompt, fed)
    lb, _, _ = _gpu_run(from_params(ref.cfg, pure, mode=mode, impl="pallas"), prompt, fed)
    lf, _, _ = _gpu_run(from_params(ref.cfg, pure, mode=mode, dtype=jnp.float32, impl="reference"), prompt, fed)
    err = lambda x: float(np.linalg.norm(x - lf) / np.linalg.norm(lf))
    print(f"\nrelative error vs float32: bf16 reference {err(la):.3e}, bf16 pallas {err(lb):.3e}; "
          f"pallas vs reference {np.linalg.norm(lb - la) / np.linalg.norm(la):.3e}")
    # a sanity check of the test model, not of the kernels (measured on the H200: 0.089 nosa,
    # 0.107 infllmv2; a chaotic model - q/k x4 gave 1.3 - would make the comparison meaningless)
    assert err(la) < 0.25, "the bf16 reference itself is far from float32: the random model is ill-conditioned"
    assert err(lb) <= 1.25 * err(la) + 1e-3, (err(lb), err(la))


@pytest.mark.gpu
@pytest.mark.parametrize("mode,cache_write", [("nosa", "xla"), ("infllmv2", "xla"), ("nosa", "pallas"),
                                              ("infllmv2", "pallas")])
def test_pallas_model_selections_gpu_1b(mode, cache_write, monkeypatch):
    """Decode selections, layer by layer, against float64: the reference model's 28 layer inputs
    (8K prefill, 8 decode steps) are fed to a one-layer model of that layer under each
    implementation. Every decode call's selection inputs (q, the layer's compressed keys and cis
    window means, lengths) are captured inside both programs and must be bit-identical; the ids each
    program's selection returned (and passed on as the model's block ids) must equal the NumPy
    float64 selection of those inputs on every row without a near tie at a top-k boundary
    (np_reference.boundary_fragile, relative gap `rel`): float32 may order a near tie either way
    (spec invariant 14). Exact ties (two blocks pooling one shared window) are not excluded: they
    must break lowest-index-first. In session 18 the Pallas program's ids differed on 15 / 10 rows
    with no near tie, one block apart, while the reference program's agreed everywhere
    (bench/NOTES.md). Only decode is compared here; the Pallas prefill selection is compared
    against float64 at the kernel level (tests/test_kernel_selection_prefill.py, 32K context on the
    GPU). q/k projections are scaled x4: with the std
    0.02 init the stage-1 scores of a row are nearly all tied. cache_write: the Pallas program's
    decode cache write (pallas_kernels.cache_write.WRITE_IMPL); the compressed keys and window
    means it stores must be the reference program's bits."""
    import np_reference as npr
    import pallas_kernels
    from nosa_jax import nosa
    from pallas_kernels import cache_write as cw

    monkeypatch.setattr(cw, "WRITE_IMPL", cache_write)

    rel = 1e-5
    caps = {"reference": [], "pallas": []}
    record = {"on": None}

    def capture(q, kt, cw, kv_len, ids):  # one decode call: [B, Hq, D], [B, C, Hk, D], [B, C, Hk], [B], [B, Hk, K]
        if record["on"]:
            caps[record["on"]].append([np.asarray(x) for x in (q, kt, cw, kv_len, ids)])

    decode_select, select_blocks = pallas_kernels.decode_select, nosa.select_blocks

    def pallas_select(q, kt, cw, n_win, kv_len, layer, **kw):
        ids = decode_select(q, kt, cw, n_win, kv_len, layer, **kw)
        jax.debug.callback(capture, q, kt[layer], jnp.zeros(kt.shape[1:4]) if cw is None else cw[layer], kv_len, ids)
        return ids

    def reference_select(q, q_pos, kt, cw, kv_len, n_blocks, cfg, mode):
        ids = select_blocks(q, q_pos, kt, cw, kv_len, n_blocks, cfg, mode)
        if q.shape[1] == 1:
            jax.debug.callback(capture, q[:, 0], kt, jnp.zeros(kt.shape[:3]) if cw is None else cw, kv_len,
                               ids[:, :, 0])
        return ids

    monkeypatch.setattr(pallas_kernels, "decode_select", pallas_select)
    monkeypatch.setattr(nosa, "select_blocks", reference_select)
    jax.clear_caches()  # no trace from before the capture
    prompt, fed = _tokens()
    pure, ref = _gpu_model(mode, scale_qk=4.0)
    _, _, hidden = _gpu_run(ref, prompt, fed, all_rows=True)  # hidden[i]: [L, 1, T_i, H] layer inputs
    cfg1 = dataclasses.replace(ref.cfg, num_hidden_layers=1)
    n = ref.cfg.nosa
    k_stage1 = n.qk_select if mode == "nosa" else n.topk
    rows = fragile = 0
    differ, split = [], []
    for layer in range(ref.cfg.num_hidden_layers):
        one = {**pure, "layers": jax.tree.map(lambda a: a[layer:layer + 1], pure["layers"])}
        embeds = [h[layer] for h in hidden]
        blocks = {}
        for impl in ("reference", "pallas"):
            caps[impl].clear()
            record["on"] = impl
            _, blocks[impl], _ = _gpu_run(from_params(cfg1, one, mode=mode, impl=impl), prompt, fed, embeds=embeds)
            jax.effects_barrier()
            record["on"] = None
            assert len(caps[impl]) == len(fed), (impl, len(caps[impl]))
        for step, (a, b) in enumerate(zip(caps["reference"], caps["pallas"])):
            for name, x, y in zip(("q", "ktilde", "cisw", "kv_len"), a[:4], b[:4]):
                assert np.array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32)), (layer, step, name)
            q, kt, cw, kv_len = a[:4]
            pos = int(kv_len[0]) - 1
            c = int(nosa.num_windows(jnp.asarray(kv_len), n)[0])
            s1 = npr.stage1(q[0][None], [pos], kt[0, :c], n)  # [Hk, 1, C]
            nb = -(-int(kv_len[0]) // n.block_size)
            for h in range(kt.shape[2]):
                rows += 1
                want = npr.select_row(s1[h, 0], cw[0, :c, h], pos, nb, n, mode)["ids"]
                if npr.boundary_fragile(npr.pool_row(s1[h, 0], pos // n.block_size, nb, n), min(k_stage1, nb), rel):
                    fragile += 1
                    continue
                want = set(want[want >= 0].tolist())
                for impl, got, out in (("reference", a[4], blocks["reference"]), ("pallas", b[4], blocks["pallas"])):
                    ids = set(got[0, h][got[0, h] >= 0].tolist())
                    # the captured ids are the ones the model passed on as its block ids
                    assert np.array_equal(got[0, h], out[step + 1][0, 0, h, 0]), (impl, layer, step, h)
                    if ids != want:
                        differ.append((impl, layer, step, h, sorted(want - ids), sorted(ids - want)))
            if not np.array_equal(a[4], b[4]):
                split.append((layer, step))
    print(f"\ndecode rows {rows}, near-tie rows {fragile}; calls where the two programs' ids differ: {split}")
    for d in differ[:20]:
        print("  {}: layer {}, decode step {}, head {}: float64 only {}, {} only {}".format(*d[:5], d[0], d[5]))
    assert not differ
    assert fragile <= rows // 10, (fragile, rows)  # the comparison still covers most rows


@pytest.mark.gpu
@pytest.mark.parametrize("write,unroll,copied", [("pallas", "auto", False), ("xla", True, True)])
def test_device_decode_loop_cache_copies_gpu(write, unroll, copied, monkeypatch):
    """The compiled on-device decode loop (1B shape, 4 layers, 16K): with the defaults (Pallas
    kernels, the Pallas cache write, layers unrolled by layer_unroll "auto") it updates the
    donated stacked cache in place; XLA's scatters in an unrolled program copy it (the 89.9 ms 1B
    step of bench/NOTES.md session 18), which is why "auto" keeps the scan with them."""
    from model_utils import copies_of, hlo_shape
    from nosa_jax.generate import Generator, Sampler, decode_loop
    from pallas_kernels import cache_write as cw

    monkeypatch.setattr(cw, "WRITE_IMPL", write)
    jax.clear_caches()  # the write is read at trace time, not part of the jit cache key
    cfg = ModelConfig(**{**SHAPES["1b"], "num_hidden_layers": 4})
    model = NosaForCausalLM(cfg, mode="nosa", dtype=jnp.bfloat16, rngs=nnx.Rngs(0), impl="pallas",
                            layer_unroll=unroll)
    gen = Generator(model, eos_ids=())
    prompts = [list(np.random.default_rng(b).integers(0, cfg.vocab_size, 16384 - 64)) for b in range(2)]
    st, logits, _ = gen.start(prompts, max_new_tokens=32)
    hlo = decode_loop.lower(gen.graphdef, gen.state, st, logits, sampler=Sampler(), eos_ids=(),
                            n_steps=8).compile().as_text()
    copies = copies_of(hlo, [hlo_shape(st.cache.k), hlo_shape(st.cache.v)])
    assert bool(copies) == copied, copies[:3]
