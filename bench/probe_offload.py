"""GPU probe for pallas_kernels/kv_loader.py: host-offloaded KV block loads on the H200.

Run from the repo root on the GPU machine (about 1 minute):
    python bench/probe_offload.py            # summary also written to $OUT/probe_offload.txt if $OUT is set
    PROBE_SMALL=1 python bench/probe_offload.py   # CPU smoke test of this script (pallas interpreted)

Shapes: L=4, B=16, Hk=2, NB=256, bs=64, D=128 bf16 (host K+V store of 1 GiB, pinned_host),
S=32 pool slots per (b, h), M=8 misses per (b, h) and call (256 blocks of 16 KiB for K and for V =
8 MiB per call, 10% of them -1 padding).
Cases (each prints OK/FAIL with the exception text):
  1. load_blocks(path="pallas") in a jitted lax.fori_loop of 20 calls with donated pools:
     bit-exact vs NumPy, time per call, GB/s (bytes of the non-skipped K+V blocks).
  2. the same with path="xla".
  3. decode-loop shape: lax.fori_loop over 3 steps { lax.scan over the 4 layers { load_blocks } }
     with the donated host store and pools in the carry, each path: bit-exact, time per step.
  4. copies in the compiled HLO of cases 1-3: `copy(` / `copy-start(` instructions whose type is a
     host-store or pool shape (a per-step full copy would show here).
(The host store is written by `nosa_jax.offload.flush`, not here; bench/offload.py measures it.)

Donation: every call gets fresh arrays or the previous call's outputs, and a pinned_host output is
read back through a device copy: NumPy reading it directly keeps an external reference to the
buffer, and donating it afterwards fails ("Donation requested for buffer with external reference").
"""

from __future__ import annotations

import os
import re
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import SingleDeviceSharding  # noqa: E402

from pallas_kernels.kv_loader import load_blocks, loader_path  # noqa: E402

L, B, Hk, NB, BS, D, S, M = 4, 16, 2, 256, 64, 128, 32, 8
if os.environ.get("PROBE_SMALL") == "1":  # CPU smoke test of this script (pallas in interpret mode)
    L, B, Hk, NB, BS, D, S, M = 2, 2, 2, 8, 16, 16, 6, 3
INTERPRET = jax.default_backend() != "gpu"
ITERS = 20
STEPS = 3
LINES: list[str] = []


def log(msg: str = "") -> None:
    print(msg, flush=True)
    LINES.append(msg)
    out = os.environ.get("OUT")
    if out:  # rewritten each time, so a timeout still leaves the summary so far
        Path(out, "probe_offload.txt").write_text("\n".join(LINES) + "\n")


def bits(x):
    return np.asarray(x).view(np.uint16 if np.asarray(x).dtype.itemsize == 2 else np.uint32)


def same(a, b) -> bool:
    """Bit equality. A jax array is read through a device copy: a NumPy view of a pinned_host (or
    CPU) array would hold an external reference to it that makes a later donation of it fail."""
    if isinstance(a, jax.Array):
        a = jax.device_put(a, jax.memory.Space.Device, may_alias=False)
    return np.array_equal(bits(a), bits(b))


def hlo_copies(hlo: str, shapes: dict[str, str]) -> dict[str, list[str]]:
    found = {name: [] for name in shapes}
    for ln in hlo.splitlines():
        m = re.search(r"=\s*(.*?)\s+copy(-start)?\(", ln)
        if not m:
            continue
        for name, s in shapes.items():
            if s + "{" in m.group(1):
                found[name].append(ln.strip()[:160])
    return found


def report_copies(tag: str, compiled_text: str) -> None:
    shapes = {"host store": f"bf16[{L},{B},{Hk},{NB},2,{BS},{D}]", "pool k/v": f"bf16[{L},{B},{S * BS},{Hk},{D}]",
              "pool bias": f"f32[{L},{B},{S * BS},{Hk}]"}
    found = hlo_copies(compiled_text, shapes)
    n_cs = sum("copy-start" in ln for ln in compiled_text.splitlines())
    log(f"  [4] {tag}: HLO copies of host store {len(found['host store'])}, pool k/v {len(found['pool k/v'])}, "
        f"pool bias {len(found['pool bias'])}; copy-start lines (any shape) {n_cs}; "
        f"triton custom calls {compiled_text.count('__gpu$xla.gpu.triton')}")
    for name, lines in found.items():
        for ln in lines[:4]:
            log(f"      {name}: {ln}")


