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
    """1B shape, bf16, 8K tokens: prefill selections and the decode steps' selections agree, logits
    within bf16 tolerance."""
    cfg = ModelConfig(**ONE_B)
    ref = NosaForCausalLM(cfg, mode=mode, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), impl="reference")
    st = nnx.state(ref, nnx.Param)
    pure = nnx.to_pure_dict(st)
    pure["layers"]["self_attn"]["A"] = jax.random.uniform(jax.random.key(1), pure["layers"]["self_attn"]["A"].shape,
                                                          minval=-2.0, maxval=0.5).astype(jnp.bfloat16)
    nnx.replace_by_pure_dict(st, pure)
    nnx.update(ref, st)
    pal = _with_impl(ref, "pallas")
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, 8192).tolist()
    a = generate(ref, [prompt], max_new_tokens=16, save_logits=True, eos_ids=[], prefill_chunk=2048)
    b = generate(pal, [prompt], max_new_tokens=16, save_logits=True, eos_ids=[], prefill_chunk=2048)
    rel = np.linalg.norm(b.logits - a.logits) / np.linalg.norm(a.logits)
    assert rel < 2e-2, rel
    agree = np.mean(np.array(a.tokens[0]) == np.array(b.tokens[0]))
    assert agree >= 0.75, (a.tokens, b.tokens)
