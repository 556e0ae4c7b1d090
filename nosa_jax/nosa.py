"""The NOSA attention math in plain `jnp`: the reference every faster path must reproduce.

Everything works on a LEFT-ALIGNED batch: token `t` of sequence `b` sits at index `t`, the
sequence has `kv_len[b]` valid tokens, and entries past that are padding whose values never reach
a valid output. Queries carry their own positions `q_pos [B, Tq]`, so one set of functions serves
prefill (q_pos = 0..T-1), chunked prefill and decode (q_pos = kv_len - 1).

Spec references are to `shared/spec/nosa-upstream.md` section 2:
  cis[t]      = A * softplus(delta(v_all[t]))                       (2.2 step 3)
  ktilde[c]   = mean(k[S c : S c + K])       for complete windows    (2.3)
  cisw[c]     = mean(cis[S c : S c + K])                              (2.6)
  S1[t, c]    = sum_g softmax_{c visible at t}(q[t,g] . ktilde[c] / sqrt(D))   (2.4)
  P(x)[t, j]  = +inf on forced blocks, else max over the windows of block j   (2.5)
  two-stage top-k (2.7), biased block-sparse attention (2.8).
All selection math runs in float32; ties in top-k break lowest-index-first (`lax.top_k`).
The compressed keys are stored in the model dtype (upstream: float32-accumulated mean, rounded to
bf16); the stage-1 dot multiplies q and ktilde in that dtype with float32 accumulation
(`stage1_dot_dtype`), so a 16-bit dot's products are exact and only the sum is rounded.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from .config import NosaConfig

NEG_INF = float("-inf")
POS_INF = float("inf")


def masked_softmax(logits: jax.Array, visible: jax.Array) -> jax.Array:
    """Softmax over the last axis restricted to `visible` entries; all-invisible rows give 0."""
    logits = jnp.where(visible, logits, NEG_INF)
    m = jnp.max(logits, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.where(visible, jnp.exp(logits - m), 0.0)
    z = jnp.sum(e, axis=-1, keepdims=True)
    return e / jnp.where(z > 0, z, 1.0)


def num_windows(kv_len: jax.Array, cfg: NosaConfig) -> jax.Array:
    """Complete compression windows per sequence: max(0, (N - K) // S + 1). [B] int32."""
    n = (kv_len - cfg.kernel_size) // cfg.kernel_stride + 1
    return jnp.maximum(n, 0).astype(jnp.int32)


def window_means(x: jax.Array, cfg: NosaConfig) -> jax.Array:
    """Mean of `x` over every window of `kernel_size` tokens at stride `kernel_stride`.

    x: [B, T, ...] -> [B, C, ...] float32 with C = max(0, (T - K) // S + 1) (accumulated in
    float32 whatever x's dtype; the cache rounds key means to the model dtype). Windows that run past
    a sequence's own length hold padding; `num_windows(kv_len)` says how many are valid.
    Computed as a sum of K/S consecutive stride chunks (exact in the order of summation used by
    a 32-element mean up to float32 rounding). Every sum is a fixed sequence of elementwise adds
    (no reduce, whose order is the compiler's choice), so any program that computes a window this
    way - an XLA fusion of any shape, or the decode cache write's Pallas path - gets the same bits.
    """
    S, K = cfg.kernel_stride, cfg.kernel_size
    B, T = x.shape[:2]
    C = max(0, (T - K) // S + 1)
    if C == 0:
        return jnp.zeros((B, 0) + x.shape[2:], jnp.float32)
    n_chunks = C - 1 + K // S
    rows = x[:, : n_chunks * S].astype(jnp.float32).reshape((B, n_chunks, S) + x.shape[2:])
    chunks = rows[:, :, 0]
    for i in range(1, S):
        chunks = chunks + rows[:, :, i]
    total = chunks[:, 0:C]
    for i in range(1, K // S):
        total = total + chunks[:, i : i + C]
    return total / K


def compute_cis(v: jax.Array, A: jax.Array, delta_kernel: jax.Array,
                delta_bias: jax.Array | None) -> jax.Array:
    """Eviction score cis = A * softplus(delta(concat_h v[h])).

    v: [B, T, Hk, D]; A: [Hk]; delta_kernel: [Hk*D, Hk]; delta_bias: [Hk] or None.
    Returns [B, T, Hk] float32. Each head's score reads all kv heads' values (spec 2.2).
    """
    B, T, Hk, D = v.shape
    # A product with Hk (2) outputs, written as multiply + sum (float32-exact products): XLA on the
    # GPU computes it in a fusion instead of a cuBLAS float32 GEMV launch (4 us per layer at 8B,
    # batch 16, in bench/results/profile-8b-b16-pallas-topk-*).
    x = v.reshape(B, T, Hk * D, 1).astype(jnp.float32)
    z = jnp.sum(x * delta_kernel.astype(jnp.float32), axis=2)
    if delta_bias is not None:
        z = z + delta_bias.astype(jnp.float32)
    return A.astype(jnp.float32) * jax.nn.softplus(z)


def stage1_dot_dtype(q_dtype, ktilde_dtype) -> jnp.dtype:
    """The dtype the stage-1 dot q . ktilde multiplies in (always accumulated in float32).

    q and ktilde of one 16-bit float dtype (a bf16 or fp16 model: ktilde stored in the model dtype)
    -> that dtype: each product of two 16-bit floats is exact in float32, so one tensor-core pass
    with float32 accumulation is as accurate as a float32 dot of the same values. Anything else
    (float32 models, mixed dtypes) -> float32 (operands upcast exactly, a float32-accurate dot).
    The jnp reference and the decode kernel (pallas_kernels/selection.py) both follow this rule.
    """
    q_dtype, ktilde_dtype = jnp.dtype(q_dtype), jnp.dtype(ktilde_dtype)
    if q_dtype == ktilde_dtype and q_dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return q_dtype
    return jnp.dtype(jnp.float32)


def stage1_scores(q: jax.Array, q_pos: jax.Array, ktilde: jax.Array, n_win: jax.Array,
                  cfg: NosaConfig) -> jax.Array:
    """Query-aware window scores, summed over the G query heads of each kv head.

    q: [B, Tq, Hq, D]; q_pos: [B, Tq]; ktilde: [B, C, Hk, D] (model dtype, as the cache stores
    it); n_win: [B]. The logits q . ktilde / sqrt(D) multiply in `stage1_dot_dtype` (bf16 x bf16
    for a bf16 model, float32 otherwise) and accumulate in float32.
    Window c is visible to a query at position p iff S c + K - 1 <= p and c < n_win[b].
    Each query head's softmax runs over its visible windows; rows with none are 0.
    Returns S1: [B, Hk, Tq, C] float32.
    """
    B, Tq, Hq, D = q.shape
    C, Hk = ktilde.shape[1], ktilde.shape[2]
    G = Hq // Hk
    dt = stage1_dot_dtype(q.dtype, ktilde.dtype)
    qg = q.astype(dt).reshape(B, Tq, Hk, G, D)
    precision = lax.Precision.HIGHEST if dt == jnp.float32 else lax.Precision.DEFAULT
    logits = jnp.einsum("bthgd,bchd->bhgtc", qg, ktilde.astype(dt), precision=precision,
                        preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(D))
    c = jnp.arange(C)
    visible = ((cfg.kernel_stride * c + cfg.kernel_size - 1)[None, None, :] <= q_pos[:, :, None]) & (
        c[None, None, :] < n_win[:, None, None])  # [B, Tq, C]
    return masked_softmax(logits, visible[:, None, None]).sum(axis=2)  # visible: [B, 1, 1, Tq, C]


def pool_blocks(x: jax.Array, q_pos: jax.Array, n_win: jax.Array, n_blocks: int,
                cfg: NosaConfig) -> jax.Array:
    """Block pooling with forced sink/local blocks (spec 2.5).

    x: [B, Hk, Tq or 1, C] window scores; q_pos: [B, Tq]; n_win: [B].
    Block j takes the max over windows P j - 1 .. P j + P - 1 (P = block/stride) clipped to
    [0, n_win); -inf when that range is empty. Blocks j < init_blocks and qb - local <= j <= qb
    (qb = q_pos // block) are +inf. Returns [B, Hk, Tq, n_blocks] float32.
    """
    P = cfg.pool_stride
    B, Tq = q_pos.shape
    C = x.shape[-1]
    j = jnp.arange(n_blocks)
    win = P * j[:, None] - 1 + jnp.arange(P + 1)[None, :]  # [nb, P+1]
    if C > 0:
        g = x.astype(jnp.float32)[..., jnp.clip(win, 0, C - 1)]  # [B, Hk, Tq|1, nb, P+1]
        ok = (win >= 0)[None] & (win[None] < n_win[:, None, None])  # [B, nb, P+1]
        g = jnp.where(ok[:, None, None], g, NEG_INF)
        pooled = jnp.max(g, axis=-1)
    else:
        pooled = jnp.full(x.shape[:3] + (n_blocks,), NEG_INF, jnp.float32)
    pooled = jnp.broadcast_to(pooled, (B, x.shape[1], Tq, n_blocks))
    qb = (q_pos // cfg.block_size)[:, None, :, None]  # [B, 1, Tq, 1]
    return jnp.where(forced(j, qb, cfg), POS_INF, pooled)


def forced(j, qb, cfg: NosaConfig):
    """Whether block j is always selected for a query in block qb (broadcast together): the sink
    blocks j < init_blocks and the local blocks qb - local_blocks <= j <= qb."""
    return (j < cfg.init_blocks) | ((j <= qb) & (qb <= j + cfg.local_blocks))


def top_k_mask(x: jax.Array, k: int) -> jax.Array:
    """[..., n] -> bool mask of the k largest entries, ties broken lowest-index-first.

    Only the VALUES of `lax.top_k` are used (they do not depend on the tie order); the set is built
    explicitly because XLA's GPU top-k does not always return tied entries lowest-index-first (seen
    on an H200 for rows of ~100), and upstream's selections depend on that rule (spec section 8).
    """
    kth = lax.top_k(x, k)[0][..., k - 1:k]
    above = x > kth
    tied = x == kth
    room = k - jnp.sum(above, axis=-1, keepdims=True, dtype=jnp.int32)
    return above | (tied & (jnp.cumsum(tied.astype(jnp.int32), axis=-1) <= room))


def mask_to_ids(mask: jax.Array, k: int, qb: jax.Array) -> jax.Array:
    """[..., n] mask with k True per row -> [..., k] their indices ascending, with blocks after the
    query's own block (`qb`, broadcastable to [..., 1]) turned into -1 (they sort last, as upstream)."""
    n = mask.shape[-1]
    idx = jnp.sort(jnp.where(mask, jnp.arange(n, dtype=jnp.int32), n), axis=-1)[..., :k]
    return jnp.where(idx > qb, -1, idx).astype(jnp.int32)


def two_stage_select(b_qk: jax.Array, b_cis: jax.Array | None, qb: jax.Array, cfg: NosaConfig,
                     mode: str) -> jax.Array:
    """Top-k of pooled scores [..., n_blocks] (spec 2.7) -> ids [..., min(topk, n_blocks)].

    "nosa": the qk_select best by the pooled stage-1 scores are forced (+inf) into the final top-k
    ranked by the pooled cis scores `b_cis`, whose blocks after the query's own are set to -inf.
    "infllmv2": top-k of the pooled stage-1 scores. Ascending ids then -1; ties lowest index first.
    """
    n_blocks = b_qk.shape[-1]
    k_final = min(cfg.topk, n_blocks)
    if mode == "infllmv2":
        return mask_to_ids(top_k_mask(b_qk, k_final), k_final, qb)
    if mode != "nosa":
        raise ValueError(f"block selection: mode must be 'nosa' or 'infllmv2', got {mode!r}")
    b_cis = jnp.where(jnp.arange(n_blocks) > qb, NEG_INF, b_cis)
    b_cis = jnp.where(top_k_mask(b_qk, min(cfg.qk_select, n_blocks)), POS_INF, b_cis)
    return mask_to_ids(top_k_mask(b_cis, k_final), k_final, qb)


def select_blocks(q: jax.Array, q_pos: jax.Array, ktilde: jax.Array, cis_windows: jax.Array | None,
                  kv_len: jax.Array, n_blocks: int, cfg: NosaConfig, mode: str) -> jax.Array:
    """Block ids each query attends to (spec 2.7).

    q: [B, Tq, Hq, D]; q_pos: [B, Tq]; ktilde: [B, C, Hk, D]; cis_windows: [B, C, Hk] (nosa);
    kv_len: [B]; n_blocks: static number of blocks of the padded key axis.
    mode "nosa": 33 query-aware picks by pooled stage-1 scores, forced into the final top-64 ranked by
    the pooled cis window means (future blocks -inf). mode "infllmv2": top-64 of the pooled stage-1
    scores. Returns [B, Hk, Tq, K] int32, K = min(topk, n_blocks): ascending ids, then -1.
    """
    n_win = num_windows(kv_len, cfg)
    s1 = stage1_scores(q, q_pos, ktilde, n_win, cfg)
    b_qk = pool_blocks(s1, q_pos, n_win, n_blocks, cfg)
    qb = (q_pos // cfg.block_size)[:, None, :, None]
    b_cis = None
    if mode == "nosa":
        cw = jnp.moveaxis(cis_windows, 2, 1)[:, :, None, :]  # [B, Hk, 1, C]
        b_cis = pool_blocks(cw, q_pos, n_win, n_blocks, cfg)
    return two_stage_select(b_qk, b_cis, qb, cfg, mode)


def block_token_mask(block_ids: jax.Array, n_keys: int, block_size: int) -> jax.Array:
    """[B, Hk, Tq, K] block ids (-1 = none) -> [B, Hk, Tq, n_keys] bool: key in a selected block."""
    n_blocks = -(-n_keys // block_size)
    j = jnp.arange(n_blocks)
    sel = jnp.any(block_ids[..., :, None] == j, axis=-2)  # [B, Hk, Tq, nb]
    return jnp.repeat(sel, block_size, axis=-1)[..., :n_keys]


def attention(q: jax.Array, q_pos: jax.Array, k: jax.Array, v: jax.Array, kv_len: jax.Array,
              bias: jax.Array | None = None, block_ids: jax.Array | None = None,
              block_size: int = 64, return_lse: bool = False):
    """Causal attention with an optional per-key bias and block selection (dense masks).

    q: [B, Tq, Hq, D]; q_pos: [B, Tq]; k, v: [B, Tk, Hk, D]; kv_len: [B];
    bias: [B, Tk, Hk] added UNSCALED to q.k/sqrt(D) (spec 2.8) or None;
    block_ids: [B, Hk, Tq, K] (-1 ignored) or None for dense causal attention.
    Key s is visible to a query at position p iff s <= p, s < kv_len and (if block_ids) its block
    is selected. Softmax in float32; rows with no visible key give 0. Returns [B, Tq, Hq, D], and
    with return_lse also the log-sum-exp of the visible logits [B, Tq, Hq] (-inf for empty rows),
    the statistic a backward pass needs.
    """
    B, Tq, Hq, D = q.shape
    Tk, Hk = k.shape[1], k.shape[2]
    G = Hq // Hk
    qg = q.astype(jnp.float32).reshape(B, Tq, Hk, G, D)
    s = jnp.einsum("bthgd,bshd->bhgts", qg, k.astype(jnp.float32),
                   precision=lax.Precision.HIGHEST) / jnp.sqrt(jnp.float32(D))
    if bias is not None:
        s = s + jnp.moveaxis(bias.astype(jnp.float32), 1, 2)[:, :, None, None, :]
    pos = jnp.arange(Tk)
    visible = (pos[None, None, :] <= q_pos[:, :, None]) & (pos[None, None, :] < kv_len[:, None, None])
    visible = jnp.broadcast_to(visible[:, None], (B, Hk, Tq, Tk))
    if block_ids is not None:
        visible = visible & block_token_mask(block_ids, Tk, block_size)
    visible = visible[:, :, None]  # [B, Hk, 1, Tq, Tk]
    p = masked_softmax(s, visible)
    o = jnp.einsum("bhgts,bshd->bthgd", p, v.astype(jnp.float32), precision=lax.Precision.HIGHEST)
    o = o.reshape(B, Tq, Hq, D).astype(q.dtype)
    if not return_lse:
        return o
    lse = jax.nn.logsumexp(jnp.where(visible, s, NEG_INF), axis=-1)  # [B, Hk, G, Tq]
    return o, jnp.moveaxis(lse, 3, 1).reshape(B, Tq, Hq)


def gathered_block_attention(q: jax.Array, q_pos: jax.Array, k: jax.Array, v: jax.Array,
                             bias: jax.Array | None, block_ids: jax.Array, block_size: int) -> jax.Array:
    """One query per sequence attending only to its selected blocks (gathered, no dense mask).

    q: [B, Hq, D]; q_pos: [B]; k, v: [B, T, Hk, D]; bias: [B, T, Hk] or None;
    block_ids: [B, Hk, K] (-1 ignored). Same math as `attention` with `block_ids`, but reads
    K * block_size keys per (sequence, kv head) instead of T. Returns [B, Hq, D].
    """
    B, Hq, D = q.shape
    T, Hk = k.shape[1], k.shape[2]
    G = Hq // Hk
    K = block_ids.shape[-1]
    tok = block_ids[..., None] * block_size + jnp.arange(block_size)  # [B, Hk, K, bs]
    valid = (block_ids[..., None] >= 0) & (tok <= q_pos[:, None, None, None])
    tok = jnp.clip(tok, 0, T - 1).reshape(B, Hk, K * block_size)
    valid = valid.reshape(B, Hk, K * block_size)
    b_idx = jnp.arange(B)[:, None, None]
    h_idx = jnp.arange(Hk)[None, :, None]
    kg = k[b_idx, tok, h_idx].astype(jnp.float32)  # [B, Hk, N, D]
    vg = v[b_idx, tok, h_idx].astype(jnp.float32)
    qg = q.astype(jnp.float32).reshape(B, Hk, G, D)
    s = jnp.einsum("bhgd,bhnd->bhgn", qg, kg, precision=lax.Precision.HIGHEST) / jnp.sqrt(jnp.float32(D))
    if bias is not None:
        s = s + bias[b_idx, tok, h_idx].astype(jnp.float32)[:, :, None, :]
    p = masked_softmax(s, valid[:, :, None])
    o = jnp.einsum("bhgn,bhnd->bhgd", p, vg, precision=lax.Precision.HIGHEST)
    return o.reshape(B, Hq, D).astype(q.dtype)
