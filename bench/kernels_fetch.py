"""The offloaded decode step's loads + attention: one fetching kernel against the loader kernel
followed by the attention kernel, on the GPU with the store in pinned host memory.

Shape: the 8B decode (B=16, Hq=32, Hk=2, D=128, bf16), K=64 selected blocks of 64 tokens per
(sequence, kv head), a pool of 128 slots (2x top-k), a 16K-token store (256 blocks); m of each row's
entries are misses (m = 0, 2, 8: the 8B runs average ~2 with the 2x pool and ~8.5 with the top-k
pool), the new token written into its own block's slot; where the misses sit in each row's entry
order: "random", "last" (the row's last m entries: one split holds them all), "spread" (each
split's second entry, round robin) or "poisson" (random entries, a Poisson(m) count per row).
Methods, in the same run:
  separate  kv_loader.load_blocks(path="pallas") (copies the misses host -> pool and writes the
            token), then sparse_decode_attention over the pool (what offload.LOADS="separate" runs)
  fused     sparse_decode.sparse_decode_attention_fetch (what offload.LOADS="fused" runs), at
            several (k_splits, num_warps, num_stages); merge in the kernel
Timing: one jit makes R calls in a row, call r on layer r % L, each call's output the next call's
query and the pools carried; device time = the CUPTI time of the methods' own kernels (not the
one-off copy of the pools into the timed program), median over repeats, / R.
Floors: HBM = the hits' K+V and bias, the misses' pool writes, at 4.3 TB/s; PCIe = the misses' K+V
at 53 GB/s; the table gives microseconds per call and the ratio to `separate`.

    PYTHONPATH=. python3 bench/kernels_fetch.py [--quick]   (--quick: four cases, two settings)
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import SingleDeviceSharding  # noqa: E402

from bench.common import record, standalone  # noqa: E402
from bench.kernels_decode import _rel, device_time  # noqa: E402
from pallas_kernels.kv_loader import load_blocks  # noqa: E402
from pallas_kernels.sparse_decode import (Fetch, plan_splits, sparse_decode_attention,  # noqa: E402
                                         sparse_decode_attention_fetch)

B, HQ, HK, D, BS, K, S, NB, L, R = 16, 32, 2, 128, 64, 64, 128, 256, 4, 8
HBM, PCIE = 4.3e12, 53e9
HEADER = ["misses/row", "order", "method", "settings", "us/call", "vs separate", "HBM floor us", "PCIe floor us",
          "rel_err"]
# (k_splits, num_warps, num_stages)
SETTINGS = [(None, 4, 2), (None, 4, 1), (16, 4, 2), (None, 4, 3), (None, 8, 2)]
ORDERS = ("random", "last", "spread", "poisson")


def _miss_entries(rng, m: int, order: str, per: int, ks: int):
    """Which of a row's K entries are misses (entry 0, the token's own block, never is)."""
    if order == "random":
        return rng.choice(np.arange(1, K), size=m, replace=False)
    if order == "poisson":  # the row's count drawn around m, as rows differ in a real step
        return rng.choice(np.arange(1, K), size=min(K - 1, int(rng.poisson(m))), replace=False)
    if order == "last":
        return np.arange(K - m, K)
    return np.array([(j % ks) * per + 1 + j // ks for j in range(m)])  # "spread"


def _inputs(m: int, order: str = "random", seed: int = 0):
    rng = np.random.default_rng(seed)
    ks, per = plan_splits(B, HK, K, None)
    ids = np.stack([np.stack([rng.permutation(NB)[:K] for _ in range(HK)]) for _ in range(B)]).astype(np.int32)
    q_pos = (ids.max(axis=(1, 2)) + 1) * BS - 1  # every selected token visible; the last block is the token's
    ids[:, :, 0] = (q_pos // BS)[:, None]
    slots = np.stack([np.stack([rng.permutation(S)[:K] for _ in range(HK)]) for _ in range(B)]).astype(np.int32)
    loads = np.full_like(ids, -1)
    for b in range(B):
        for h in range(HK):
            e = _miss_entries(rng, m, order, per, ks)
            loads[b, h, e] = ids[b, h, e]
    rows = slots[:, :, 0] * BS + q_pos[:, None] % BS
    keys = jax.random.split(jax.random.key(seed), 8)
    nrm = lambda k, s, dt=jnp.bfloat16: jax.random.normal(k, s, dt)  # noqa: E731
    pin = SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host")
    host = jax.device_put(nrm(keys[0], (L, B, HK, NB + 1, 2, BS, D)), pin)
    cis = nrm(keys[1], (L, B, (NB + 1) * BS, HK), jnp.float32)
    pools = (nrm(keys[2], (L, B, S * BS, HK, D)), nrm(keys[3], (L, B, S * BS, HK, D)),
             nrm(keys[4], (L, B, S * BS, HK), jnp.float32))
    new = (nrm(keys[5], (B, HK, D)), nrm(keys[6], (B, HK, D)), nrm(keys[7], (B, HK), jnp.float32))
    q = jax.random.normal(jax.random.key(seed + 1), (B, HQ, D), jnp.bfloat16)
    j = jnp.asarray
    return q, pools, host, cis, j(ids), j(slots), j(loads), j(q_pos.astype(np.int32)), j(rows.astype(np.int32)), new


def _separate(q, pools, host, cis, ids, slots, loads, q_pos, rows, new, layer):
    pk, pv, pb = load_blocks(host, cis, *pools, layer, loads, slots, block_size=BS, new_k=new[0], new_v=new[1],
                             new_cis=new[2], new_row=rows, path="pallas")
    return sparse_decode_attention(q, pk, pv, pb, ids, slots, q_pos, layer, block_size=BS), (pk, pv, pb)


def _fused(q, pools, host, cis, ids, slots, loads, q_pos, rows, new, layer, ks, nw, ns):
    o, *p, _ = sparse_decode_attention_fetch(q, *pools, ids, slots, q_pos, layer, Fetch(host, cis, loads, *new, rows),
                                          block_size=BS, k_splits=ks, num_warps=nw, num_stages=ns, merge="kernel")
    return o, tuple(p)


def _chain(step):
    @jax.jit
    def run(q, pools, *rest):
        for r in range(R):
            q, pools = step(q, pools, *rest, jnp.int32(r % L))
        return q, pools
    return run


def run(records: list, quick: bool = False) -> list:
    if jax.devices()[0].platform != "gpu":
        raise RuntimeError("bench/kernels_fetch.py needs a GPU")
    rows_out = []
    repeats = 5 if quick else 9
    cases = [(0, "random")] + [(m, o) for m in (2, 8) for o in ORDERS]
    if quick:
        cases = [(0, "random"), (2, "random"), (2, "poisson"), (8, "random")]
    for m, order in cases:
        args = _inputs(m, order)
        q, pools, host, cis, ids, slots, loads, q_pos, rows, new = args
        n_miss = int(jnp.sum(loads >= 0))
        hbm = B * HK * K * BS * (2 * D * 2 + 4)  # the hits read from the pool, the misses written to it
        pcie = n_miss * BS * 2 * D * 2
        floors = (hbm / HBM * 1e6, pcie / PCIE * 1e6)
        fresh = lambda: jax.tree.map(jnp.copy, pools)  # noqa: E731 - load_blocks donates the pools it is given
        ref_o, ref_p = _separate(q, fresh(), host, cis, ids, slots, loads, q_pos, rows, new, jnp.int32(1))
        base = None
        variants = [("separate", "default", _separate, ("nosa_kv_load_blocks", "nosa_sparse_decode"))]
        sweep = SETTINGS[:2] if quick else SETTINGS
        for ks, nw, ns in sweep:
            variants.append(("fused", f"ks={ks or 'auto'} warps={nw} stages={ns}",
                             functools.partial(_fused, ks=ks, nw=nw, ns=ns), ("nosa_sparse_decode_fetch",)))
        for method, settings, fn, names in variants:
            try:
                o, p = fn(q, fresh(), host, cis, ids, slots, loads, q_pos, rows, new, jnp.int32(1))
                same = all(bool(jnp.array_equal(a, b)) for a, b in zip(p, ref_p))
                err = _rel(o, ref_o)
                _, kern, how = device_time(_chain(fn), args, R, repeats, kernel_substr=names)
            except Exception as e:  # noqa: BLE001 - a setting that does not compile: report and go on
                print(f"{method} {settings} m={m} {order} FAILED: {type(e).__name__}: {e}", flush=True)
                rows_out.append([m, order, method, settings, "FAILED", "", "", "", type(e).__name__])
                continue
            us = kern * 1e6 if kern else float("nan")
            base = us if method == "separate" else base
            ratio = us / base if base else float("nan")
            st = {"misses_per_row": m, "order": order, "settings": settings, "B": B, "Hq": HQ, "Hk": HK, "K": K,
                  "slots": S, "timing": how, "pools_equal_separate": same}
            records.append(record(f"decode_fetch_{method}", st, "time", us, "us"))
            records.append(record(f"decode_fetch_{method}", st, "time_vs_separate", ratio, "x"))
            rows_out.append([m, order, method, settings + ("" if same else " (POOLS DIFFER)"), f"{us:.1f}",
                             f"{ratio:.2f}", f"{floors[0]:.1f}", f"{floors[1]:.1f}", f"{err:.1e}"])
            print(rows_out[-1], flush=True)
    return rows_out


if __name__ == "__main__":
    standalone(run, HEADER, "kernels_fetch")
