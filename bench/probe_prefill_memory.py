"""How much device memory does one prefill chunk take beyond the cache, per sequence of a group?

`Generator.start` sizes the offloaded prefill group by `offload.prefill_bytes` per sequence: its
cache, the store's staging copies and the estimate `cache.prefill_activation_bytes` of the chunk's
own temporaries (activations, the selection's scores). The benchmark's starts copy from a memo and
need none. This compiles `generate._prefill_chunk` for groups of g sequences at the last chunk of a
long prompt (shapes only: nothing is allocated or run) and prints XLA's memory analysis:
temporaries per group and per sequence, against the estimate.

    python bench/probe_prefill_memory.py [--model 8b] [--context 131072] [--chunk 4096] [--groups 1 2 4 9]
    python bench/probe_prefill_memory.py --model 1b --layers 2 --context 4096 --chunk 1024 --groups 1 2   # CPU smoke test
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from nosa_jax.cache import cache_bytes, prefill_activation_bytes  # noqa: E402
from nosa_jax.config import SHAPES, ModelConfig  # noqa: E402
from nosa_jax.generate import _prefill_chunk  # noqa: E402
from nosa_jax.model import NosaForCausalLM  # noqa: E402
from nosa_jax.offload import prefill_bytes  # noqa: E402


def prefill_temporaries(model: NosaForCausalLM, group: int, capacity: int, chunk: int) -> int:
    """XLA's temporaries (bytes) of the compiled prefill call of `group` sequences and `chunk` tokens
    into a cache of `capacity` tokens (shapes only: `model` may come from nnx.eval_shape)."""
    graphdef, state = nnx.split(model)
    sd = jax.ShapeDtypeStruct
    cache = jax.eval_shape(lambda: model.init_cache(group, capacity))
    pos = sd((group,), jnp.int32)
    compiled = _prefill_chunk.lower(graphdef, state, sd((group, chunk), jnp.int32), pos, pos, cache,
                                    sd((group, model.cfg.vocab_size), jnp.float32)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="8b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="fewer layers (smoke tests)")
    ap.add_argument("--mode", default="nosa", choices=["nosa", "infllmv2", "full"])
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--groups", type=int, nargs="+", default=[1, 2, 4, 9])
    args = ap.parse_args()

    shape = dict(SHAPES[args.model])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    cfg = ModelConfig(**shape)
    dtype = jnp.bfloat16
    model = nnx.eval_shape(lambda: NosaForCausalLM(cfg, mode=args.mode, dtype=dtype, rngs=nnx.Rngs(0)))
    capacity = args.context + 256
    per_seq = prefill_bytes(cfg, capacity, dtype, args.mode, args.chunk)
    est = prefill_activation_bytes(cfg, capacity, dtype, args.mode, args.chunk)
    cache_seq = cache_bytes(cfg, 1, capacity, dtype, args.mode)
    print(f"device {jax.devices()[0].device_kind}  jax {jax.__version__}  {args.model} {args.mode} "
          f"context {args.context} chunk {args.chunk} impl {model.settings.impl}")
    print(f"per sequence: cache {cache_seq / 2**30:.3f} GiB, prefill_bytes {per_seq / 2**30:.3f} GiB, of which "
          f"the activation estimate {est / 2**30:.3f} GiB")
    print("| group | temporaries GiB | per sequence GiB | per sequence / estimate |")
    print("|---|---|---|---|")
    for g in args.groups:
        temp = prefill_temporaries(model, g, capacity, args.chunk)
        print(f"| {g} | {temp / 2**30:.3f} | {temp / g / 2**30:.3f} | {temp / g / est:.2f} |", flush=True)


if __name__ == "__main__":
    main()
