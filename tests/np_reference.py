"""Independent NumPy float64 reference of the NOSA math, written from shared/spec/nosa-upstream.md.

Sections 2 and 7 of the spec; this module does NOT import nosa_jax. Everything works on ONE
unpadded sequence at a time, with plain loops where that keeps the rules readable.

Hyperparameters come from any object with the attributes kernel_size (K), kernel_stride (S),
block_size, init_blocks, local_blocks, topk and qk_select (e.g. a NosaConfig or a SimpleNamespace).

Conventions: q [Tq, Hq, D] with query head h*G + g belonging to kv head h; k, v [N, Hk, D]
(k post-RoPE); cis [N, Hk]; q_pos [Tq] 0-based positions inside the sequence.
"""

from __future__ import annotations

import math

import numpy as np

NEG_INF = -np.inf
POS_INF = np.inf


def f64(x):
    return np.asarray(x, dtype=np.float64)


# ---------------------------------------------------------------- compression (spec 2.3, 2.6)

def num_windows(n: int, kernel_size: int = 32, kernel_stride: int = 16) -> int:
    """Complete windows over n tokens: max(0, floor((N - K)/S) + 1)."""
    if n < kernel_size:
        return 0
    return (n - kernel_size) // kernel_stride + 1


def window_means(x, cfg) -> np.ndarray:
    """x [N, ...] -> [C, ...]: window c is the mean of x[S c : S c + K] (complete windows only)."""
    x = f64(x)
    C = num_windows(x.shape[0], cfg.kernel_size, cfg.kernel_stride)
    out = np.zeros((C,) + x.shape[1:], np.float64)
    for c in range(C):
        start = cfg.kernel_stride * c
        acc = np.zeros(x.shape[1:], np.float64)
        for i in range(cfg.kernel_size):
            acc = acc + x[start + i]
        out[c] = acc / cfg.kernel_size
    return out


def round_to_bfloat16(x) -> np.ndarray:
    """Round to the nearest bfloat16 (8 significant bits, ties to even), returned as float64.

    Written from the format's definition, not with a bfloat16 type: x = m 2^e with 0.5 <= |m| < 1,
    keep round(m 2^8) (np.round: half to even). Values must lie in bfloat16's normal range
    (|x| >= 2^-126) or be 0, which holds for the tests' keys and their means.
    """
    m, e = np.frexp(f64(x))
    return np.ldexp(np.round(m * 256.0), e - 8)


def softplus(z):
    z = f64(z)
    return np.logaddexp(0.0, z)


def compute_cis(v, A, delta_kernel, delta_bias=None) -> np.ndarray:
    """cis[t, h] = A[h] * softplus(delta(concat_h' v[t, h', :]))[h].

    v [N, Hk, D]; delta_kernel [Hk*D, Hk] (input-major, i.e. z = concat @ kernel); A [Hk].
    """
    v, A, W = f64(v), f64(A), f64(delta_kernel)
    N, Hk, D = v.shape
    out = np.zeros((N, Hk), np.float64)
    for t in range(N):
        concat = np.concatenate([v[t, h] for h in range(Hk)])  # head-major concatenation
        for h in range(Hk):
            z = float(np.dot(concat, W[:, h]))
            if delta_bias is not None:
                z += float(f64(delta_bias)[h])
            out[t, h] = A[h] * float(softplus(z))
    return out


# ---------------------------------------------------------------- stage 1 (spec 2.4)

def window_visible(c: int, p: int, cfg) -> bool:
    """Window c is complete (hence visible) for a query at position p iff S c + K - 1 <= p."""
    return cfg.kernel_stride * c + cfg.kernel_size - 1 <= p


