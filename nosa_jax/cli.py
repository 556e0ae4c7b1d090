"""`nosa-jax` command line: convert, score, generate, plan, demo, bench."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from .config import ATTENTION_MODES


def _quiet_jax():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


# ---------------------------------------------------------------------------------------- convert
def cmd_convert(args) -> int:
    from convert import convert_checkpoint

    out = convert_checkpoint(args.hf_dir, args.out_dir, dtype=args.dtype, overwrite=args.overwrite,
                             progress=not args.no_progress)
    print(f"converted {args.hf_dir} -> {out}")
    return 0


# ------------------------------------------------------------------------------------------ score
def _load_ids(path: str, what: str) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{what} file not found: {p}")
    try:
        a = np.load(p, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - numpy raises several types for bad files
        raise ValueError(f"{what} file {p} is not a readable .npy array ({e})") from e
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{what} must hold integers, got dtype {a.dtype} in {p}")
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.shape[1] == 0:
        raise ValueError(f"{what} must have shape [T] or [B, T] with T >= 1, got {a.shape} in {p}")
    return a


def score(model, ids: np.ndarray, mask: np.ndarray | None, positions: np.ndarray | None):
    """Teacher-forced forward; returns a dict of numpy arrays (see `nosa-jax score --help`)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, ids, mask, positions):
        return nnx.merge(graphdef, state)(ids, mask, positions, return_nll=True)

    B, T = ids.shape
    mask = np.ones((B, T), np.int32) if mask is None else mask
    positions = np.broadcast_to(np.arange(T), (B, T)) if positions is None else positions
    out = run(state, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32), jnp.asarray(positions, jnp.int32))
    res = {"logits": np.asarray(out.logits, np.float32), "cis": np.asarray(out.cis, np.float32),
           "nll": np.asarray(out.nll, np.float32), "positions": np.asarray(positions, np.int64)}
    if model.mode != "full":
        res["selected_blocks"] = np.asarray(out.block_ids, np.int32)
    return res


def cmd_score(args) -> int:
    from .checkpoint import load_model

    ids = _load_ids(args.input_ids, "--input-ids")
    B, T = ids.shape
    mask = None
    if args.attention_mask:
        mask = _load_ids(args.attention_mask, "--attention-mask")
        if mask.shape != ids.shape:
            raise ValueError(f"--attention-mask shape {mask.shape} differs from --input-ids shape {ids.shape}")
        if not np.isin(mask, (0, 1)).all() or (mask.sum(1) == 0).any():
            raise ValueError("--attention-mask must hold 0/1 with at least one 1 per row")
    positions = None
    if args.positions:
        positions = _load_ids(args.positions, "--positions")
        if positions.shape[0] == 1 and B > 1:
            positions = np.repeat(positions, B, axis=0)
        if positions.shape[0] != B:
            raise ValueError(f"--positions has {positions.shape[0]} rows for a batch of {B}")
        if positions.min() < 0 or positions.max() >= T:
            raise ValueError(f"--positions must lie in [0, {T}), got [{positions.min()}, {positions.max()}]")
        if mask is not None and not np.take_along_axis(mask, positions, 1).all():
            raise ValueError("--positions points at padding (attention mask 0)")
    model = load_model(args.checkpoint, mode=args.mode, dtype=args.dtype, q_chunk=args.q_chunk, impl=args.impl)
    V = model.cfg.vocab_size
    if ids.min() < 0 or ids.max() >= V:
        raise ValueError(f"--input-ids holds ids outside the vocabulary [0, {V}): "
                         f"min {ids.min()}, max {ids.max()}")
    t0 = time.perf_counter()
    res = score(model, ids, mask, positions)
    dt = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez(tmp, **res)
    tmp.replace(out)
    nll = res["nll"]
    print(f"scored {B} x {T} tokens in {dt:.2f} s (mode {args.mode}, {model.dtype}); wrote {out}")
    for b in range(B):
        v = nll[b][np.isfinite(nll[b])]
        if v.size:
            print(f"  sequence {b}: {v.size} predicted tokens, mean NLL {v.mean():.4f} nats/token, "
                  f"perplexity {np.exp(v.mean()):.3f}")
        if args.print_tokens:
            print("    per-token NLL: " + " ".join(f"{x:.3f}" for x in v))
    return 0


