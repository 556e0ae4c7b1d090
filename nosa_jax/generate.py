"""Batched generation: prefill (one-shot or chunked) and a decode loop that runs on the device.

The model is split once (`nnx.split`); every hot function is a plain `jax.jit` of
`(graphdef, state, ...)` with the cache donated, so the decode loop runs all layers, sampling and
stop checks on the device with no host round trip per token (the flax NNX performance guide).
Streaming runs the same loop in chunks of steps and hands each chunk's tokens to the caller.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .cache import DEFAULT_PREFILL_CHUNK, KVCache, cache_bytes
from .model import NosaForCausalLM
from .offload import (OffloadedKV, OffloadError, fit_pool_slots, flush, flush_interval, init_offloaded,
                      offload_bytes, pinned_pool_limit_needed, pool_size, prefill_bytes, store_in_pinned_pool,
                      store_prefill)

PAD = -1  # token id written after a sequence has stopped

# XLA options for the prefill and decode programs (GPU options; other backends ignore them). The
# layers' weights are stacked [L, ...] and sliced per layer inside the scan over layers; by default
# XLA copies every layer's weights out of the stack before its GEMMs - each decode step re-copied
# the whole model (H200, 8B, batch 16: 7.5 of 16.2 ms per step). Dynamic-slice fusion lets cuBLAS
# read the slice in place (it does not apply to Triton GEMM fusions, hence the second option):
# 16.2 -> 9.1 ms per step (bench/profile_decode.py, bench/NOTES.md).
XLA_OPTIONS = {"xla_gpu_enable_dynamic_slice_fusion": True, "xla_gpu_enable_triton_gemm": False}
# Decode also turns off XLA's dot merger, which joins projections that share an input into one GEMM
# by concatenating their weight matrices anew every step. With q/k/v separate parameters that cost
# 0.72 of 8.99 ms per step (8B, batch 16); q/k/v are now one fused parameter, and the merger still
# does not win: 1B, 16K, merger on vs off: batch 16 4376 vs 4738 tok/s, batch 1 273.0 vs 272.8
# (bench/results/generate-s4-qkv-2026-11-28).
# It also turns off the padding of GEMM operands to multiples of 8 rows: at a batch like 27 (8B /
# 128K, the host-bound offloaded batch) XLA padded the activations before each projection, ~130
# extra kernels per step; without it cuBLAS takes the 27 rows as they are: 7.774 -> 7.585 ms per
# step (8B, batch 27, 16K, on the device; bench/results/profile-8b-b27-s10-nopad.log).
DECODE_XLA_OPTIONS = {**XLA_OPTIONS, "xla_disable_hlo_passes": "dot-merger,cublas-pad-for-gemms"}


class GenerationError(ValueError):
    """Bad generation input (empty prompt, ids outside the vocabulary, over capacity, no memory)."""


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Composable sampling: temperature 0 is greedy; otherwise logits / temperature, then keep the
    `top_k` best (0 = all), then the smallest set of tokens whose probability reaches `top_p`."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise GenerationError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")

    def __call__(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        """logits [B, V] float32 -> tokens [B] int32."""
        if self.temperature == 0:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        logits = logits / self.temperature
        if self.top_k:
            kth = jax.lax.top_k(logits, min(self.top_k, logits.shape[-1]))[0][..., -1:]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        if self.top_p < 1:
            order = jnp.argsort(-logits, axis=-1)
            sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
            probs = jax.nn.softmax(sorted_logits, axis=-1)
            mass_before = jnp.cumsum(probs, axis=-1) - probs
            keep_sorted = mass_before < self.top_p  # always keeps the best token
            keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
            logits = jnp.where(keep, logits, -jnp.inf)
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass
class DecodeState:
    """The decode loop's carry. tokens [B, N]; logits [B, N, V] or [B, 0, V]; last [B]; done [B];
    stats [N, L, 3] int32 with the offloaded cache (per step and layer: misses, selected blocks,
    blocks reused from the previous step, summed over sequences and kv heads), else None."""

    cache: KVCache | OffloadedKV
    tokens: jax.Array
    logits: jax.Array
    last: jax.Array
    done: jax.Array
    step: jax.Array
    key: jax.Array
    stats: jax.Array | None = None


jax.tree_util.register_dataclass(DecodeState, data_fields=[f.name for f in dataclasses.fields(DecodeState)],
                                 meta_fields=[])


@dataclasses.dataclass
class GenerationResult:
    """tokens: per sequence, the generated ids (stopping token included, nothing after it);
    logits: [B, N, V] float32 per step (with save_logits); timings in seconds."""

    tokens: list[list[int]]
    logits: np.ndarray | None
    prefill_seconds: float
    decode_seconds: float
    decode_tokens: int
    cache_bytes: int
    texts: list[str] | None = None  # decoded generations when a tokenizer was given
    offload_stats: dict | None = None  # with the offloaded cache: `offload_statistics` and the pool's slots

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else float("nan")


def available_memory_bytes(device=None) -> int | None:
    """Free memory of the device that will hold the cache (host RAM on CPU)."""
    device = device or jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _merge(graphdef, state):
    return nnx.merge(graphdef, state)


@partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",), compiler_options=XLA_OPTIONS)
def _prefill_chunk(graphdef, state, ids, start, n_valid, cache, last_logits):
    """One prefill chunk: ids [B, Tc] at positions start..; keeps the logits of each sequence's
    last prompt token when this chunk holds it."""
    model = _merge(graphdef, state)
    Tc = ids.shape[1]
    last_row = jnp.clip(n_valid - 1, 0, Tc - 1)
    out = model.extend(ids, start, n_valid, cache, rows=last_row[:, None])
    logits = model.logits(out.h[:, 0])
    return out.cache, jnp.where((n_valid > 0)[:, None], logits, last_logits)


def _advance(sampler: Sampler, eos_ids: tuple[int, ...], st: DecodeState, logits) -> DecodeState:
    """Sample from `logits`, record the token, mark stopped sequences."""
    key = jax.random.fold_in(st.key, st.step)
    tok = sampler(logits, key)
    tok = jnp.where(st.done, PAD, tok)
    tokens = st.tokens.at[:, st.step].set(tok)
    saved = st.logits.at[:, st.step].set(logits) if st.logits.shape[1] else st.logits
    done = st.done | jnp.isin(tok, jnp.asarray(eos_ids or (-2,), jnp.int32))
    done = done | (st.step + 1 >= st.tokens.shape[1])
    return dataclasses.replace(st, tokens=tokens, logits=saved, last=tok, done=done, step=st.step + 1)


_first_token = jax.jit(_advance, static_argnums=(0, 1), donate_argnums=(2,))


def _feed(model, st: DecodeState):
    """Run the model on each live sequence's last token; returns next logits and the state with the
    new cache (and, offloaded, this step's load statistics recorded)."""
    live = (~st.done).astype(jnp.int32)
    out = model.extend(jnp.maximum(st.last, 0)[:, None], st.cache.length, live, st.cache)
    st = dataclasses.replace(st, cache=out.cache)
    if st.stats is not None:
        c = out.cache
        row = jnp.stack([c.misses.sum((1, 2)), c.selected.sum((1, 2)), c.reused.sum((1, 2))], axis=-1)
        st = dataclasses.replace(st, stats=st.stats.at[st.step].set(row, mode="drop"))
    return model.logits(out.h[:, 0]), st


@partial(jax.jit, static_argnames=("graphdef", "sampler", "eos_ids"), donate_argnames=("st",),
         compiler_options=DECODE_XLA_OPTIONS)
def decode_step(graphdef, state, st: DecodeState, *, sampler: Sampler, eos_ids: tuple[int, ...]):
    """One decode step as its own jitted call (the Python-loop baseline of the benchmark)."""
    model = _merge(graphdef, state)
    logits, st = _feed(model, st)
    st = _flushed(model, st, 1)
    return _advance(sampler, eos_ids, st, logits), logits


def _flushed(model, st: DecodeState, steps: int) -> DecodeState:
    """With the offloaded cache: write the blocks touched in the last `steps` steps to the host."""
    if isinstance(st.cache, OffloadedKV):
        st = dataclasses.replace(st, cache=flush(st.cache, model.cfg.nosa, steps))
    return st


@partial(jax.jit, static_argnames=("graphdef", "sampler", "eos_ids", "n_steps"), donate_argnames=("st",),
         compiler_options=DECODE_XLA_OPTIONS)
def decode_loop(graphdef, state, st: DecodeState, logits, *, sampler: Sampler, eos_ids: tuple[int, ...],
                n_steps: int):
    """Exactly n_steps decode steps in one loop on the device.

    The trip count is static (`fori_loop`), so XLA runs the loop without reading a predicate back to
    the host every iteration; sequences that have stopped are carried along without growing (their
    token is PAD and their cache length stays). The parameters ride in the carry so the model is
    merged inside the loop's trace."""

    def body(_, carry):
        s, _, params = carry
        lg, s = _feed(_merge(graphdef, params), s)
        return _advance(sampler, eos_ids, s, lg), lg, params

    if not isinstance(st.cache, OffloadedKV):
        st, logits, _ = jax.lax.fori_loop(0, n_steps, body, (st, logits, state))
        return st, logits

    # offloaded cache: flush new blocks to the host every `flush_interval` steps and at the end
    # (static trip counts: the flushes need no data-dependent branch)
    model = _merge(graphdef, state)
    every = flush_interval(model.cfg.nosa)

    def chunk(_, carry):
        s, lg, params = jax.lax.fori_loop(0, every, body, carry)
        return _flushed(model, s, every), lg, params

    carry = jax.lax.fori_loop(0, n_steps // every, chunk, (st, logits, state))
    rest = n_steps % every
    st, logits, _ = jax.lax.fori_loop(0, rest, body, carry)
    return (_flushed(model, st, rest) if rest else st), logits


@dataclasses.dataclass(frozen=True)
class OffloadSettings:
    """The host-offloaded KV cache (`nosa_jax.offload`): K/V history in pinned host memory, a pool
    of `pool_slots` block slots per (layer, sequence, kv head) on the device (None: twice the
    top-k, so blocks that leave the selection stay resident; top-k is upstream's exact fit; "fit":
    the largest pool the device memory budget holds for the batch, up to every block of the
    capacity - at long contexts, where the batch is bound by host memory, the spare device memory
    then turns misses into hits: 8B / 128K / 27 sequences, 7.8 -> 0.55 misses per layer, head,
    sequence and step, 1.6x the tokens/s (bench/results/throughput-8b-s8-*)).
    `loader`: "auto" | "pallas" (zero-copy kernel) | "xla" (dynamic_slice + device_put).
    `host_memory_budget`: bytes of host memory the store may use (None: `host_memory_bytes()`,
    what is free now and, on the GPU, within the pinned pool).
    `prefill_group`: sequences prefilled on the device at a time before moving to the host
    (None: as many as the device memory budget allows)."""

    pool_slots: int | str | None = None
    loader: str = "auto"
    host_memory_budget: int | None = None
    prefill_group: int | None = None

    def __post_init__(self):
        if not (self.pool_slots is None or self.pool_slots == "fit"
                or (isinstance(self.pool_slots, int) and self.pool_slots > 0)):
            raise GenerationError(f"pool_slots must be a positive number of slots, None (2 x top-k) or 'fit', "
                                  f"not {self.pool_slots!r}")

    def slots(self, cfg, capacity: int, batch: int, budget: int | None, dtype, mode: str,
              prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> int:
        """The pool's slots for `batch` sequences of `capacity` tokens under a device memory
        `budget` (bytes; None: unknown, then "fit" means the default), prefilled in calls of
        `prefill_chunk` prompt tokens."""
        if self.pool_slots == "fit":
            if budget is None:
                return pool_size(cfg, capacity)
            return fit_pool_slots(cfg, batch, capacity, dtype, mode, budget, prefill_chunk)
        return pool_size(cfg, capacity, self.pool_slots)


# The GPU client allocates pinned host memory from a pool of this many GiB (XLA's default: 64),
# read once when the GPU backend starts: set it before that to hold a larger host store.
PINNED_HOST_LIMIT_ENV = "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"
# With this set to true the pool is one region of the whole limit (XLA's default then: 16 GiB) - but
# XLA then also preallocates a staging pool of the same size at the first transfer: measured on the
# H200, a 5 GiB limit pinned 10 GiB (bench/results/probe-host-peak-s7-*), so it is no way to save memory.
PINNED_HOST_PREALLOCATE_ENV = "XLA_PJRT_GPU_HOST_MEMORY_PREALLOCATE"


def pinned_host_limit_bytes() -> int | None:
    """The GPU client's pinned host memory pool (None off the GPU, where no such pool exists)."""
    if jax.devices()[0].platform != "gpu":
        return None
    default = "16" if pinned_pool_preallocated() else "64"
    try:
        return int(float(os.environ.get(PINNED_HOST_LIMIT_ENV, default)) * 2**30)
    except ValueError:
        return int(default) * 2**30


def pinned_pool_preallocated() -> bool:
    """Whether the process asked XLA for one preallocated pinned pool (PINNED_HOST_PREALLOCATE_ENV)."""
    return os.environ.get(PINNED_HOST_PREALLOCATE_ENV, "").strip().lower() in ("true", "1")


def host_memory_bytes() -> int | None:
    """The pinned store's default budget: free host RAM, and on the GPU at most the pinned pool."""
    pool = pinned_host_limit_bytes()
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        free = None
    limits = [x for x in (free, pool) if x is not None]
    return min(limits) if limits else None


class Generator:
    """A split model plus the settings of one generation run; the jitted functions above are shared
    by every Generator of the same model structure (their cache is keyed on the graph definition)."""

    def __init__(self, model: NosaForCausalLM, *, sampler: Sampler = Sampler(),
                 eos_ids: Sequence[int] | None = None, save_logits: bool = False,
                 offload: OffloadSettings | None = None):
        self.cfg = model.cfg
        self.model_dtype = model.dtype
        self.mode = model.mode
        self.graphdef, self.state = nnx.split(model)
        self.sampler = sampler
        self.eos_ids = tuple(int(e) for e in (self.cfg.eos_token_ids if eos_ids is None else eos_ids))
        self.save_logits = save_logits
        self.offload = offload

    # ---- host-side driver -----------------------------------------------------------------
    def validate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, capacity: int,
                 memory_budget: int | None, prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> int | None:
        """Check the prompts and the memory; with the offloaded cache, return how many sequences to
        prefill on the device at a time (calls of `prefill_chunk` prompt tokens)."""
        if not prompts:
            raise GenerationError("no prompts given")
        if max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        V = self.cfg.vocab_size
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise GenerationError(f"prompt {i} is empty; give at least one token")
            bad = [t for t in p if not 0 <= int(t) < V]
            if bad:
                raise GenerationError(f"prompt {i} has token ids outside the vocabulary [0, {V}): {bad[:5]}")
        need = max(len(p) for p in prompts) + max_new_tokens
        if need > capacity:
            raise GenerationError(
                f"prompt length {max(len(p) for p in prompts)} + max_new_tokens {max_new_tokens} = {need} "
                f"exceeds the capacity of {capacity} tokens per sequence; shorten the prompt, lower "
                f"max_new_tokens or raise the capacity (--capacity / max_position_embeddings)")
        budget = memory_budget if memory_budget is not None else available_memory_bytes()
        if self.offload is not None:
            return self._prefill_group(len(prompts), capacity, budget, prefill_chunk)  # raises when nothing fits
        nbytes = cache_bytes(self.cfg, len(prompts), capacity, self.model_dtype, self.mode)
        if budget is not None and nbytes > budget:
            raise GenerationError(
                f"the KV cache for batch {len(prompts)} x {capacity} tokens needs {nbytes / 2**30:.2f} GiB "
                f"but only {budget / 2**30:.2f} GiB is available; lower the batch size, the prompt "
                f"length or max_new_tokens (capacity), or use the offloaded cache")

    def _prefill_group(self, B: int, capacity: int, budget: int | None, chunk: int) -> int:
        """Check the offloaded run's device and host memory; return how many sequences to prefill
        on the device at a time."""
        S = self.offload.slots(self.cfg, capacity, B, budget, self.model_dtype, self.mode, chunk)
        try:
            dev, host = offload_bytes(self.cfg, B, capacity, self.model_dtype, self.mode, S)
        except OffloadError as e:
            raise GenerationError(str(e)) from e
        pool = pinned_host_limit_bytes()
        # host memory the store takes: more than its bytes in a growing pinned pool
        pinned = store_in_pinned_pool(host, pool, preallocated=pinned_pool_preallocated())
        if pinned is None:
            need = pinned_pool_limit_needed([host]) + 1  # + 1 GiB for the transfers' own pinned buffers
            raise GenerationError(
                f"the offloaded KV store for batch {B} x {capacity} tokens needs {host / 2**30:.2f} GiB of "
                f"pinned host memory but the GPU client's pinned pool is {pool / 2**30:.1f} GiB; start the "
                f"process with {PINNED_HOST_LIMIT_ENV}={need} (set before JAX starts the GPU backend; that "
                f"much host RAM must be free) or lower the batch size or the capacity")
        host_budget = self.offload.host_memory_budget
        host_budget = host_budget if host_budget is not None else host_memory_bytes()
        if host_budget is not None and pinned > host_budget:
            grown = "" if pinned == host else (
                f" (a {host / 2**30:.2f} GiB store in the power-of-two regions of XLA's growing pinned pool; a "
                f"lower {PINNED_HOST_LIMIT_ENV} caps the last region)")
            raise GenerationError(
                f"the offloaded KV store for batch {B} x {capacity} tokens needs {pinned / 2**30:.2f} GiB of "
                f"host memory{grown} but the budget is {host_budget / 2**30:.2f} GiB; lower the batch size or "
                f"the capacity (prompt length + max_new_tokens)")
        per_seq = prefill_bytes(self.cfg, capacity, self.model_dtype, self.mode, chunk)
        if budget is not None and dev + per_seq > budget:
            raise GenerationError(
                f"the offloaded cache needs {dev / 2**30:.2f} GiB on the device (pools of {S} slots, "
                f"compressed keys, scores) plus {per_seq / 2**30:.2f} GiB to prefill one sequence, but only "
                f"{budget / 2**30:.2f} GiB is available; lower the batch size, pool_slots or the capacity")
        fits = None if budget is None else int((budget - dev) // per_seq)  # prefills beside the pool
        group = self.offload.prefill_group
        if group is None:
            group = B if fits is None else fits
        group = max(1, min(B, group))
        if fits is not None and group > fits:
            # the prefill caches of a group live beside the pool until moved to the host: at 8B /
            # 128K a fit pool with a group of 4 (16 GiB) ran out of memory (bench/NOTES.md, session 10)
            raise GenerationError(
                f"prefill_group={group} needs {group * per_seq / 2**30:.2f} GiB on the device to prefill "
                f"{group} sequences at once beside the offloaded cache's {dev / 2**30:.2f} GiB (pools of {S} "
                f"slots), but only {budget / 2**30:.2f} GiB is available; lower prefill_group (at most "
                f"{fits} here) or leave it None to choose by memory")
        return group

    def start(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, capacity: int | None = None,
              prefill_chunk: int | None = None, seed: int = 0,
              memory_budget: int | None = None) -> tuple[DecodeState, jax.Array, float]:
        """Validate, allocate, prefill (prefill_chunk prompt tokens per call, None:
        DEFAULT_PREFILL_CHUNK). Returns (decode state, first logits, prefill seconds)."""
        if not prompts:
            raise GenerationError("no prompts given")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise GenerationError(f"prefill_chunk must be a positive number of tokens (or None: "
                                  f"{DEFAULT_PREFILL_CHUNK}), got {prefill_chunk}")
        capacity = capacity or (max(len(p) for p in prompts) + max_new_tokens)
        budget = memory_budget if memory_budget is not None else available_memory_bytes()
        lengths = np.array([len(p) for p in prompts], np.int32)
        Tp = int(lengths.max())
        chunk = min(prefill_chunk or DEFAULT_PREFILL_CHUNK, Tp)
        group = self.validate(prompts, max_new_tokens, capacity, budget, chunk)
        B = len(prompts)
        n_chunks = -(-Tp // chunk)
        ids = np.zeros((B, n_chunks * chunk), np.int32)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = p
        t0 = time.perf_counter()
        rope_len = lengths + max_new_tokens
        if self.offload is None:
            cache, logits = self._prefill(ids, lengths, capacity, rope_len, chunk)
        else:
            S = self.offload.slots(self.cfg, capacity, B, budget, self.model_dtype, self.mode, chunk)
            cache = init_offloaded(self.cfg, B, capacity, self.model_dtype, self.mode, S, rope_len=rope_len,
                                   loader=self.offload.loader)
            parts = []
            for b0 in range(0, B, group):
                sl = slice(b0, min(B, b0 + group))
                dev, lg = self._prefill(ids[sl], lengths[sl], capacity, rope_len[sl], chunk)
                cache = store_prefill(cache, dev, b0, n=self.cfg.nosa)
                parts.append(lg)
                del dev
            logits = jnp.concatenate(parts)
        jax.block_until_ready(logits)
        prefill_s = time.perf_counter() - t0
        V = self.cfg.vocab_size
        st = DecodeState(
            cache=cache,
            tokens=jnp.full((B, max_new_tokens), PAD, jnp.int32),
            logits=jnp.zeros((B, max_new_tokens if self.save_logits else 0, V), jnp.float32),
            last=jnp.zeros((B,), jnp.int32),
            done=jnp.zeros((B,), bool),
            step=jnp.zeros((), jnp.int32),
            key=jax.random.key(seed),
            stats=(jnp.zeros((max_new_tokens, self.cfg.num_hidden_layers, 3), jnp.int32)
                   if self.offload is not None else None),
        )
        # the first token comes from the prefill logits
        st = _first_token(self.sampler, self.eos_ids, st, logits)
        # committed (each where it lives) like the decode loop's own outputs, so that its first call
        # and later ones share one compilation
        st, logits = jax.tree.map(lambda x: jax.device_put(x, x.sharding), (st, logits))
        return st, logits, prefill_s

    def _prefill(self, ids, lengths, capacity: int, rope_len, chunk: int):
        """Prefill prompts ids [B, n_chunks * chunk] into a fresh device cache; returns the cache and
        each sequence's last-token logits."""
        model = nnx.merge(self.graphdef, self.state)
        B = ids.shape[0]
        cache = model.init_cache(B, capacity, rope_len=rope_len)
        logits = jnp.zeros((B, self.cfg.vocab_size), jnp.float32)
        for c in range(ids.shape[1] // chunk):
            start = np.minimum(c * chunk, lengths)
            n_valid = np.clip(lengths - c * chunk, 0, chunk)
            cache, logits = _prefill_chunk(self.graphdef, self.state, jnp.asarray(ids[:, c * chunk:(c + 1) * chunk]),
                                           jnp.asarray(start, jnp.int32), jnp.asarray(n_valid, jnp.int32),
                                           cache, logits)
        return cache, logits

    def stream(self, st: DecodeState, logits: jax.Array, chunk_steps: int) -> Iterator[tuple[DecodeState, jax.Array]]:
        """Run the jitted loop `chunk_steps` steps at a time (fewer for the last chunk), yielding after
        each chunk; stops once every sequence is done (one host read per chunk)."""
        step, total = int(st.step), st.tokens.shape[1]
        while step < total and not bool(jnp.all(st.done)):
            n = min(chunk_steps, total - step)
            st, logits = decode_loop(self.graphdef, self.state, st, logits, sampler=self.sampler,
                                     eos_ids=self.eos_ids, n_steps=n)
            step += n
            yield st, logits


def offload_statistics(stats: np.ndarray, cfg, dtype, mode: str, batch: int) -> dict:
    """Load statistics of an offloaded run from DecodeState.stats rows [steps, L, (misses, selected,
    reused)] (summed over sequences and kv heads): per step and layer the misses, loaded bytes, hit
    rate and locality gamma (share of the selected blocks that the previous step selected too), and
    their means over the steps after the first (whose pool starts empty and has no previous
    selection)."""
    n = cfg.nosa
    per_block = 2 * n.block_size * cfg.head_dim * jnp.dtype(dtype).itemsize + (4 * n.block_size if mode == "nosa" else 0)
    misses, selected, reused = (stats[..., i].astype(np.float64) for i in range(3))
    with np.errstate(invalid="ignore", divide="ignore"):
        hit_rate = 1.0 - misses / selected
        gamma = reused / selected
    later = slice(1, None)

    def mean(x):
        return float(np.nanmean(x[later])) if x.shape[0] > 1 else float("nan")

    return {
        "misses": misses, "selected": selected, "reused": reused, "bytes": misses * per_block,
        "hit_rate": hit_rate, "gamma": gamma,
        "misses_per_layer_head_seq": mean(misses / (batch * cfg.num_key_value_heads)),
        "hit_rate_mean": mean(hit_rate), "gamma_mean": mean(gamma),
        "bytes_per_step": mean(misses.sum(axis=1, keepdims=True) * per_block),
    }


def generate(model: NosaForCausalLM, prompts: Sequence[Sequence[int] | str], *, max_new_tokens: int = 32,
             sampler: Sampler = Sampler(), seed: int = 0, eos_ids: Sequence[int] | None = None,
             capacity: int | None = None, prefill_chunk: int | None = None, save_logits: bool = False,
             chunk_steps: int | None = None, on_tokens=None,
             memory_budget: int | None = None, tokenizer=None, kv_offload: bool | OffloadSettings = False,
             pool_slots: int | str | None = None) -> GenerationResult:
    """Generate up to `max_new_tokens` for each prompt (lists of token ids, any lengths).

    The decode loop is one jitted device loop (`lax.fori_loop`, an XLA while loop with a static trip
    count) over all layers, sampling and stop checks; with `chunk_steps` it returns to the host every
    that many steps and calls `on_tokens(tokens_so_far [B, N] np.ndarray, step)` (streaming).
    Stops per sequence at an EOS id (config's by default) or after max_new_tokens. With a
    `tokenizers.Tokenizer`, prompts may be strings and the result carries decoded `texts`.
    `kv_offload=True` (or an `OffloadSettings`) keeps the KV history in pinned host memory and
    loads each step's missing blocks into a device pool of `pool_slots` slots (`nosa_jax.offload`;
    "fit": as many as the memory budget holds, see OffloadSettings); the result then carries
    `offload_stats`.
    """
    offload = None
    if kv_offload:
        offload = kv_offload if isinstance(kv_offload, OffloadSettings) else OffloadSettings()
        if pool_slots is not None:
            offload = dataclasses.replace(offload, pool_slots=pool_slots)
    if any(isinstance(p, str) for p in prompts):
        if tokenizer is None:
            raise GenerationError("text prompts need a tokenizer (tokenizer=tokenizers.Tokenizer...)")
        prompts = [tokenizer.encode(p).ids if isinstance(p, str) else p for p in prompts]
    gen = Generator(model, sampler=sampler, eos_ids=eos_ids, save_logits=save_logits, offload=offload)
    st, logits, prefill_s = gen.start(prompts, max_new_tokens=max_new_tokens, capacity=capacity,
                                      prefill_chunk=prefill_chunk, seed=seed, memory_budget=memory_budget)
    t0 = time.perf_counter()
    first_step = int(st.step)
    for st, logits in gen.stream(st, logits, chunk_steps or max_new_tokens):
        if on_tokens is not None:
            on_tokens(np.asarray(st.tokens), int(st.step))
    tokens = np.asarray(st.tokens)
    decode_s = time.perf_counter() - t0
    out = []
    for row in tokens:
        row = row.tolist()
        out.append(row[: row.index(PAD)] if PAD in row else row)
    n_decoded = sum(max(0, len(r) - first_step) for r in out)
    cap = capacity or (max(len(p) for p in prompts) + max_new_tokens)
    if offload is not None:
        nbytes = sum(offload_bytes(model.cfg, len(prompts), cap, model.dtype, model.mode, st.cache.table.shape[-1]))
    else:
        nbytes = cache_bytes(model.cfg, len(prompts), cap, model.dtype, model.mode)
    return GenerationResult(
        tokens=out,
        logits=np.asarray(st.logits) if save_logits else None,
        prefill_seconds=prefill_s,
        decode_seconds=decode_s,
        decode_tokens=n_decoded,
        cache_bytes=nbytes,
        offload_stats=(offload_statistics(np.asarray(st.stats)[first_step:], model.cfg, model.dtype, model.mode,
                                              len(prompts)) | {"pool_slots": int(st.cache.table.shape[-1])}
                       if offload is not None else None),
        texts=[tokenizer.decode(t, skip_special_tokens=True) for t in out] if tokenizer is not None else None,
    )
