"""Pallas GPU kernels for NOSA, one file per kernel family, each with a plain-jnp reference beside it.

All kernels read the model's stacked cache pools ([layers, batch, tokens, kv_heads, head_dim]) in
place with a traced layer index, so they can run inside the scan over layers without copying a
layer per step. They lower with the Pallas Triton backend on the GPU and run in interpret mode on
the CPU (`interpret=True`) for tests.

  sparse_decode   block-sparse decode attention with the eviction bias (split-K, slot table), and
                  its fetching variant that also loads the offloaded step's misses from the host
  sparse_prefill  block-sparse prefill attention with the bias (query tiles over the union of picks)
  selection       decode selection: stage-1 window scores, block pooling, two-stage top-k
  selection_prefill  prefill (chunk) selection: stage-1 window scores, then the same pooling and top-k
  topk            the fused two-stage top-k
  cache_write     the decode step's cache writes in one kernel (default on: WRITE_IMPL)
  slots           the offloaded step's slot assignment in one kernel (default on: SLOTS_IMPL)
  kv_loader       host-offloaded blocks -> the device slot pool
  lanes           the power-of-two padding every kernel file uses
"""

from .cache_write import decode_cache_write
from .selection import decode_block_scores, decode_select
from .selection_prefill import prefill_select
from .sparse_decode import sparse_decode_attention
from .sparse_prefill import sparse_prefill_attention

__all__ = ["decode_block_scores", "decode_cache_write", "decode_select", "prefill_select", "sparse_decode_attention",
           "sparse_prefill_attention"]
