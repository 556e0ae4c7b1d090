"""Where does the Pallas decode selection inside the model part from float64? (session 18's open
question, bench/NOTES.md)

In tests/test_model_pallas.py::test_pallas_model_selections_gpu_1b the ids that the Pallas decode
selection returned inside the 1B one-layer decode programs differed from the float64 selection of
the same (bit-identical) inputs on 10-14 of 448 rows per mode, none of them a near tie, while the
reference program's ids agreed on every row, and the same Pallas function run eagerly on the
captured inputs agreed with the jnp reference on every row. This probe repeats the test's runs and,
for every decode call, captures inside the model's program the selection's inputs, its ids and the
pooled stage-1 scores (`decode_block_scores`, computed a second time in the same program); then it
computes the scores and ids again eagerly, jitted on their own, and in float64 (tests/np_reference),
and prints per call which of them differ and by how much, whether the stage-1 kernel's own outputs
(logits, split max and sum) in the model equal the eager ones bit for bit, and how many structural
ties (adjacent blocks whose pooled score is one shared window's, equal in the eager scores) the
model's scores break. Calls whose in-model ids differ are saved
(npz, with every intermediate) under --save for CPU analysis. The extra kernels change the program;
if the in-model ids then agree with float64, that is itself the finding (a context-dependent fault).

    python bench/probe_select_context.py [--mode infllmv2] [--layers 0 6 13] [--save $OUT]
    XLA_FLAGS=--xla_gpu_enable_command_buffer= python bench/probe_select_context.py ...   # no CUDA graphs

GPU only (the test's 1B model at 8K tokens).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import np_reference as npr  # noqa: E402
import pallas_kernels  # noqa: E402
import test_model_pallas as t  # noqa: E402
from nosa_jax import nosa  # noqa: E402
from nosa_jax.model import from_params  # noqa: E402
from pallas_kernels import selection as sel  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", default="infllmv2", choices=["infllmv2", "nosa"])
    ap.add_argument("--layers", type=int, nargs="+", default=None, help="default: all")
    ap.add_argument("--save", default=None, help="folder for the npz of calls whose in-model ids differ")
    args = ap.parse_args()
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)

    caps = []
    inner = pallas_kernels.decode_select

    def capturing_select(q, kt, cw, n_win, kv_len, layer, *, nosa_cfg, n_blocks, mode, **kw):
        ids = inner(q, kt, cw, n_win, kv_len, layer, nosa_cfg=nosa_cfg, n_blocks=n_blocks, mode=mode, **kw)
        scores = sel.decode_block_scores(q, kt, n_win, kv_len - 1, layer, nosa_cfg=nosa_cfg, n_blocks=n_blocks,
                                         interpret=kw.get("interpret", False))
        n_eff = sel._effective_windows(n_win, kv_len - 1, kt.shape[2], nosa_cfg)
        logits = sel.window_logits(q, kt, n_eff, layer, interpret=kw.get("interpret", False))  # (logits, m, l)
        cwl = jnp.zeros(kt.shape[1:4]) if cw is None else cw[layer]
        jax.debug.callback(lambda *a: caps.append([np.asarray(x) for x in a] + [n_blocks]),
                           q, kt[layer], cwl, n_win, kv_len, ids, scores, n_eff, *logits)
        return ids

    pallas_kernels.decode_select = capturing_select
    mode = args.mode
    prompt, fed = t._tokens()
    pure, ref = t._gpu_model(mode, scale_qk=4.0)
    _, _, hidden = t._gpu_run(ref, prompt, fed, all_rows=True)
    n = ref.cfg.nosa
    cfg1 = dataclasses.replace(ref.cfg, num_hidden_layers=1)
    k1 = n.qk_select if mode == "nosa" else n.topk
    select_jit = jax.jit(inner, static_argnames=("nosa_cfg", "n_blocks", "mode"))
    scores_jit = jax.jit(sel.decode_block_scores, static_argnames=("nosa_cfg", "n_blocks"))
    bad = 0
    for layer in args.layers or range(ref.cfg.num_hidden_layers):
        caps.clear()
        one = {**pure, "layers": jax.tree.map(lambda a: a[layer:layer + 1], pure["layers"])}
        t._gpu_run(from_params(cfg1, one, mode=mode, impl="pallas"), prompt, fed, embeds=[h[layer] for h in hidden])
        jax.effects_barrier()
        for step, (q, kt, cw, n_win, kv_len, ids, scores, n_eff, lg, m, l, n_blocks) in enumerate(caps):
            pool = jnp.asarray(kt)[None]
            cwp = None if mode == "infllmv2" else jnp.asarray(cw)[None]
            a = (jnp.asarray(q), pool, cwp, jnp.asarray(n_win), jnp.asarray(kv_len), 0)
            kw = dict(nosa_cfg=n, n_blocks=n_blocks, mode=mode)
            eager_ids = np.asarray(inner(*a, **kw))
            jit_ids = np.asarray(select_jit(*a, **kw))
            sa = (jnp.asarray(q), pool, jnp.asarray(n_win), jnp.asarray(kv_len) - 1, 0)
            eager_scores = np.asarray(sel.decode_block_scores(*sa, nosa_cfg=n, n_blocks=n_blocks))
            jit_scores = np.asarray(scores_jit(*sa, nosa_cfg=n, n_blocks=n_blocks))
            # the stage-1 kernel's own outputs: valid windows (rows 1 .. n_eff) and heads (columns < G)
            G = q.shape[1] // kt.shape[2]
            e_lg, e_m, e_l = (np.asarray(x) for x in sel.window_logits(jnp.asarray(q), pool, jnp.asarray(n_eff), 0))
            ne = int(n_eff[0])
            kernel_same = (np.array_equal(lg[:, :, 1:ne + 1, :G], e_lg[:, :, 1:ne + 1, :G])
                           and np.array_equal(m[..., :G], e_m[..., :G]) and np.array_equal(l[..., :G], e_l[..., :G]))
            pos = int(kv_len[0]) - 1
            c = int(nosa.num_windows(jnp.asarray(kv_len), n)[0])
            s1 = npr.stage1(q[0][None], [pos], kt[0, :c], n)
            nb = -(-int(kv_len[0]) // n.block_size)
            for h in range(kt.shape[2]):
                f64 = npr.pool_row(s1[h, 0], pos // n.block_size, nb, n)
                want = npr.select_row(s1[h, 0], cw[0, :c, h], pos, nb, n, mode)["ids"]
                want = set(want[want >= 0].tolist())
                got = {name: set(x[0, h][x[0, h] >= 0].tolist())
                       for name, x in (("model", ids), ("eager", eager_ids), ("jit", jit_ids))}
                fin = np.isfinite(f64[:nb])

                def rel(x):
                    return float(np.max(np.abs(x[0, h, :nb][fin] - f64[fin]) / np.maximum(np.abs(f64[fin]), 1e-30)))

                differs = {k: (sorted(want - v), sorted(v - want)) for k, v in got.items() if v != want}
                # structural ties: adjacent blocks equal in the eager scores (a shared window), finite
                e, mdl = eager_scores[0, h, :nb], scores[0, h, :nb]
                tied = np.isfinite(e[:-1]) & (e[:-1] == e[1:])
                broken = int(np.sum(tied & (mdl[:-1] != mdl[1:])))
                line = (f"layer {layer} step {step} head {h}: scores vs float64 rel, in model {rel(scores):.2e}, "
                        f"eager {rel(eager_scores):.2e}, jit {rel(jit_scores):.2e}; "
                        f"stage-1 kernel outputs in model == eager: {kernel_same}; structural ties "
                        f"{int(tied.sum())}, unequal in the model's scores {broken}; "
                        f"fragile {npr.boundary_fragile(f64, min(k1, nb), 1e-5)}; ids differing from float64 "
                        f"(float64 only, own only): {differs or 'none'}")
                if differs or broken or rel(scores) > 1e-5:
                    print(line, flush=True)
                if "model" in differs:
                    bad += 1
                    if args.save:
                        np.savez(Path(args.save) / f"select-{mode}-l{layer}-s{step}-h{h}.npz", q=q,
                                 ktilde=np.asarray(kt, np.float32), cisw=cw, n_win=n_win, kv_len=kv_len, ids=ids,
                                 scores=scores, eager_scores=eager_scores, jit_scores=jit_scores, float64=f64,
                                 logits=lg, m=m, l=l, eager_logits=e_lg, eager_m=e_m, eager_l=e_l)
        print(f"layer {layer}: {len(caps)} decode calls; rows whose in-model ids differ so far: {bad}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