# --------------------------------------------------------------------------------------- generate
def _tokenizer(checkpoint: str):
    from .checkpoint import tokenizer_path

    path = tokenizer_path(checkpoint)
    if path is None:
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def run_generate(model, tok, prompts_ids, args, out_path=None) -> dict:
    from .generate import OffloadSettings, Sampler, generate

    offload = False
    if getattr(args, "offload", False):
        offload = OffloadSettings(pool_slots=args.pool_slots, loader=args.loader,
                                  host_memory_budget=_gib(args.host_memory_gb))
    sampler = Sampler(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    progress = None
    if not args.no_progress and args.max_new_tokens > args.stream_chunk:
        from tqdm import tqdm

        progress = tqdm(total=args.max_new_tokens, unit="tok", desc="decode", leave=False)

    def on_tokens(tokens, step):
        if progress is not None:
            progress.n = step
            progress.refresh()

    res = generate(model, prompts_ids, max_new_tokens=args.max_new_tokens, sampler=sampler, seed=args.seed,
                   capacity=args.capacity, prefill_chunk=args.prefill_chunk, save_logits=args.save_logits,
                   chunk_steps=args.stream_chunk, on_tokens=on_tokens, kv_offload=offload,
                   memory_budget=_gib(getattr(args, "gpu_memory_gb", None)))
    if progress is not None:
        progress.close()
    for i, toks in enumerate(res.tokens):
        head = f"--- sequence {i} ({len(prompts_ids[i])} prompt tokens, {len(toks)} generated)"
        print(head)
        if tok is not None:
            prompt = tok.decode(prompts_ids[i], skip_special_tokens=True)
            print(("..." + prompt[-300:]) if len(prompt) > 300 else prompt, end="")
            print(" >>> " + tok.decode(toks, skip_special_tokens=True))
        else:
            print("generated ids:", " ".join(map(str, toks)))
    print(f"prefill {res.prefill_seconds:.3f} s | decode {res.decode_tokens} tokens in {res.decode_seconds:.3f} s "
          f"({res.decode_tokens_per_second:.1f} tok/s, includes compilation on first use) | "
          f"KV cache {res.cache_bytes / 2**20:.1f} MiB")
    if res.offload_stats is not None:
        from pallas_kernels.kv_loader import loader_path

        st = res.offload_stats
        print(f"offloaded KV ({loader_path(args.loader)} loader, {st['pool_slots']} slots): "
              f"{st['misses_per_layer_head_seq']:.2f} misses per (layer, kv head, sequence, step), "
              f"hit rate {st['hit_rate_mean']:.3f}, locality gamma {st['gamma_mean']:.3f}, "
              f"{st['bytes_per_step'] / 2**20:.2f} MiB loaded per step (after the first)")
    if out_path:
        n = max(len(t) for t in res.tokens)
        ids = np.full((len(res.tokens), n), -1, np.int64)
        for i, t in enumerate(res.tokens):
            ids[i, : len(t)] = t
        arrays = {"generated_ids": ids, "lengths": np.array([len(t) for t in res.tokens])}
        if res.logits is not None:
            arrays["logits"] = res.logits
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        np.savez(out_path, **arrays)
        print(f"wrote {out_path}")
    return {"result": res}


def _gib(x):
    return None if x is None else int(float(x) * 2**30)


def cmd_generate(args) -> int:
    from .checkpoint import load_model

    if bool(args.prompt) == bool(args.input_ids):
        raise ValueError("give exactly one of --prompt TEXT (repeatable) or --input-ids IDS.npy")
    tok = _tokenizer(args.checkpoint)
    if args.prompt:
        if tok is None:
            raise ValueError(f"{args.checkpoint} has no tokenizer.json; pass --input-ids IDS.npy instead of --prompt")
        prompts = [tok.encode(p).ids for p in args.prompt]
    else:
        a = _load_ids(args.input_ids, "--input-ids")
        prompts = [row.tolist() for row in a]
    model = load_model(args.checkpoint, mode=args.mode, dtype=args.dtype, q_chunk=args.q_chunk, impl=args.impl)
    run_generate(model, tok, prompts, args, args.out)
    return 0


# ------------------------------------------------------------------------------------------- plan
def cmd_plan(args) -> int:
    import jax.numpy as jnp

    from .checkpoint import load_config
    from .generate import available_memory_bytes, host_memory_bytes, pinned_host_limit_bytes
    from .offload import capacity_plan, fit_pool_slots, num_selected, offload_bytes

    cfg = load_config(args.checkpoint)
    dtype = jnp.dtype(args.dtype or "bfloat16")
    gpu = _gib(args.gpu_memory_gb) or available_memory_bytes()
    host = _gib(args.host_memory_gb) or host_memory_bytes()
    fit = args.pool_slots == "fit"  # the largest batch is a top-k pool's; the pool then takes what is left
    plan = capacity_plan(cfg, dtype, context=args.context, gpu_budget=gpu, host_budget=host, mode=args.mode,
                         pool_slots=num_selected(cfg, args.context) if fit else args.pool_slots, batch=args.batch,
                         pinned_pool=pinned_host_limit_bytes())
    if fit and (args.batch or plan["offloaded"]["max_batch"]):
        b = args.batch or plan["offloaded"]["max_batch"]
        S = fit_pool_slots(cfg, b, args.context, dtype, args.mode, gpu - plan["weights_bytes"])
        plan["offloaded"] |= {"fit_pool_batch": b, "fit_pool_slots": S,
                              "fit_device_bytes_per_seq": offload_bytes(cfg, 1, args.context, dtype, args.mode, S)[0]}
    print(f"{args.checkpoint}: weights {plan['weights_bytes'] / 2**30:.2f} GiB ({dtype.name}); budgets: device "
          f"{gpu / 2**30:.1f} GiB, host {host / 2**30:.1f} GiB; context {args.context} tokens")
    for kind in ("dense", "sparse_on_device", "offloaded"):
        k = plan[kind]
        line = (f"  {kind:17s} max batch {k['max_batch']:6d} | per sequence: device {k['device_bytes_per_seq'] / 2**20:9.1f} MiB"
                f", host {k['host_bytes_per_seq'] / 2**20:9.1f} MiB")
        if args.batch:
            line += f" | max context at batch {args.batch}: {k['max_context_at_batch']}"
        print(line)
    if "fit_pool_slots" in plan["offloaded"]:
        k = plan["offloaded"]
        print(f"  fit pool at batch {k['fit_pool_batch']}: {k['fit_pool_slots']} slots per (layer, sequence, kv head) "
              f"({k['fit_pool_slots'] / num_selected(cfg, args.context):.2f}x top-k), device "
              f"{k['fit_device_bytes_per_seq'] / 2**20:.1f} MiB per sequence")
    if args.json:
        Path(args.json).write_text(json.dumps(plan, indent=1))
    return 0


# ------------------------------------------------------------------------------------------- demo
def cmd_demo(args) -> int:
    from convert import convert_checkpoint

    from .checkpoint import load_model
    from .demo import demo_text, make_demo_checkpoint

    work = Path(args.workdir)
    hf_dir = make_demo_checkpoint(work / "hf", retrain=args.retrain)
    conv = work / "converted"
    print(f"converting {hf_dir} -> {conv}")
    convert_checkpoint(hf_dir, conv, overwrite=True, progress=False)
    tok = _tokenizer(str(conv))
    text = demo_text()
    cut = args.prompt_chars
    prompt_ids = tok.encode(text[:cut]).ids
    truth = tok.encode(text[cut:]).ids[: args.max_new_tokens]
    for mode in args.modes:
        model = load_model(conv, mode=mode)
        print(f"\n=== mode {mode}: {len(prompt_ids)}-token prompt from the built-in text, "
              f"{args.max_new_tokens} new tokens (greedy)")
        res = run_generate(model, tok, [prompt_ids], args)["result"]
        got = res.tokens[0]
        same = sum(int(a == b) for a, b in zip(got, truth))
        print(f"matches the true continuation at {same}/{len(truth)} positions")
    return 0


# ------------------------------------------------------------------------------------------- main
def _common(p, *, checkpoint=True):
    if checkpoint:
        p.add_argument("--checkpoint", required=True, help="converted nosa-jax dir or HF checkpoint dir")
    p.add_argument("--mode", choices=ATTENTION_MODES, default="nosa", help="attention mode (default nosa)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="compute dtype (default: the checkpoint's)")
    p.add_argument("--q-chunk", type=int, default=None,
                   help="queries per selection / attention call in prefill (memory bound; default: 256 for "
                        "--impl reference, 2048 for the Pallas kernels)")
    p.add_argument("--impl", choices=["auto", "reference", "pallas"], default="auto",
                   help="attention implementation: Pallas GPU kernels or the jnp reference (auto: kernels on a GPU)")


def _gen_args(p):
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--capacity", type=int, default=None, help="tokens per sequence (default prompt + new)")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="prompt tokens per prefill call (default 4096: bounds the prefill's activations)")
    p.add_argument("--stream-chunk", type=int, default=64,
                   help="decode steps per jitted call between progress updates")
    p.add_argument("--save-logits", action="store_true", help="with --out: also save each step's logits")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--gpu-memory-gb", type=float, default=None,
                   help="device memory budget for the KV state (default: what is free; set to emulate a smaller GPU)")


def _pool_slots(text: str) -> int | str:
    if text == "fit":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of slots or 'fit', got {text!r}") from None


def _offload_args(p):
    p.add_argument("--pool-slots", type=_pool_slots, default=None,
                   help='device block slots per (layer, sequence, kv head) (default 2 x top-k; top-k = exact fit; '
                        '"fit": as many as the device memory budget holds for the batch)')
    p.add_argument("--host-memory-gb", type=float, default=None, help="host memory budget (default: what is free)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nosa-jax", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a HF/PyTorch checkpoint to a nosa-jax (orbax) directory")
    p.add_argument("hf_dir")
    p.add_argument("out_dir")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("score", help="teacher-forced logits, selected blocks, cis and NLL over token ids")
    _common(p)
    p.add_argument("--input-ids", required=True, help=".npy of int ids, shape [T] or [B, T]")
    p.add_argument("--attention-mask", default=None, help=".npy of 0/1, same shape (padding = 0)")
    p.add_argument("--positions", default=None, help=".npy [P] or [B, P]: rows to write (default all)")
    p.add_argument("--out", required=True, help="output .npz: logits [B,P,V], selected_blocks "
                   "[B,layers,kv_heads,P,K], cis [B,layers,P,kv_heads], nll [B,T]")
    p.add_argument("--print-tokens", action="store_true", help="print every token's NLL")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("generate", help="generate text (or ids) from a checkpoint")
    _common(p)
    p.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    p.add_argument("--input-ids", default=None, help=".npy of prompt ids [T] or [B, T]")
    p.add_argument("--out", default=None, help="save generated ids (and logits) to this .npz")
    _gen_args(p)
    p.add_argument("--offload", action="store_true",
                   help="keep the KV history in pinned host memory; load each step's missing blocks into a device pool")
    _offload_args(p)
    p.add_argument("--loader", choices=["auto", "pallas", "xla"], default="auto",
                   help="host->device block loader with --offload (auto: zero-copy Pallas kernel on a GPU)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("plan", help="largest batch / context for dense, on-device sparse and offloaded runs")
    p.add_argument("--checkpoint", required=True, help="converted nosa-jax dir or HF checkpoint dir (config only)")
    p.add_argument("--mode", choices=["nosa", "infllmv2"], default="nosa")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--context", type=int, required=True, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=None, help="also report the largest context at this batch")
    p.add_argument("--gpu-memory-gb", type=float, default=None, help="device budget (default: what is free)")
    _offload_args(p)
    p.add_argument("--json", default=None, help="write the plan to this file")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("demo", help="build the built-in small NOSA checkpoint, convert it and generate")
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--retrain", action="store_true",
                   help="train the demo model again instead of using the shipped one (minutes on a CPU)")
    p.add_argument("--prompt-chars", type=int, default=300, help="characters of the built-in text used as prompt")
    p.add_argument("--modes", nargs="+", choices=ATTENTION_MODES, default=["nosa", "full"])
    _gen_args(p)
    p.set_defaults(func=cmd_demo, max_new_tokens=180, capacity=None)

    sub.add_parser("bench", add_help=False, help="decode throughput table (bench/throughput.py; nosa-jax bench --help)")
    return ap


def main(argv=None) -> int:
    _quiet_jax()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # front door of bench/throughput.py (its own options; needs the repo checkout)
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from bench.throughput import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # our errors are ValueErrors with a fix in them
        return _fail(str(e))


if __name__ == "__main__":
    sys.exit(main())
