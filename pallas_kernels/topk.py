"""NOSA's two-stage block top-k (spec 2.7) as one fused Pallas Triton kernel.

`two_stage_select_pallas` has exactly the contract of `nosa_jax.nosa.two_stage_select` (which is
its reference: the tests compare the two bit for bit): pooled scores [..., n] float32 -> block ids
[..., min(topk, n)] int32, ascending, then -1 for the blocks after the query's own block `qb`; ties
broken lowest-index-first; +inf (forced) and -inf (invalid) entries are ordinary values. The XLA
version spends three sorts per call (two lax.top_k, one jnp.sort); on an H200 at decode (32 rows of
2048 blocks at 128K context) that was ~84 us per layer, more than the attention itself.

Plan: one program per row (the leading dims flattened: B*Hk rows at decode, B*Hk*Tq in prefill).
The row is loaded once, padded to n_pad = a power of two >= 32 with masked loads; everything else
happens in registers, with no sort:

  key        float32 -> int32 with the same order: bits >= 0 stay, bits < 0 get bits ^ 0x7fffffff.
             -0.0 is first turned into +0.0 (the reference compares floats, where -0.0 == +0.0),
             on the bits (bits == INT32_MIN), not by a float compare: the kernel has no float
             arithmetic or compare at all, so its result does not depend on the backend's denormal
             mode. It orders floats as IEEE does (subnormals distinct from 0 and from each other),
             as the XLA:GPU reference does (xla_gpu_ftz is off by default) and Triton does; XLA:CPU
             runs with denormals-are-zero, where nosa.two_stage_select treats +-subnormals as 0, so
             on the host the two differ exactly when subnormal scores decide the selection (the
             tests compare against an IEEE numpy reference; see tests/test_kernel_topk.py).
             Padding lanes get INT32_MIN, below every float's key (-inf maps to INT32_MIN +
             0x7fffff), so they are never chosen: at least k <= n real lanes rank above them.
  kth        the k-th largest key by a most-significant-digit-first radix search over the 32 bits
             taken as unsigned (key ^ INT32_MIN), `radix_bits` bits per step: 2**radix_bits
             candidate thresholds are tested at once as one [2**radix_bits, n_pad] compare + row
             sum (counts of keys >= each threshold), and the largest candidate whose count is
             still >= k extends the prefix. At most 32 / radix_bits steps (4 bits: 8 steps of a
             [16, n_pad] compare), each ending in two small reductions, in a while loop that stops
             as soon as exactly k keys are >= the prefix found so far (lower bits zero): those are
             the top k, and the prefix serves as kth below. On random pooled scores the k-th and
             (k+1)-th keys part after about 16 of the 32 bits, so about half the steps run.
             Otherwise the result is the exact k-th largest key, the value lax.top_k reports.
  mask       key > kth | (key == kth & inclusive_cumsum(key == kth) <= k - #(key > kth)): the
             lowest-index-first tie break of nosa.top_k_mask, exactly; after an early stop simply
             key >= the prefix (a lax.cond: the tie ranks' reduction and scan are skipped).
  "nosa"     stage 1 on b_qk with k1 = min(qk_select, n); then b_cis with blocks > qb set to -inf and
             the stage-1 picks set to +inf (the order nosa.two_stage_select uses), stage 2 with
             K = min(topk, n). "infllmv2": one stage on b_qk.
  ids        each chosen lane j goes to output slot exclusive_cumsum(mask)[j] (its rank among the
             chosen, so the ids come out ascending) as a masked scatter store of (j > qb ? -1 : j).
             That is mask_to_ids: it sorts the chosen ids ascending and then maps ids > qb to -1
             (those are the largest, already last). Exactly K lanes are chosen, so all K slots are
             written; non-chosen lanes are masked off (and aimed past the row, slot K, which the
             interpret mode's scatter drops).

Ops in the kernel and the rule in jax/_src/pallas/triton/lowering.py (jax 0.11.2) that lowers each:
  pltriton.load with a slice + mask/other   primitives.load_p -> _masked_load_lowering_rule (tt.load);
                                            the same form as selection.py / sparse_decode.py.
  scalar ref read qb_ref[r]                 sp.get_p -> _get_lowering_rule (as sparse_decode's ids_ref).
  pltriton.store to o_ref.at[int32 array]   primitives.swap_p -> _masked_swap_lowering_rule; its
                                            _compute_offsets_from_indices takes an integer ARRAY
                                            indexer ("indexer is either a *scalar* or an array"):
                                            pointers = base + pos * stride, one tt.store of a pointer
                                            tensor (a scatter), as Triton's own tl.store(ptr + offs).
  lax.bitcast_convert_type f32 <-> i32      _bitcast_convert_type_lowering_rule (tt.bitcast, same width).
  lax.cumsum (int32, forward)               _cumsum_lowering_rule -> tt.scan (reverse is refused;
                                            not used).
  jnp.sum / reduce_sum over axis 1 and 0    reduce_sum_p -> _reduce_lowering -> _reduction_lowering
                                            (tt.reduce), as jnp.sum / jnp.max in selection.py.
  broadcasted_iota, where (select_n), eq/gt/ge/lt compares on i32 (none on f32), and/or/xor, shift_left,
  add/sub, convert bool -> int32            the elementwise tables (_JAX_TO_TRITON_BINARY,
                                            _JAX_TO_TRITON_SIGNED_BINARY: signed i32 compares are
                                            cmpi slt/sge...), iota_p, select_n_p, convert_element_type_p.
  program_id                                primitives.program_id_p.
Every tensor is [n_pad], [2**radix_bits], [2**radix_bits, n_pad] or a scalar: all powers of two.
The radix loop is a lax.while_loop (while_p -> _while_lowering_rule, scf.while), its shift computed
from the step count. The CPU test
suite cross-lowers the kernel for an abstract H200 and runs the MLIR verifier on the Triton module
(tests/test_kernel_topk.py), which checks every op and shape above reaches valid Triton IR; what it
cannot check is the Triton -> PTX compile (the GPU-marked test does).

Cost model (per row, n_pad = 2048, 4 bits): 8 steps x 16 x 2048 compares per stage, two stages:
~0.5M int32 compares per row, spread over num_warps * 32 threads, plus 2 x 8 pairs of reductions,
one cumsum per stage and one for the output slots, one scatter -- a few microseconds per row, all rows in
parallel (one program each), against the three XLA sorts. Tunables: num_warps and radix_bits (1, 2,
4 or 8: fewer, wider steps vs more, narrower ones; the compare work per step grows as
2**radix_bits, so 2 does half the compares of 4 in twice the steps); by default `default_tiling`
picks them from n_pad so the compare tensor does not spill (measured on the H200).

Decode (`decode_two_stage_select`, the model's path): the same kernel also pools the cis window
scores of its row (mode "nosa") from the stacked [L, B, C, Hk] pool - P + 1 masked gather loads, the
windows P j - 1 .. P j + P - 1 below n_eff, their max - and gives both rows the sink / local
forcing, work that XLA otherwise does in several small fusions per layer before the kernel (move,
mask, pool, force). The cis loads are issued before stage 1's search, which hides their latency.

NaN scores are not supported (the pooled scores never hold NaN; lax.top_k orders NaN its own way).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from nosa_jax import nosa
from nosa_jax.config import NosaConfig
from pallas_kernels.lanes import next_pow2

NEG_INF = float("-inf")
POS_INF = float("inf")
_INT32_MIN = -(2 ** 31)
_ABS_MASK = 0x7FFFFFFF
_MIN_ROW = 32  # rows are padded to at least one warp's width
# The radix search: "early" stops once exactly k keys are above the prefix found so far (about half
# the steps on random scores), "full" runs all 32 / radix_bits steps (the kernel before the early
# stop; bench/kernels_selection.py and bench/profile_decode.py time it as the baseline).
RADIX_SEARCH = "early"



# ----------------------------------------------------------------------------- in-kernel pieces

def _order_keys(x, valid):
    """float32 [n_pad] -> int32 keys with the IEEE float order (x < y iff key(x) < key(y); -0.0
    and +0.0 get one key, as they compare equal); lanes not `valid` get INT32_MIN (below -inf).
    Integer ops only: a float compare (x == 0.0) would follow the backend's denormal mode -- under
    XLA:CPU's denormals-are-zero it also sends +-subnormals to key 0, on the GPU it does not -- and
    interpret mode would then test something other than what Triton computes."""
    bits = lax.bitcast_convert_type(x, jnp.int32)
    bits = jnp.where(bits == _INT32_MIN, 0, bits)  # -0.0 (sign bit only) -> +0.0
    key = jnp.where(bits < 0, bits ^ _ABS_MASK, bits)
    return jnp.where(valid, key, _INT32_MIN)


def _kth_threshold(key, k: int, radix_bits: int, early_exit: bool = True):
    """(t, exact) for the int32 keys [n_pad] and 1 <= k <= number of lanes: with exact 1, the keys
    >= t are exactly the k largest; with exact 0, t is the k-th largest key, the largest t with
    #(key >= t) >= k. Built digit by digit from the top in the unsigned order (key ^ INT32_MIN). The search stops early once #(key >= t) == k for t
    the prefix found so far with its lower bits zero: then exactly k keys are >= t, which are the
    k largest (the (k+1)-th is below t, so no tie is left to break) -- typically after the bits that
    separate the k-th and (k+1)-th keys, about half of the 32 on random pooled scores. early_exit
    False: all 32 / radix_bits steps, always the k-th largest (the kernel before the early stop, kept
    as the benchmark's baseline)."""
    n_cand = 1 << radix_bits
    steps = 32 // radix_bits
    cand = lax.broadcasted_iota(jnp.int32, (n_cand,), 0)

    def more(carry):
        i, _, done = carry
        return (i < steps) & (done == 0)

    def step(carry):
        i, prefix, _ = carry  # prefix: the unsigned-order bits found so far (as int32 bits)
        shift = 32 - radix_bits * (i + 1)
        thr = (prefix | (cand << shift)) ^ _INT32_MIN  # the candidates' thresholds, signed order
        counts = jnp.sum(jnp.where(key[None, :] >= thr[:, None], 1, 0), axis=1)  # [n_cand]
        # counts fall with the candidate and counts[0] >= k holds by construction: the number of
        # candidates still at >= k, minus one, is the largest such candidate
        best = jnp.sum(jnp.where(counts >= k, 1, 0)) - 1
        # a traced 0 when off: a Python 0 yielded from the loop body does not lower to Triton
        exact = jnp.sum(jnp.where((cand == best) & (counts == k), 1, 0)) * int(early_exit)
        return i + 1, prefix | (best << shift), exact

    _, prefix, exact = lax.while_loop(more, step, (jnp.int32(0), jnp.int32(0), jnp.int32(0)))
    return prefix ^ _INT32_MIN, exact


def _top_k_lanes(key, k: int, radix_bits: int, early_exit: bool):
    """bool [n_pad]: the k largest keys, ties lowest-index-first (nosa.top_k_mask). When the search
    stopped early (exact) the keys >= its threshold are the answer and the tie ranks (a reduction
    and a scan across the row) are skipped."""
    kth, exact = _kth_threshold(key, k, radix_bits, early_exit)

    def tie_broken():
        above = key > kth
        tied = key == kth
        room = k - jnp.sum(jnp.where(above, 1, 0))
        rank = lax.cumsum(jnp.where(tied, 1, 0), axis=0)  # inclusive: 1 for the first tied lane
        return above | (tied & (rank <= room))

    if not early_exit:
        return tie_broken()
    return lax.cond(exact != 0, lambda: key >= kth, tie_broken)


def _pool_windows_in_kernel(cisw_ref, layer, b, h, n_eff, j, valid, P: int):
    """Block j's pooled cis score, as selection._pool_windows: the max of the layer's window scores
    P j - 1 .. P j + P - 1 that lie below n_eff (-inf where none does), read from the stacked
    [L, B, C, Hk] pool with P + 1 masked gather loads (indices clamped, so no lane points outside)."""
    C = cisw_ref.shape[2]
    out = jnp.full(j.shape, NEG_INF, jnp.float32)
    for t in range(P + 1):
        w = P * j - 1 + t
        ok = valid & (w >= 0) & (w < n_eff)
        x = pltriton.load(cisw_ref.at[layer, b, jnp.clip(w, 0, C - 1), h], mask=ok)
        out = jnp.where(ok, jnp.maximum(out, x.astype(jnp.float32)), out)
    return out


def _topk_kernel(qb_ref, qk_ref, *refs, n: int, n_pad: int, k1: int, k: int, mode: str,
                 radix_bits: int, early_exit: bool, pool: tuple | None = None):
    """One row r. qb_ref [R] i32; qk_ref [R, n] f32 (whole arrays, read at row r); o_ref [k] i32,
    this row's output. For "nosa" either cis_ref [R, n] f32, the pooled, forced cis scores, or,
    with `pool` = (Hk, cfg), layer_ref [1], n_eff_ref [B] and the stacked window scores cisw_ref
    [L, B, C, Hk]: row r = b Hk + h pools them here, and both rows get the sink / local forcing
    here (qk_ref then holds the unforced pooled scores)."""
    if pool is not None and mode == "nosa":
        layer_ref, n_eff_ref, cisw_ref, o_ref = refs
    elif mode == "nosa":
        cis_ref, o_ref = refs
    else:
        (o_ref,) = refs
    r = pl.program_id(0)
    j = lax.broadcasted_iota(jnp.int32, (n_pad,), 0)
    valid = j < n
    in_mask = valid if n < n_pad else None
    in_other = NEG_INF if n < n_pad else None
    qb = qb_ref[r]
    if pool is not None:
        Hk, cfg = pool
        forced = valid & nosa.forced(j, qb, cfg)
        if mode == "nosa":  # issued first: its loads wait while stage 1 searches
            b = r // Hk
            c = _pool_windows_in_kernel(cisw_ref, layer_ref[0], b, r % Hk, n_eff_ref[b], j, valid, cfg.pool_stride)
            c = jnp.where(forced, POS_INF, c)

    x = pltriton.load(qk_ref.at[r, pl.ds(0, n_pad)], mask=in_mask, other=in_other)
    if pool is not None:
        x = jnp.where(forced, POS_INF, x)
    key = _order_keys(x, valid)
    if mode == "nosa":
        picked = _top_k_lanes(key, k1, radix_bits, early_exit)
        if pool is None:
            c = pltriton.load(cis_ref.at[r, pl.ds(0, n_pad)], mask=in_mask, other=in_other)
        c = jnp.where(j > qb, NEG_INF, c)
        c = jnp.where(picked, POS_INF, c)
        key = _order_keys(c, valid)
    chosen = _top_k_lanes(key, k, radix_bits, early_exit)
    one = jnp.where(chosen, 1, 0)
    slot = lax.cumsum(one, axis=0) - one  # rank among the chosen lanes: ascending ids
    ids = jnp.where(j > qb, -1, j)
    pltriton.store(o_ref.at[jnp.where(chosen, slot, k)], ids, mask=chosen)


# ----------------------------------------------------------------------------- launcher

def default_tiling(n_pad: int) -> tuple[int, int]:
    """(num_warps, radix_bits) for rows of n_pad lanes: the widest search step (4 or 2 bits) whose
    [2**radix_bits, n_pad] compare holds <= 64 elements per thread, with 4 warps, else 8, else 16;
    1 bit per step only past that. H200, 32 rows (bench/results/kernels_selection-topk-*): n_pad
    512: 4 warps x 4 bits 25.3 us (2 bits: 27.1); n_pad 2048: 4 x 2 bits 36.7 us, 8 x 4 bits 45.4,
    4 x 4 bits 61.4 (the [16, 2048] tensor spills): 64 per thread was the best seen. Rows of 2049
    blocks (128K context + the compression window) pad to 4096: 8 warps x 2 bits (not measured)."""
    for warps in (4, 8, 16):
        for bits in (4, 2):
            if (2 ** bits) * n_pad <= 64 * 32 * warps:
                return warps, bits
    return 16, 1


def _tiling(n: int, num_warps, radix_bits, search):
    """(n_pad, num_warps, radix_bits, early_exit) with the defaults filled in and checked."""
    if n < 1:
        raise ValueError("two_stage_select_pallas needs at least one block per row")
    n_pad = max(_MIN_ROW, next_pow2(n))
    auto_warps, auto_bits = default_tiling(n_pad)
    num_warps = auto_warps if num_warps is None else num_warps
    radix_bits = auto_bits if radix_bits is None else radix_bits
    search = RADIX_SEARCH if search is None else search
    if search not in ("early", "full"):
        raise ValueError(f"search must be 'early' or 'full', got {search!r}")
    if radix_bits not in (1, 2, 4, 8):
        raise ValueError(f"radix_bits must be 1, 2, 4 or 8, got {radix_bits!r}")
    return n_pad, num_warps, radix_bits, search == "early"


def _launch(args, rows: int, n: int, cfg: NosaConfig, mode: str, pool, interpret: bool, tiling) -> jax.Array:
    """The kernel over `rows` rows of n blocks, `tiling` from _tiling: [rows, min(topk, n)] int32."""
    n_pad, num_warps, radix_bits, early_exit = tiling
    k_final = min(cfg.topk, n)
    kernel = functools.partial(_topk_kernel, n=n, n_pad=n_pad, k1=min(cfg.qk_select, n), k=k_final, mode=mode,
                               radix_bits=radix_bits, early_exit=early_exit, pool=pool)
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    return pl.pallas_call(
        kernel,
        grid=(rows,),
        in_specs=[any_spec] * len(args),
        out_specs=pl.BlockSpec((None, k_final), lambda r: (r, 0)),
        out_shape=jax.ShapeDtypeStruct((rows, k_final), jnp.int32),
        interpret=interpret,
        compiler_params=None if interpret else pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        name="nosa_two_stage_topk",
    )(*args)


def _check_mode(mode: str) -> None:
    if mode not in ("nosa", "infllmv2"):
        raise ValueError(f"block selection: mode must be 'nosa' or 'infllmv2', got {mode!r}")


def two_stage_select_pallas(b_qk: jax.Array, b_cis: jax.Array | None, qb: jax.Array, cfg: NosaConfig,
                            mode: str, *, interpret: bool = False, num_warps: int | None = None,
                            radix_bits: int | None = None, search: str | None = None) -> jax.Array:
    """nosa.two_stage_select in one Pallas kernel: same arguments, same result, bit for bit.

    b_qk: [..., n] pooled stage-1 scores; b_cis: [..., n] pooled cis scores (mode "nosa"; ignored,
    may be None, for "infllmv2"); qb: the query's block, broadcastable to [..., 1]. All three are
    broadcast together as the reference does. Returns [..., min(topk, n)] int32: ascending ids,
    then -1 for ids > qb; ties lowest index first.
    interpret: run the kernel in Pallas interpret mode (CPU). num_warps: Triton warps per row
    program. radix_bits: bits resolved per search step (1, 2, 4 or 8). None: `default_tiling`.
    search: "early" stops each radix search once the top k are separated, "full" runs every step
    (the benchmark's baseline); same result either way. None: `RADIX_SEARCH`.
    """
    _check_mode(mode)
    n = b_qk.shape[-1]
    tiling = _tiling(n, num_warps, radix_bits, search)
    qb = jnp.asarray(qb)
    shapes = [b_qk.shape[:-1], qb.shape[:-1] if qb.ndim else ()]
    if mode == "nosa":
        if b_cis is None:
            raise ValueError("mode 'nosa' needs b_cis")
        if b_cis.shape[-1] != n:
            raise ValueError(f"b_cis has {b_cis.shape[-1]} blocks, b_qk {n}")
        shapes.append(b_cis.shape[:-1])
    lead = jnp.broadcast_shapes(*shapes)
    rows = math.prod(lead)
    if rows == 0:
        return jnp.zeros(lead + (min(cfg.topk, n),), jnp.int32)

    qk = jnp.broadcast_to(b_qk.astype(jnp.float32), lead + (n,)).reshape(rows, n)
    qbr = jnp.broadcast_to(qb.astype(jnp.int32), lead + (1,)).reshape(rows)
    args = [qbr, qk]
    if mode == "nosa":
        args.append(jnp.broadcast_to(b_cis.astype(jnp.float32), lead + (n,)).reshape(rows, n))
    out = _launch(args, rows, n, cfg, mode, None, interpret, tiling)
    return out.reshape(lead + (min(cfg.topk, n),))


def decode_two_stage_select(b_qk: jax.Array, cisw_pool: jax.Array | None, layer, n_eff: jax.Array,
                            qb: jax.Array, cfg: NosaConfig, mode: str, *, interpret: bool = False,
                            num_warps: int | None = None, radix_bits: int | None = None,
                            search: str | None = None) -> jax.Array:
    """The decode selection's two-stage top-k with its inputs' pooling and forcing in the kernel.

    b_qk [B, Hk, n]: pooled stage-1 scores WITHOUT the sink / local forcing; cisw_pool [L, B, C, Hk]:
    every layer's cis window scores (mode "nosa"; None for "infllmv2"), of which the kernel reads
    layer `layer` (traced), windows below n_eff [B] (<= C), and pools them to blocks itself; qb [B]:
    the query's block. Equal, bit for bit, to two_stage_select_pallas(forced b_qk,
    selection._pool_windows(the masked layer's windows), qb) - the XLA fusions that would move,
    mask, pool and force the cis row and force b_qk are not run. [B, Hk, min(topk, n)] int32.
    """
    _check_mode(mode)
    B, Hk, n = b_qk.shape
    tiling = _tiling(n, num_warps, radix_bits, search)
    if B * Hk == 0:
        return jnp.zeros((B, Hk, min(cfg.topk, n)), jnp.int32)
    qbr = jnp.repeat(jnp.asarray(qb, jnp.int32).reshape(B), Hk)
    args = [qbr, b_qk.astype(jnp.float32).reshape(B * Hk, n)]
    if mode == "nosa":
        if cisw_pool is None or cisw_pool.ndim != 4 or cisw_pool.shape[1] != B or cisw_pool.shape[3] != Hk:
            raise ValueError(f"mode 'nosa' needs cisw_pool [L, {B}, C, {Hk}], got "
                             f"{None if cisw_pool is None else cisw_pool.shape}")
        args += [jnp.asarray(layer, jnp.int32).reshape(1), jnp.asarray(n_eff, jnp.int32).reshape(B), cisw_pool]
    out = _launch(args, B * Hk, n, cfg, mode, (Hk, cfg), interpret, tiling)
    return out.reshape(B, Hk, min(cfg.topk, n))