def stage1(q, q_pos, ktilde, cfg) -> np.ndarray:
    """S1 [Hk, Tq, C]: per query head softmax over the windows visible at its position (scale
    1/sqrt(D)), summed over the G query heads of each kv head; rows with nothing visible are 0."""
    q, ktilde = f64(q), f64(ktilde)
    Tq, Hq, D = q.shape
    C, Hk = ktilde.shape[0], ktilde.shape[1]  # ktilde [C, Hk, D], C may be 0
    G = Hq // Hk
    out = np.zeros((Hk, Tq, C), np.float64)
    for t in range(Tq):
        vis = [c for c in range(C) if window_visible(c, int(q_pos[t]), cfg)]
        if not vis:
            continue
        for h in range(Hk):
            for g in range(G):
                logits = np.array([np.dot(q[t, h * G + g], ktilde[c, h]) / math.sqrt(D) for c in vis])
                m = logits.max()
                e = np.exp(logits - m)
                p = e / e.sum()
                for i, c in enumerate(vis):
                    out[h, t, c] += p[i]
    return out


# ---------------------------------------------------------------- pooling (spec 2.5)

def forced(j: int, qb: int, cfg) -> bool:
    return j < cfg.init_blocks or (qb - cfg.local_blocks <= j <= qb)


def pool_row(x, qb: int, n_blocks: int, cfg) -> np.ndarray:
    """One row of window scores x [C] -> [n_blocks] block scores.

    Forced blocks (j < init_blocks, or qb - local_blocks <= j <= qb) are +inf; block j otherwise
    takes the max over windows P j - 1 .. P j + P - 1 (P = block_size / kernel_stride) clipped to
    [0, C), or -inf if that clipped range is empty.
    """
    x = f64(x)
    C = x.shape[0]
    P = cfg.block_size // cfg.kernel_stride
    out = np.empty(n_blocks, np.float64)
    for j in range(n_blocks):
        if forced(j, qb, cfg):
            out[j] = POS_INF
            continue
        lo = max(P * j - 1, 0)
        hi = min(P * j + P, C)  # exclusive: windows P j - 1 .. P j + P - 1
        out[j] = max(x[lo:hi]) if hi > lo else NEG_INF
    return out


# ---------------------------------------------------------------- top-k (spec 2.7)

def topk_lowest_first(scores, k: int) -> np.ndarray:
    """Indices of the k largest scores; equal scores keep the LOWEST index first."""
    order = np.argsort(-f64(scores), kind="stable")
    return order[:k]


def near_tie(scores, k: int, rel: float) -> bool:
    """True if a DIFFERENT value lies within rel * (largest finite |score|) of one of the two values
    at the top-k boundary (k-th and (k+1)-th largest): float32 rounding could then reorder them.
    Exact ties (structural: two blocks pooling the same window) are NOT near ties."""
    s = np.sort(f64(scores))[::-1]
    if k >= len(s) or k <= 0:
        return False
    fin = s[np.isfinite(s)]
    if fin.size == 0:
        return False
    scale = max(np.max(np.abs(fin)), 1e-300)
    for b in (s[k - 1], s[k]):
        if not np.isfinite(b):
            continue
        d = np.abs(fin - b)
        if np.any((d > 0) & (d <= rel * scale)):
            return True
    return False


def boundary_fragile(scores, k: int, rel: float) -> bool:
    """True if an in-set and an out-of-set value of the top-k differ by less than rel (relative to
    themselves) but are not exactly equal: float32 rounding could then reorder them. Exact ties come
    from a window shared by two blocks: every implementation sees the same float32 value there and
    breaks the tie by index, so they are not fragile. (`near_tie` measures the gap against the
    row's largest score instead.)"""
    if k >= len(scores):
        return False
    s = np.sort(f64(scores))[::-1]
    inside = np.unique(s[:k])
    outside = np.unique(s[k:])
    for u in inside[:3]:  # smallest in-set values
        for v in outside[-3:]:  # largest out-of-set values
            if np.isfinite(u) and np.isfinite(v) and u != v and abs(u - v) <= rel * max(abs(u), abs(v), 1e-30):
                return True
    return False


def finish(ids, qb: int) -> np.ndarray:
    """Sort ascending, then ids > qb become -1 (they are the largest, so the -1s end up last)."""
    ids = np.sort(np.asarray(ids, np.int64))
    return np.where(ids > qb, -1, ids)


