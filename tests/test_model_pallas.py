"""The whole model with the Pallas kernels equals the jnp reference: on the CPU in interpret mode
at small shapes, and on the GPU at a 1B shape (marked `gpu`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model_utils import random_model, small_config
from nosa_jax.config import ModelConfig
from nosa_jax.generate import generate
from nosa_jax.model import NosaForCausalLM, from_params


def _with_impl(model, impl, interpret=False):
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return from_params(model.cfg, params, mode=model.mode, dtype=model.dtype, impl=impl, interpret=interpret)


def _sets(ids):
    if ids.shape[-1] == 0:  # full mode selects nothing
        return []
    return [frozenset(int(x) for x in r if x >= 0) for r in np.asarray(ids).reshape(-1, ids.shape[-1])]


@pytest.mark.parametrize("mode", ["nosa", "infllmv2", "full"])
def test_pallas_model_equals_reference_cpu_interpret(mode):
    """Small shapes that the Triton rules allow (head_dim 16, block 16, G = 2 padded in-kernel)."""
    from nosa_jax.config import NosaConfig

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


ONE_B = dict(vocab_size=73448, hidden_size=1536, intermediate_size=4096, num_hidden_layers=28,
             num_attention_heads=12, num_key_value_heads=2, head_dim=128, max_position_embeddings=131072)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["nosa", "infllmv2"])
def test_pallas_model_equals_reference_gpu_1b(mode):
    """1B shape, bf16, 8K tokens, teacher-forced so both paths see the same inputs: the prefill
    (prefill kernel) and 8 decode steps (selection + decode kernels) against the jnp reference:
    selections agree wherever the reference's top-k boundary is not a near tie; logits within bf16
    tolerance, measured against the same model in float32: the Pallas path may not be further from
    it than the bf16 reference path is (x1.25), so the kernels add no error beyond bf16's own.
    (The two bf16 paths differ by ~3e-2 relative Frobenius after 28 layers: first GPU run.)"""
    cfg = ModelConfig(**ONE_B)
    ref = NosaForCausalLM(cfg, mode=mode, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), impl="reference")
    st = nnx.state(ref, nnx.Param)
    pure = nnx.to_pure_dict(st)
    pure["layers"]["self_attn"]["A"] = jax.random.uniform(jax.random.key(1), pure["layers"]["self_attn"]["A"].shape,
                                                          minval=-2.0, maxval=0.5).astype(jnp.bfloat16)
    # With the init's std 0.02 projections the stage-1 logits over compressed keys have std ~0.1:
    # the pooled scores of a 256-block row are nearly all tied and bf16 noise decides the top-k
    # boundary (first GPU run: 56 % of rows agreed). Larger q/k projections give the separated
    # scores a trained model has, so the comparison tests the kernels rather than tie noise.
    for name in ("q_proj", "k_proj"):
        pure["layers"]["self_attn"][name]["kernel"] = pure["layers"]["self_attn"][name]["kernel"] * 4
    nnx.replace_by_pure_dict(st, pure)
    nnx.update(ref, st)
    pal = _with_impl(ref, "pallas")
    seq = np.random.default_rng(0).integers(0, cfg.vocab_size, 8192 + 8)
    prompt, fed = seq[:8192], seq[8192:]

    def run(model):
        gd, state = nnx.split(model)

        @jax.jit
        def prefill(state, ids):
            m = nnx.merge(gd, state)
            out = m.extend(ids, jnp.zeros(1, jnp.int32), jnp.array([ids.shape[1]], jnp.int32),
                           m.init_cache(1, 8192 + 16), rows=jnp.arange(8192 - 64, 8192)[None])
            return m.logits(out.h), out.block_ids, out.cache

        @jax.jit
        def step(state, tok, cache):
            m = nnx.merge(gd, state)
            out = m.extend(tok, cache.length, jnp.ones(1, jnp.int32), cache)
            return m.logits(out.h[:, 0]), out.block_ids, out.cache

        lg, blk, cache = prefill(state, jnp.asarray(prompt[None]))
        logits, blocks = [np.asarray(lg[0])], [np.asarray(blk)]
        for t in fed:
            lg, blk, cache = step(state, jnp.asarray([[t]]), cache)
            logits.append(np.asarray(lg))
            blocks.append(np.asarray(blk))
        return np.concatenate(logits), blocks

    la, ba = run(ref)
    lb, bb = run(pal)
    lf, _ = run(from_params(cfg, nnx.to_pure_dict(nnx.state(ref, nnx.Param)), mode=mode, dtype=jnp.float32,
                            impl="reference"))
    err = lambda x: float(np.linalg.norm(x - lf) / np.linalg.norm(lf))
    print(f"\nrelative error vs float32: bf16 reference {err(la):.3e}, bf16 pallas {err(lb):.3e}; "
          f"pallas vs reference {np.linalg.norm(lb - la) / np.linalg.norm(la):.3e}")
    assert err(lb) <= 1.25 * err(la) + 1e-3, (err(lb), err(la))
    rows = same = 0
    for x, y in zip(ba, bb):
        for r1, r2 in zip(x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])):
            rows += 1
            same += set(r1[r1 >= 0]) == set(r2[r2 >= 0])
    # bf16 hidden states differ in the last bits between the paths, so a few near-tied boundary
    # picks in later layers may flip; the first layer sees identical inputs and must agree exactly
    assert same / rows >= 0.99, (same, rows)
    for x, y in zip(ba, bb):
        np.testing.assert_array_equal(np.sort(x[0], -1), np.sort(y[0], -1))
