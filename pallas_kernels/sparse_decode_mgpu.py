"""Block-sparse decode attention with the NOSA eviction bias: a Mosaic GPU (Hopper, wgmma/TMA) kernel.

Second backend of `pallas_kernels.sparse_decode.sparse_decode_attention` (select it there with
`backend="mosaic"`), with the same arguments, semantics and output:

    out[b, h*G + g] = softmax_over_visible(q . k / sqrt(D) + bias) . v     (float32 statistics)

over the tokens of the blocks that kv head h of sequence b selected; token i of logical block j is
visible iff j >= 0 and j * block_size + i <= q_pos[b], and lives at pool token
slots[b, h, e] * block_size + i of layer `layer` (traced) of the stacked pools [L, B, T, Hk, D].
Rows without a visible key give 0.

Structure:
  * `plgpu.kernel` with grid (B, Hk, k_splits) (`lax.axis_index` for the program ids), one
    warpgroup per program. Program (b, h, s) owns the E = ceil(K / k_splits) table entries
    s*E .. s*E+E-1.
  * Its per-split table (physical slot of each entry, the number of visible tokens of each entry,
    the layer) is TMA-copied to SMEM once; `plgpu.emit_pipeline` then walks the E entries with
    data-dependent index maps that read the slot from that SMEM table (token offset
    slot * block_size of `k_pool.at[layer, b, :, h, :]`), double-buffered.
  * Per step: S = q [64, D] x k_block^T by wgmma (q in SMEM, the G = Hq/Hk query rows padded with
    zeros to the wgmma M of 64), + the block's masked bias, online softmax in registers
    (float32; the running max includes the bias), P cast to the KV dtype and staged through SMEM
    for the P.V wgmma (the interpreter cannot take a register A operand; see below).
  * Each program writes its unnormalised partial output [64, D] f32 and its running max / sum
    [64]; the splits are merged in jnp exactly as in the Triton backend.

Masking without masked loads (TMA always moves the whole [block_size, D] tile):
  * The wrapper gathers the bias of the selected tokens only ([B, Hk, K, block_size] f32, a small
    XLA gather, ~2 MiB at B=16, Hk=8, K=64, bs=64) and folds visibility into it: -inf for every
    invisible token (-1 entry, position > q_pos, table padding). bias_pool=None gives 0/-inf.
  * Entries with fewer than block_size visible tokens (the block that holds q_pos, blocks after the
    query, -1 entries) have their K and V tile rows >= n_visible zeroed in SMEM before the wgmmas,
    so whatever the pool holds there (garbage, NaN: the tests poison it) cannot reach the output
    (0 * NaN in P.V). Entries with slot -1 read physical block 0 (and then zero it all).
  * A step with no visible token leaves the running max at -inf; exp uses a guarded max, so it
    contributes exactly nothing.

Constraints: q / k_pool / v_pool must be bfloat16 or float16 (wgmma operand types; q is cast to
the pool dtype); D a multiple of 64 (swizzle 128 tiling); block_size a multiple of 64 (wgmma N and
the P.V contraction); G = Hq / Hk <= 64.

Interpret mode: `interpret=True` maps to `plgpu.InterpretGPUParams()` (a bool is rejected by the
Mosaic GPU primitives). Known interpreter limitation (jax 0.11.2): wgmma with the A operand in
registers fails there, so P is always staged through SMEM (on the H200 that cost ~8% in the
prototype, notes §A.3/§A.5). `p_in_registers=True` selects the register path for the GPU; in the
interpreter it fails with "CpuCallback error ... ValueError: Expected shape (6,) but got (64, 64)"
(gpu_callbacks.wgmma expects an SMEM allocation key), so it is only cross-lowered on CPU.

GPU status: NOTHING in this module has run on a GPU yet. The CPU tests run the interpreter
(numerics) and lower the kernel for CUDA on an abstract H200 (jax's Mosaic GPU lowering of the
body into one `mosaic_gpu_v2` custom call succeeds at B=16, Hq=32, Hk=2/8, D=128, K=64, T=32768),
but neither checks what the device-side Mosaic compilation checks (layout inference, swizzles,
TMA descriptor limits, register pressure). Performance notes: -1 / future entries still cost a
TMA of one block (block 0) and the masked math; the bias is pre-gathered by XLA. Points most likely to
need attention on the H200: the WGMMA-layout load/store of the K/V tiles for the SMEM zeroing, the
column-vector layout of the bias (`Layout.WGMMA.reduce(0)`), and the 5-D strided TMA source
`k_pool.at[layer, b, :, h, :]`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

NEG_INF = float("-inf")
WGMMA_M = 64


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _check_shapes(dtype, block_size: int, D: int, G: int) -> None:
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"sparse_decode_attention_mgpu needs a bfloat16/float16 KV pool, got {dtype}")
    if D % 64:
        raise ValueError(f"sparse_decode_attention_mgpu needs head_dim % 64 == 0, got {D}")
    if block_size % 64:
        raise ValueError(f"sparse_decode_attention_mgpu needs block_size % 64 == 0, got {block_size}")
    if G > WGMMA_M:
        raise ValueError(f"sparse_decode_attention_mgpu supports at most {WGMMA_M} query heads per kv head, got {G}")


def _decode_kernel(tbl_ref, q_ref, k_ref, v_ref, bias_ref, o_ref, m_ref, l_ref,
                   tbl_smem, q_smem, p_smem, o_smem, m_smem, l_smem, bars, *,
                   block_size: int, per: int, tbl_width: int, scale: float, max_steps: int,
                   p_in_registers: bool):
    b = lax.axis_index("b")
    h = lax.axis_index("h")
    s = lax.axis_index("s")
    D = q_ref.shape[-1]
    dtype = q_smem.dtype

    # Per-program scalars and q (two TMAs on one barrier).
    plgpu.copy_gmem_to_smem(tbl_ref.at[b, h, s], tbl_smem, bars.at[0])
    plgpu.copy_gmem_to_smem(q_ref.at[b, h], q_smem, bars.at[1])
    plgpu.barrier_wait(bars.at[0])
    plgpu.barrier_wait(bars.at[1])
    layer = tbl_smem[2 * per]

    k_src = k_ref.at[layer, b, :, h, :]  # [T, D]
    v_src = v_ref.at[layer, b, :, h, :]
    bias_src = bias_ref.at[b, h, s]  # [per, bs]

    def slot_map(j):
        return (tbl_smem[j], 0)

    def sanitize(ref, n):
        rows = plgpu.broadcasted_iota(jnp.int32, (block_size, D), 0, layout=plgpu.Layout.WGMMA)
        x = plgpu.load(ref, layout=plgpu.Layout.WGMMA)
        ref[...] = jnp.where(rows < n, x, jnp.zeros_like(x))

    def body(idx, k_smem, v_smem, b_smem, carry):
        acc, m_prev, l_prev = carry
        j = idx[0]
        n_vis = tbl_smem[per + j]

        @pl.when(n_vis < block_size)
        def _():
            sanitize(k_smem, n_vis)
            sanitize(v_smem, n_vis)
            plgpu.commit_smem()

        def qk(acc_ref):
            plgpu.wgmma(acc_ref, q_smem, k_smem.transpose((1, 0)))
            return acc_ref[...]

        sc = pl.run_scoped(qk, plgpu.ACC((WGMMA_M, block_size), jnp.float32))
        bias = plgpu.load(b_smem, layout=plgpu.Layout.WGMMA.reduce(0))  # [bs], -inf = invisible
        sc = sc * scale + lax.broadcast_in_dim(bias, sc.shape, [1])
        m_new = jnp.maximum(m_prev, sc.max(axis=1))
        m_use = jnp.where(m_new == NEG_INF, 0.0, m_new)  # nothing visible yet: no (-inf) - (-inf)
        alpha = jnp.exp(m_prev - m_use)
        p = jnp.exp(sc - lax.broadcast_in_dim(m_use, sc.shape, [0]))
        l_new = l_prev * alpha + p.sum(axis=1)
        p16 = p.astype(dtype)
        if p_in_registers:
            def pv(acc_ref):
                plgpu.wgmma(acc_ref, p16, v_smem)
                return acc_ref[...]
        else:
            p_smem[...] = p16
            plgpu.commit_smem()

            def pv(acc_ref):
                plgpu.wgmma(acc_ref, p_smem, v_smem)
                return acc_ref[...]
        o_blk = pl.run_scoped(pv, plgpu.ACC((WGMMA_M, D), jnp.float32))
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + o_blk
        return acc, m_new, l_new

    tiling = plgpu.TilingTransform((8, 64))
    swizzle = plgpu.SwizzleTransform(128)
    kv_spec = plgpu.BlockSpec((block_size, D), slot_map, transforms=(tiling, swizzle))
    bias_spec = plgpu.BlockSpec((None, block_size), lambda j: (j, 0))
    init = (
        plgpu.layout_cast(jnp.zeros((WGMMA_M, D), jnp.float32), plgpu.Layout.WGMMA),
        plgpu.layout_cast(jnp.full((WGMMA_M,), NEG_INF, jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
        plgpu.layout_cast(jnp.zeros((WGMMA_M,), jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
    )
    pipeline = plgpu.emit_pipeline(body, grid=(per,), in_specs=[kv_spec, kv_spec, bias_spec],
                                   max_concurrent_steps=max_steps, init_carry=init)
    acc, m, l = pipeline(k_src, v_src, bias_src)

    o_smem[...] = acc
    m_smem[...] = m
    l_smem[...] = l
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_ref.at[b, h, s])
    plgpu.copy_smem_to_gmem(m_smem, m_ref.at[b, h, s])
    plgpu.copy_smem_to_gmem(l_smem, l_ref.at[b, h, s])
    plgpu.wait_smem_to_gmem(0)


def _interpret_params(interpret):
    if interpret is True:
        return plgpu.InterpretGPUParams()
    if interpret is False or interpret is None:
        return None
    return interpret  # already an InterpretGPUParams


@functools.partial(jax.jit, static_argnames=("block_size", "k_splits", "interpret", "max_concurrent_steps",
                                             "p_in_registers"))
def sparse_decode_attention_mgpu(q, k_pool, v_pool, bias_pool, block_ids, slots, q_pos, layer, *,
                                 block_size: int, k_splits: int | None = None, interpret=False,
                                 max_concurrent_steps: int = 2, p_in_registers: bool = False) -> jax.Array:
    """Block-sparse decode attention over the stacked KV pool (Mosaic GPU, split-K).

    Same interface as `sparse_decode.sparse_decode_attention`: q [B, Hq, D]; k_pool, v_pool
    [L, B, T, Hk, D] (bf16/f16); bias_pool [L, B, T, Hk] or None; block_ids, slots [B, Hk, K] int32
    (-1 unused); q_pos [B]; layer int32 scalar (may be traced). k_splits None -> default_k_splits.
    interpret: True -> `plgpu.InterpretGPUParams()` (CPU), or an InterpretGPUParams instance.
    Returns [B, Hq, D] in q.dtype.
    """
    from pallas_kernels.sparse_decode import check_args, merge_splits, plan_splits

    B, Hq, D, Hk, K = check_args(q, k_pool, v_pool, bias_pool, block_ids, slots, block_size)
    T = k_pool.shape[2]
    G = Hq // Hk
    _check_shapes(k_pool.dtype, block_size, D, G)
    if K == 0:
        return jnp.zeros_like(q)

    ks, per = plan_splits(B, Hk, K, k_splits)
    Kp = ks * per
    bs = block_size
    dtype = k_pool.dtype

    ids = jnp.pad(block_ids.astype(jnp.int32), ((0, 0), (0, 0), (0, Kp - K)), constant_values=-1)
    sl = jnp.pad(slots.astype(jnp.int32), ((0, 0), (0, 0), (0, Kp - K)), constant_values=0)
    sl = jnp.where(ids >= 0, sl, 0)  # -1 entries read (and then zero) physical block 0
    qpos = jnp.asarray(q_pos, jnp.int32).reshape(B)
    lyr = jnp.asarray(layer, jnp.int32)
    # Visible tokens of an entry form a prefix of its block: n_vis = clip(q_pos - j*bs + 1, 0, bs).
    n_vis = jnp.where(ids >= 0, jnp.clip(qpos[:, None, None] - ids * bs + 1, 0, bs), 0)

    # Masked bias of the selected tokens only: [B, Hk, Kp, bs] f32, -inf where invisible.
    i = jnp.arange(bs, dtype=jnp.int32)
    visible = i < n_vis[..., None]
    if bias_pool is None:
        bias_g = jnp.where(visible, 0.0, NEG_INF).astype(jnp.float32)
    else:
        phys = jnp.clip(sl[..., None] * bs + i, 0, T - 1)  # [B, Hk, Kp, bs]
        b_idx = jnp.arange(B)[:, None, None, None]
        h_idx = jnp.arange(Hk)[None, :, None, None]
        bias_g = jnp.where(visible, bias_pool[lyr, b_idx, phys, h_idx].astype(jnp.float32), NEG_INF)
    bias_g = bias_g.reshape(B, Hk, ks, per, bs)

    # Per-split scalar table [B, Hk, ks, W] int32: slots | n_vis | layer, W a multiple of 4 (16-byte TMA).
    W = _round_up(2 * per + 1, 4)
    tbl = jnp.concatenate([sl.reshape(B, Hk, ks, per), n_vis.reshape(B, Hk, ks, per),
                           jnp.broadcast_to(lyr, (B, Hk, ks, 1)),
                           jnp.zeros((B, Hk, ks, W - 2 * per - 1), jnp.int32)], axis=-1)

    qp = q.astype(dtype).reshape(B, Hk, G, D)
    qp = jnp.pad(qp, ((0, 0), (0, 0), (0, WGMMA_M - G), (0, 0)))  # [B, Hk, 64, D]

    tiling = plgpu.TilingTransform((8, 64))
    swizzle = plgpu.SwizzleTransform(128)
    scratch = [
        plgpu.SMEM((W,), jnp.int32),
        plgpu.SMEM((WGMMA_M, D), dtype, transforms=(tiling, swizzle)),  # q
        plgpu.SMEM((WGMMA_M, bs), dtype, transforms=(tiling, swizzle)),  # P
        plgpu.SMEM((WGMMA_M, D), jnp.float32),  # o
        plgpu.SMEM((WGMMA_M,), jnp.float32),  # m
        plgpu.SMEM((WGMMA_M,), jnp.float32),  # l
        plgpu.Barrier(num_barriers=2),
    ]
    kernel = functools.partial(_decode_kernel, block_size=bs, per=per, tbl_width=W, scale=1.0 / math.sqrt(D),
                               max_steps=max(1, min(max_concurrent_steps, per)), p_in_registers=p_in_registers)
    out_type = (jax.ShapeDtypeStruct((B, Hk, ks, WGMMA_M, D), jnp.float32),
                jax.ShapeDtypeStruct((B, Hk, ks, WGMMA_M), jnp.float32),
                jax.ShapeDtypeStruct((B, Hk, ks, WGMMA_M), jnp.float32))
    o, m, l = plgpu.kernel(
        kernel,
        out_type=out_type,
        scratch_types=scratch,
        grid=(B, Hk, ks),
        grid_names=("b", "h", "s"),
        compiler_params=plgpu.CompilerParams(),
        interpret=_interpret_params(interpret),
    )(tbl, qp, k_pool, v_pool, bias_g)

    return merge_splits(o, m, l, G, q.dtype)