def exact_tie(scores, k: int, ignore_zero: bool = False) -> bool:
    """True if the k-th and (k+1)-th largest scores are equal and finite (a tie that only the
    lowest-index-first rule resolves). ignore_zero: do not count ties at 0 (stage-1 blocks whose
    windows are all invisible, i.e. future blocks, whose order never changes the valid ids)."""
    s = np.sort(f64(scores))[::-1]
    if not (0 < k < len(s) and np.isfinite(s[k - 1]) and s[k - 1] == s[k]):
        return False
    return not (ignore_zero and s[k - 1] == 0)


def select_row(s1_row, cisw, p: int, n_blocks: int, cfg, mode: str, rel: float = 1e-5):
    """Block ids for one (kv head, query) row.

    s1_row [C]: stage-1 scores over all windows of the sequence (0 for invisible ones);
    cisw [C]: cis window means (nosa mode). Returns a dict: ids [min(topk, n_blocks)] (ascending,
    then -1), picks (query-aware picks, before the -1 rule), fragile (a near tie at a top-k
    boundary) and tie (an exact tie at a top-k boundary).
    """
    qb = p // cfg.block_size
    b_qk = pool_row(s1_row, qb, n_blocks, cfg)
    k_final = min(cfg.topk, n_blocks)
    if mode == "infllmv2":
        picks = topk_lowest_first(b_qk, k_final)
        return dict(ids=finish(picks, qb), picks=picks, fragile=near_tie(b_qk, k_final, rel),
                    tie=exact_tie(b_qk, k_final, ignore_zero=True))
    assert mode == "nosa", mode
    k_q = min(cfg.qk_select, n_blocks)
    picks = topk_lowest_first(b_qk, k_q)
    b_cis = pool_row(cisw, qb, n_blocks, cfg)
    for j in range(n_blocks):
        if j > qb:
            b_cis[j] = NEG_INF
    b_cis[picks] = POS_INF
    final = topk_lowest_first(b_cis, k_final)
    return dict(ids=finish(final, qb), picks=picks,
                fragile=near_tie(b_qk, k_q, rel) or near_tie(b_cis, k_final, rel),
                tie=exact_tie(b_qk, k_q, ignore_zero=True) or exact_tie(b_cis, k_final))


