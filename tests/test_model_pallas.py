"""The whole model with the Pallas kernels equals the jnp reference: on the CPU in interpret mode
at small shapes, and on the GPU at a 1B shape (marked `gpu`)."""

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model_utils import random_model, small_config
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
    from nosa_jax.config import NosaConfig
    from pallas_kernels import cache_write as cw

    monkeypatch.setattr(cw, "WRITE_IMPL", cache_write)
    traced = []  # the kernel body is traced (so the Pallas write runs) exactly in the "pallas" case
    kernel = cw._write_kernel
    monkeypatch.setattr(cw, "_write_kernel", lambda *a, **kw: (traced.append(1), kernel(*a, **kw))[1])
    jax.clear_caches()  # the setting is not part of the jit cache key

    cfg = small_config(head_dim=16, nosa=NosaConfig(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1,
                                                    local_blocks=1, topk=4, qk_select=3))
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
@pytest.mark.parametrize("mode", ["nosa", "infllmv2"])
def test_pallas_model_selections_gpu_1b(mode):
    """Identical selections, layer by layer: the reference model's 28 layer inputs (8K prefill and
    8 decode steps) are fed to a one-layer model of that layer under each implementation, so both
    paths see the same inputs and only the kernels differ. q/k projections are scaled x4: with the
    std 0.02 init the stage-1 scores of a row are nearly all tied (first GPU run of the untied
    whole-model comparison: 56 % of rows agreed), and a tie broken by the last float32 bit tests
    nothing."""
    prompt, fed = _tokens()
    pure, ref = _gpu_model(mode, scale_qk=4.0)
    _, _, hidden = _gpu_run(ref, prompt, fed, all_rows=True)  # hidden[i]: [L, 1, T_i, H] layer inputs
    cfg1 = dataclasses.replace(ref.cfg, num_hidden_layers=1)
    rows, differ = 0, []
    for layer in range(ref.cfg.num_hidden_layers):
        one = {**pure, "layers": jax.tree.map(lambda a: a[layer:layer + 1], pure["layers"])}
        embeds = [h[layer] for h in hidden]
        _, ba, _ = _gpu_run(from_params(cfg1, one, mode=mode, impl="reference"), prompt, fed, embeds=embeds)
        _, bb, _ = _gpu_run(from_params(cfg1, one, mode=mode, impl="pallas"), prompt, fed, embeds=embeds)
        for call, (x, y) in enumerate(zip(ba, bb)):
            for r, (r1, r2) in enumerate(zip(x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]))):
                rows += 1
                a, b = set(r1[r1 >= 0].tolist()), set(r2[r2 >= 0].tolist())
                if a != b:  # where: the prefill (call 0) or decode step `call`, and which blocks
                    phase = "prefill" if call == 0 else f"decode {call}"
                    differ.append((layer, phase, r, sorted(a - b), sorted(b - a)))
    print(f"\nrows with identical selections: {rows - len(differ)} / {rows}")
    for d in differ[:20]:
        print("  layer {}, {}, row {}: reference only {}, pallas only {}".format(*d))
    assert not differ