def main() -> None:
    dev = jax.devices()[0]
    pin = SingleDeviceSharding(dev, memory_kind="pinned_host")
    log(f"probe_offload: jax {jax.__version__}, device {dev.platform}:{getattr(dev, 'device_kind', '?')}, "
        f"memories {[m.kind for m in dev.addressable_memories()]}")
    log(f"loader_path('auto'): load_blocks -> {loader_path()}")
    log(f"shapes: L={L} B={B} Hk={Hk} NB={NB} bs={BS} D={D} S={S} M={M}; host store "
        f"{L * B * Hk * NB * 2 * BS * D * 2 / 2**20:.0f} MiB (K and V)")

    t0 = time.perf_counter()
    rng = np.random.default_rng(0)

    def rand_bf16(*shape):  # normal positive bf16 bit patterns (no subnormals), cheap to make
        return rng.integers(0x0080, 0x3F80, size=shape, dtype=np.uint16).view(ml_dtypes.bfloat16)

    hkv_np = rand_bf16(L, B, Hk, NB, 2, BS, D)
    hk_np, hv_np = hkv_np[:, :, :, :, 0], hkv_np[:, :, :, :, 1]
    cis_np = rng.standard_normal((L, B, NB * BS, Hk)).astype(np.float32)
    pk_np, pv_np = rand_bf16(L, B, S * BS, Hk, D), rand_bf16(L, B, S * BS, Hk, D)
    pb_np = rng.standard_normal((L, B, S * BS, Hk)).astype(np.float32)

    def plan(n):
        blocks = np.stack([np.stack([np.stack([rng.choice(NB, M, replace=False) for _ in range(Hk)])
                                     for _ in range(B)]) for _ in range(n)]).astype(np.int32)
        slots = np.stack([np.stack([np.stack([rng.choice(S, M, replace=False) for _ in range(Hk)])
                                    for _ in range(B)]) for _ in range(n)]).astype(np.int32)
        blocks[rng.random(blocks.shape) < 0.1] = -1
        return blocks, slots

    blocks_np, slots_np = plan(ITERS)  # [ITERS, B, Hk, M]
    log(f"data made in {time.perf_counter() - t0:.1f}s")
    i_bs = np.arange(BS)

    def ref_load(hk, hv, pk, pv, pb, layer, blocks, slots):
        ok = blocks >= 0
        bb, hh, mm = np.nonzero(ok)
        blk, sl = blocks[ok], slots[ok]
        rows = sl[:, None] * BS + i_bs  # [n, bs]
        pk[layer, bb[:, None], rows, hh[:, None]] = hk[layer, bb, hh, blk]
        pv[layer, bb[:, None], rows, hh[:, None]] = hv[layer, bb, hh, blk]
        pb[layer, bb[:, None], rows, hh[:, None]] = cis_np[layer, bb[:, None], blk[:, None] * BS + i_bs, hh[:, None]]

    def put_host():
        return jax.device_put(hkv_np, pin)

    loaded_bytes = lambda blocks: int((blocks >= 0).sum()) * BS * D * 2 * 2  # K + V

    # ---------------- cases 1, 2: load_blocks in a jitted fori_loop ----------------
    hkv_h = put_host()
    for case, path in ((1, "pallas"), (2, "xla")):
        tag = f"[{case}] load_blocks path={path}"
        try:
            def f(pk, pv, pb, hkv, cis, blocks, slots, path=path):
                def body(i, c):
                    return load_blocks(hkv, cis, *c, i % L, blocks[i], slots[i], block_size=BS, path=path, interpret=INTERPRET)
                return lax.fori_loop(0, ITERS, body, (pk, pv, pb))

            jf = jax.jit(f, donate_argnums=(0, 1, 2))
            args = lambda: (jnp.asarray(pk_np), jnp.asarray(pv_np), jnp.asarray(pb_np), hkv_h,
                            jnp.asarray(cis_np), jnp.asarray(blocks_np), jnp.asarray(slots_np))
            t = time.perf_counter()
            comp = jf.lower(*args()).compile()
            t_c = time.perf_counter() - t
            out = jax.block_until_ready(comp(*args()))
            rk, rv, rb = pk_np.copy(), pv_np.copy(), pb_np.copy()
            for i in range(ITERS):
                ref_load(hk_np, hv_np, rk, rv, rb, i % L, blocks_np[i], slots_np[i])
            ok = same(out[0], rk) and same(out[1], rv) and same(out[2], rb)
            times = []
            cur = out
            for _ in range(5):
                t = time.perf_counter()
                cur = jax.block_until_ready(comp(*cur, hkv_h, jnp.asarray(cis_np), jnp.asarray(blocks_np),
                                                 jnp.asarray(slots_np)))
                times.append(time.perf_counter() - t)
            med = float(np.median(times))
            gb = loaded_bytes(blocks_np) / med / 1e9
            log(f"{'OK  ' if ok else 'FAIL'} {tag}: bit-exact={ok}; compile {t_c:.1f}s; {med / ITERS * 1e3:.3f} ms/call "
                f"(median of 5 x {ITERS} calls, wall), {gb:.1f} GB/s of K+V blocks "
                f"({loaded_bytes(blocks_np[0]) / 2**20:.1f} MiB/call)")
            report_copies(tag, comp.as_text())
        except Exception as e:  # noqa: BLE001
            log(f"FAIL {tag}: {type(e).__name__}: {str(e)[:1500]}")
            log(traceback.format_exc(limit=3)[-1500:])

    # ---------------- case 3: scan over layers inside fori_loop over steps ----------------
    sb_np, ss_np = plan(STEPS * L)
    sb_np = sb_np.reshape(STEPS, L, B, Hk, M)
    ss_np = ss_np.reshape(STEPS, L, B, Hk, M)
    rk, rv, rb = pk_np.copy(), pv_np.copy(), pb_np.copy()  # reference once (the same for every path)
    for t in range(STEPS):
        for layer in range(L):
            ref_load(hk_np, hv_np, rk, rv, rb, layer, sb_np[t, layer], ss_np[t, layer])
    hkv_h = None  # cases 1, 2 kept theirs (not donated there); case 3 donates fresh ones
    for lp in ("pallas", "xla"):
        tag = f"[3] fori(steps){{scan(layers){{load {lp}}}}}"
        try:
            def h(hkv, pk, pv, pb, cis, blocks, slots, lp=lp):
                def step(t, carry):
                    def layer_fn(c, xs):
                        hkv, pk, pv, pb = c
                        layer, bl, sl = xs
                        pk, pv, pb = load_blocks(hkv, cis, pk, pv, pb, layer, bl, sl, block_size=BS, path=lp,
                                                 interpret=INTERPRET)
                        return (hkv, pk, pv, pb), None

                    return lax.scan(layer_fn, carry, (jnp.arange(L, dtype=jnp.int32), blocks[t], slots[t]))[0]

                return lax.fori_loop(0, STEPS, step, (hkv, pk, pv, pb))

            jh = jax.jit(h, donate_argnums=(0, 1, 2, 3))
            fresh = lambda: (put_host(), jnp.asarray(pk_np), jnp.asarray(pv_np), jnp.asarray(pb_np))
            rest = lambda: (jnp.asarray(cis_np), jnp.asarray(sb_np), jnp.asarray(ss_np))
            t = time.perf_counter()
            comp = jh.lower(*fresh(), *rest()).compile()
            t_c = time.perf_counter() - t
            t = time.perf_counter()
            out = jax.block_until_ready(comp(*fresh(), *rest()))
            t_run = time.perf_counter() - t
            kinds = tuple(o.sharding.memory_kind for o in out)
            oks = [same(o, r) for o, r in zip(out, (hkv_np, rk, rv, rb))]
            t = time.perf_counter()
            out = jax.block_until_ready(comp(*out, *rest()))  # the previous outputs, donated again
            t_run2 = time.perf_counter() - t
            log(f"{'OK  ' if all(oks) else 'FAIL'} {tag}: bit-exact (hkv, pk, pv, pb)={oks}; kinds {kinds}; "
                f"compile {t_c:.1f}s; {t_run2 / STEPS * 1e3:.2f} ms/step of {L} layers (first run "
                f"{t_run / STEPS * 1e3:.2f})")
            report_copies(tag, comp.as_text())
            del out
        except Exception as e:  # noqa: BLE001
            log(f"FAIL {tag}: {type(e).__name__}: {str(e)[:1500]}")
            log(traceback.format_exc(limit=3)[-1500:])
    log(f"total {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