def select_blocks(q, q_pos, ktilde, cisw, n_tokens: int, cfg, mode: str, rel: float = 1e-5):
    """All selections of one sequence of n_tokens tokens.

    q [Tq, Hq, D]; ktilde [C, Hk, D] and cisw [C, Hk] (nosa mode; else None): the window means
    of the sequence's C = num_windows(n_tokens) complete windows. With nb = ceil(n_tokens / block)
    returns a dict of ids [Hk, Tq, min(topk, nb)], picks [Hk, Tq, ...], fragile [Hk, Tq],
    tie [Hk, Tq].
    """
    ktilde = f64(ktilde)
    Hk = ktilde.shape[1]
    nb = -(-n_tokens // cfg.block_size)
    s1 = stage1(q, q_pos, ktilde, cfg)
    Tq = q.shape[0]
    kf = min(cfg.topk, nb)
    kq = min(cfg.qk_select, nb) if mode == "nosa" else kf
    out = dict(ids=np.zeros((Hk, Tq, kf), np.int64), picks=np.zeros((Hk, Tq, kq), np.int64),
               fragile=np.zeros((Hk, Tq), bool), tie=np.zeros((Hk, Tq), bool))
    for h in range(Hk):
        for t in range(Tq):
            r = select_row(s1[h, t], None if cisw is None else f64(cisw)[:, h], int(q_pos[t]), nb,
                           cfg, mode, rel)
            for key in out:
                out[key][h, t] = r[key]
    return out


# ---------------------------------------------------------------- attention (spec 2.8)

def attention(q, q_pos, k, v, bias=None, block_ids=None, block_size: int = 64) -> np.ndarray:
    """out[t, h*G+g] = softmax over keys s (s <= p, s < N, block(s) selected for (h, t)) of
    (q.k_s / sqrt(D) + bias[s, h]) applied to v. bias is NOT scaled. block_ids [Hk, Tq, K] (-1 =
    none) or None for dense causal attention. Rows with no visible key give 0."""
    q, k, v = f64(q), f64(k), f64(v)
    Tq, Hq, D = q.shape
    N, Hk = k.shape[0], k.shape[1]
    G = Hq // Hk
    out = np.zeros((Tq, Hq, D), np.float64)
    for t in range(Tq):
        p = int(q_pos[t])
        for h in range(Hk):
            if block_ids is None:
                keys = [s for s in range(N) if s <= p]
            else:
                chosen = {int(j) for j in block_ids[h, t] if j >= 0}
                keys = [s for s in range(N) if s <= p and s // block_size in chosen]
            if not keys:
                continue
            keys = np.array(keys)
            for g in range(G):
                logits = k[keys, h] @ q[t, h * G + g] / math.sqrt(D)
                if bias is not None:
                    logits = logits + f64(bias)[keys, h]
                m = logits.max()
                w = np.exp(logits - m)
                w = w / w.sum()
                out[t, h * G + g] = w @ v[keys, h]
    return out


def nosa_attention(q, q_pos, k, v, cis, cfg, mode: str, rel: float = 1e-5):
    """Selection + attention for one sequence: (out [Tq, Hq, D], selection dict of select_blocks).
    mode 'full' is dense causal attention without bias (selection None)."""
    if mode == "full":
        return attention(q, q_pos, k, v), None
    k = f64(k)
    cisw = window_means(cis, cfg) if mode == "nosa" else None
    sel = select_blocks(q, q_pos, window_means(k, cfg).reshape(-1, *k.shape[1:]), cisw, k.shape[0],
                        cfg, mode, rel)
    bias = cis if mode == "nosa" else None
    return attention(q, q_pos, k, v, bias, sel["ids"], cfg.block_size), sel


# ---------------------------------------------------------------- a Llama layer (spec 1.1, 1.5)

def rope_default_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    return np.array([1.0 / theta ** (2 * i / head_dim) for i in range(head_dim // 2)])


def rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x, positions, inv_freq, scaling: float = 1.0):
    """x [N, H, D] rotated GPT-NeoX style with angles positions[t] * inv_freq (cat(freqs, freqs))."""
    x = f64(x)
    ang = f64(positions)[:, None] * f64(inv_freq)[None, :]
    emb = np.concatenate([ang, ang], axis=-1)
    cos, sin = np.cos(emb) * scaling, np.sin(emb) * scaling
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]


def rms_norm(x, w, eps):
    x = f64(x)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * f64(w)


def silu(x):
    return x / (1.0 + np.exp(-x))


def llama_layer(x, p: dict, *, n_heads: int, n_kv: int, head_dim: int, eps: float, inv_freq,
                cfg, mode: str, rel: float = 1e-5):
    """One pre-norm decoder layer on one unpadded sequence x [N, H] (positions 0..N-1).

    p: wq [H, Hq*D], wk, wv [H, Hk*D], wo [Hq*D, H], A [Hk], wdelta [Hk*D, Hk], ln1, ln2 [H],
    wg, wu [H, I], wd [I, H] (all input-major: y = x @ w).
    Returns (y [N, H], selection dict (see select_blocks; None in full mode), cis [N, Hk]).
    """
    x = f64(x)
    N = x.shape[0]
    hn = rms_norm(x, p["ln1"], eps)
    q = (hn @ f64(p["wq"])).reshape(N, n_heads, head_dim)
    k = (hn @ f64(p["wk"])).reshape(N, n_kv, head_dim)
    v = (hn @ f64(p["wv"])).reshape(N, n_kv, head_dim)
    cis = compute_cis(v, p["A"], p["wdelta"])
    pos = np.arange(N)
    q, k = apply_rope(q, pos, inv_freq), apply_rope(k, pos, inv_freq)
    o, sel = nosa_attention(q, pos, k, v, cis, cfg, mode, rel)
    x = x + o.reshape(N, n_heads * head_dim) @ f64(p["wo"])
    h2 = rms_norm(x, p["ln2"], eps)
    x = x + (silu(h2 @ f64(p["wg"])) * (h2 @ f64(p["wu"]))) @ f64(p["wd"])
    return x, sel, cis
