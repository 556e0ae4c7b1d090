"""The decode benchmark's read-ceiling kernel reads exactly the selected blocks (interpret mode)."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.kernels_decode import read_blocks  # noqa: E402


@pytest.mark.parametrize("head_major,k_splits", [(False, 1), (False, 4), (True, 2)])
def test_read_blocks_sums_the_selected_blocks(head_major, k_splits):
    L, B, T, Hk, D, bs, K = 3, 2, 256, 2, 16, 16, 8
    rng = np.random.default_rng(7 + k_splits)
    k = rng.standard_normal((L, B, T, Hk, D)).astype(np.float32)
    v = rng.standard_normal((L, B, T, Hk, D)).astype(np.float32)
    ids = np.stack([np.stack([rng.permutation(T // bs)[:K] for _ in range(Hk)]) for _ in range(B)]).astype(np.int32)
    layer = 2
    kp, vp = (np.swapaxes(k, 2, 3), np.swapaxes(v, 2, 3)) if head_major else (k, v)
    out = read_blocks(jnp.asarray(kp, jnp.bfloat16), jnp.asarray(vp, jnp.bfloat16), jnp.asarray(ids), layer,
                      k_splits=k_splits, block_size=bs, head_major=head_major, interpret=True)
    kb = np.asarray(jnp.asarray(k, jnp.bfloat16), np.float64)  # the bf16 values the kernel reads
    vb = np.asarray(jnp.asarray(v, jnp.bfloat16), np.float64)
    E = K // k_splits
    want = np.zeros((B, Hk, k_splits, D))
    for b in range(B):
        for h in range(Hk):
            for e in range(K):
                rows = slice(ids[b, h, e] * bs, ids[b, h, e] * bs + bs)
                want[b, h, e // E] += (kb[layer, b, rows, h] + vb[layer, b, rows, h]).sum(axis=0)
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-4)


def test_read_blocks_refuses_uneven_splits():
    z = jnp.zeros((1, 1, 64, 1, 16), jnp.bfloat16)
    with pytest.raises(ValueError, match="multiple of k_splits"):
        read_blocks(z, z, jnp.zeros((1, 1, 3), jnp.int32), 0, k_splits=2, block_size=16, interpret=True)
