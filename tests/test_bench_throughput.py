"""bench/throughput.py end to end on the CPU with the tiny test model, and its roofline arithmetic
against a hand computation."""

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import throughput as tp  # noqa: E402
from nosa_jax.config import ModelConfig  # noqa: E402

KEYS = {"name", "settings", "metric", "value", "unit", "device", "jax_version", "date"}


def test_roofline_8b_by_hand():
    """NOSA-8B shape, bf16: NOSA at 16K (batch 16, 1 MiB over PCIe per step), FullAttn at 32K."""
    cfg = ModelConfig(**tp.MODELS["8b"])
    V, H, I, L, Hq, Hk, D = 73448, 4096, 16384, 32, 32, 2, 128
    per_layer = H * Hq * D + 2 * H * Hk * D + Hq * D * H + 3 * H * I + 2 * H + Hk + Hk * D * Hk  # + eviction head A, delta
    weights = 2 * (L * per_layer + H + H * V)  # bf16; final norm and lm_head; the input embedding is not read whole
    # NOSA, 16K: 64 blocks x 64 tokens of K and V per layer and sequence; windows of 32 at stride 16
    kv = 16 * L * 64 * 64 * 2 * Hk * D * 2
    windows = (16384 - 32) // 16 + 1
    ck = 16 * L * windows * Hk * (D * 2 + 4)
    pcie = 2**20
    r = tp.roofline(cfg, tp.DTYPE, "nosa", 16384, 16, pcie)
    assert r["weights_bytes"] == weights
    assert r["kv_bytes"] == kv and r["compressed_bytes"] == ck
    assert r["floor_s"] == pytest.approx((weights + kv + ck) / 4.3e12 + pcie / 53e9, rel=1e-12)
    assert r["floor_overlap_s"] == pytest.approx(max((weights + kv + ck) / 4.3e12, pcie / 53e9), rel=1e-12)
    # 3.77 ms of weights + 0.25 ms of selected KV + 0.06 ms of compressed keys + 0.02 ms of PCIe
    assert 4.1e-3 < r["floor_s"] < 4.4e-3
    # InfLLMv2 reads no window scores; FullAttn reads the whole context and no compressed keys
    assert tp.roofline(cfg, tp.DTYPE, "infllmv2", 16384, 16)["compressed_bytes"] == 16 * L * windows * Hk * D * 2
    f = tp.roofline(cfg, tp.DTYPE, "full", 32768, 4)
    assert f["kv_bytes"] == 4 * L * 32768 * 2 * Hk * D * 2 and f["compressed_bytes"] == 0 and f["pcie_s"] == 0


def test_tiny_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))  # bench.common.save also writes here
    argv = ["--models", "tiny", "--contexts", "256", "--modes", "full", "nosa", "nosa-offload", "--pools", "1",
            "--budgets-gb", "0.002", "--host-gb", "0.0002", "--headroom-gb", "0", "--steps", "4", "--repeats", "2",
            "--distinct", "2", "--prefill-chunk", "128", "--tag", "pytest"]
    assert tp.main(argv + ["--batches", "2"]) == 0
    jsons = sorted(tmp_path.glob("throughput-tiny-pytest-*.json"))
    assert len(jsons) == 1
    records = json.loads(jsons[0].read_text())
    assert records and all(set(r) == KEYS and isinstance(r["value"], float) for r in records)
    assert not [r for r in records if r["metric"] == "failed"]
    runs, plans, _ = tp.collect(records)
    assert set(runs) == {("tiny", m, p, 256, 2) for m, p in (("full", "-"), ("nosa", "-"), ("nosa-offload", "top-k"))}
    for (_, method, _, ctx, batch), v in runs.items():
        assert v["throughput"] > 0 and v["throughput"] == pytest.approx(batch / (v["step_time"] / 1e3))
        assert v["measured_over_floor"] == pytest.approx(v["step_time"] / v["floor_time"])
        for k in ("split_selection", "split_loads", "split_attention", "split_rest", "device_bytes_per_seq",
                  "host_bytes_per_seq", "floor_pcie_time"):
            assert k in v
        if method == "nosa-offload":
            assert 0 <= v["gamma"] <= 1 and v["misses_per_layer_head_seq_step"] >= 0 and v["host_bytes_per_seq"] > 0
            # the floor's PCIe part is the measured miss bytes at 53 GB/s; the host floor takes them
            # at the in-place read rate measured on this host, recorded with the run
            assert v["floor_pcie_time"] == pytest.approx(v["pcie_bytes_per_step"] / 53e9 * 1e3)
            rate = next(r["settings"]["host_read_gbps"] for r in records
                        if r["name"] == "throughput/decode" and r["settings"]["method"] == method)
            assert rate["in_place"] > 0 and rate["bulk"] > 0
            hbm_ms = v["floor_time"] - v["floor_pcie_time"]
            assert v["floor_time_host"] == pytest.approx(hbm_ms + v["pcie_bytes_per_step"] / (rate["in_place"] * 1e9) * 1e3)
            assert v["measured_over_floor_host"] == pytest.approx(v["step_time"] / v["floor_time_host"])
        else:
            assert v["host_bytes_per_seq"] == 0 and v["floor_pcie_time"] == 0 and "floor_time_host" not in v
    assert {k[1] for k in plans} == {"full", "nosa", "nosa-offload"}
    md = next(tmp_path.glob("throughput-tiny-pytest-*.md")).read_text()
    for heading in ("## All runs", "## Equivalent batch", "## Same batch", "## Paper anchors and issue targets"):
        assert heading in md
    assert len(list(tmp_path.glob("throughput-tiny-pytest-*.png"))) == 2
    # the report mode rebuilds the tables from the saved records
    assert tp.main(["--report", str(jsons[0]), "--out-dir", str(tmp_path / "report"), "--no-plots"]) == 0
    assert "## Equivalent batch" in next((tmp_path / "report").glob("throughput-report-*.md")).read_text()


def test_offloaded_run_without_host_rates(tmp_path, monkeypatch):
    """The host's read rates are measured once, before the runs; if that fails the offloaded run is
    still measured and recorded, without the host floor."""
    def fail():
        raise RuntimeError("no pinned memory")

    monkeypatch.setattr(tp, "host_read_rates", fail)
    monkeypatch.setenv("OUT", str(tmp_path))
    argv = ["--models", "tiny", "--contexts", "256", "--modes", "nosa-offload", "--pools", "1", "--budgets-gb",
            "0.002", "--host-gb", "0.0002", "--headroom-gb", "0", "--steps", "4", "--repeats", "1", "--distinct", "1",
            "--prefill-chunk", "128", "--batches", "1", "--no-profile", "--no-plots", "--tag", "norates"]
    assert tp.main(argv) == 0
    records = json.loads(next(tmp_path.glob("throughput-tiny-norates-*.json")).read_text())
    runs, _, _ = tp.collect(records)
    (v,) = runs.values()
    assert v["throughput"] > 0 and "floor_time_host" not in v
    assert all(r["settings"].get("host_read_gbps") is None for r in records if r["name"] == "throughput/decode")


def test_fit_pool_keeps_the_host_bound_batch():
    """A "fit" pool is the largest pool at which the offloaded batch is still the top-k pool's: one
    slot more loses a sequence (or the pool already holds every block of the context)."""
    from nosa_jax.offload import capacity_plan, num_selected

    cfg = ModelConfig(**tp.MODELS["8b"])
    budget, host, headroom = 80 * tp.GiB, 113 * tp.GiB, 2 * tp.GiB
    for ctx in (16384, 131072):
        entries = tp.make_plan(cfg, ["nosa-offload"], [ctx], [1, "fit"], {"80 GiB": budget}, host, headroom, ["max"])
        top_k, fit = entries
        K, blocks = num_selected(cfg, ctx), ctx // cfg.nosa.block_size

        def max_batch(slots):
            return capacity_plan(cfg, tp.DTYPE, context=ctx, gpu_budget=budget - headroom, host_budget=host,
                                 pool_slots=slots)["offloaded"]["max_batch"]

        assert fit["batches"] == top_k["batches"] == [max_batch(K)] and fit["pool_slots"] > K
        assert fit["pool_slots"] == blocks or max_batch(fit["pool_slots"] + 1) < max_batch(K)
        assert fit["pool_mult"] == fit["pool_slots"] / K


def test_fit_pool_leaves_the_card_room_for_the_benchmarks_prefill_memo():
    """The benchmark keeps `distinct` prefilled passages on the device during the offloaded runs.
    They count against the real card: under the full card the fit pool shrinks so that weights,
    headroom, the memo, one sequence's prefill and the pool's device state fit; under an emulated
    80 GiB budget (the card has room for the memo beside it) the pool is the one of a single
    prefill."""
    from nosa_jax.cache import cache_bytes
    from nosa_jax.offload import fit_pool_slots, offload_bytes, prefill_bytes

    cfg = ModelConfig(**tp.MODELS["8b"])
    card, host, headroom, ctx, distinct = int(132.8 * tp.GiB), 113 * tp.GiB, 2 * tp.GiB, 131072, 4
    budgets = {"80 GiB": 80 * tp.GiB, "full": card}
    plan = tp.make_plan(cfg, ["nosa-offload"], [ctx], ["fit"], budgets, host, headroom, ["max"],
                        distinct=distinct, device_limit=card)
    by = {next(iter(e["max_batch"])): e for e in plan}
    one = cache_bytes(cfg, 1, ctx, tp.DTYPE, "nosa")
    w = tp.weight_bytes(cfg, tp.DTYPE)
    e80 = by["80 GiB"]
    assert e80["pool_slots"] == fit_pool_slots(cfg, e80["batches"][0], ctx, tp.DTYPE, "nosa", 80 * tp.GiB - headroom - w)
    full = by["full"]
    B, S = full["batches"][0], full["pool_slots"]
    assert S < fit_pool_slots(cfg, B, ctx, tp.DTYPE, "nosa", card - headroom - w)  # the memo costs slots
    dev = lambda slots: offload_bytes(cfg, B, ctx, tp.DTYPE, "nosa", slots)[0]  # noqa: E731
    # the memo and the generator's own prefill (a group of one) beside the pool
    fixed = w + headroom + distinct * one + prefill_bytes(cfg, ctx, tp.DTYPE, "nosa")
    assert fixed + dev(S) <= card < fixed + dev(S + 1)


@pytest.mark.parametrize("floor_ms,reachable", [(10.25, False), (3.0, True)])
def test_speedup_target_bound(floor_ms, reachable):
    """The 5x row reports the speedup NOSA offloaded would have at its roofline floor with its batch,
    and says when even that is below the target (the batch, not the step, is what is missing)."""
    def run(tok_s, step_ms, floor):
        return {"throughput": tok_s, "step_time": step_ms, "floor_time": floor, "measured_over_floor": step_ms / floor}

    ctx, budget = 131072, "80 GiB"
    runs = {("8b", "nosa-offload", "2x top-k", ctx, 23): run(23 / 17.31e-3, 17.31, floor_ms),
            ("8b", "full", "-", ctx, 15): run(15 / 21.87e-3, 21.87, 18.65)}
    plans = {("8b", "nosa-offload", "2x top-k", ctx, budget): 23, ("8b", "full", "-", ctx, budget): 15}
    row = next(ln for ln in tp.anchors(runs, plans, [budget], ["gpu:NVIDIA H200"]).splitlines() if "vs FullAttn" in ln)
    speedup = (23 / 17.31) / (15 / 21.87)
    bound = (23 / floor_ms) / (15 / 21.87)
    assert f"{speedup:.2f}x at {ctx} (batch 23 vs 15" in row and "MISSED" in row
    assert f"at its roofline floor this batch would give {bound:.2f}x" in row
    assert ("the offloaded batch is too small" in row) == (not reachable)


def test_report_leaves_out_failures_a_later_run_fixed():
    """Merged files: a failed run that a later file ran (another pool size, same model, method,
    context and batch) is not listed as failing; one that only an earlier file ran still is."""
    def rec(metric, value, pool, batch):
        s = {"model": "8b", "method": "nosa-offload", "pool": pool, "context": 131072, "batch": batch}
        return {"name": "throughput/decode", "settings": s, "metric": metric, "value": value}

    fixed = [rec("failed", 1, "31.5x top-k", 27), rec("throughput", 2111.5, "26.6x top-k", 27)]
    runs, _, fails = tp.collect(fixed)
    assert fails == [] and runs[("8b", "nosa-offload", "26.6x top-k", 131072, 27)]["throughput"] == 2111.5
    broke = [rec("throughput", 2111.5, "26.6x top-k", 27), rec("failed", 1, "31.5x top-k", 27),
             rec("failed", 1, "2x top-k", 55)]
    _, _, fails = tp.collect(broke)
    assert [(f["pool"], f["batch"]) for f in fails] == [("31.5x top-k", 27), ("2x top-k", 55)]


@pytest.mark.parametrize("floor_ms,reachable", [(5.64, False), (4.23, True)])
def test_tokens_target_bound(floor_ms, reachable):
    """The 3000 tok/s row reports what batch 16 would give at the run's roofline floor, and says
    when even that is below the target (the pool's misses over PCIe alone rule it out)."""
    step = 8.80
    runs = {("8b", "nosa-offload", "2x top-k", 16384, 16): {"throughput": 16 / step * 1e3, "step_time": step,
                                                           "floor_time": floor_ms,
                                                           "measured_over_floor": step / floor_ms}}
    row = next(ln for ln in tp.anchors(runs, {}, ["80 GiB"], ["gpu:NVIDIA H200"]).splitlines()
               if "NOSA offload tok/s, 8B/16K/batch 16, pool 2x top-k" in ln)
    assert "MISSED" in row
    assert f"at its roofline floor ({floor_ms:.2f} ms) this run would give {16e3 / floor_ms:.0f} tok/s" in row
    assert ("out of reach" in row) == (not reachable)


def test_finished_runs_saved_when_stopped_and_resumed(tmp_path, monkeypatch):
    """A process stopped during a later run (a device call's time limit) leaves the finished runs'
    records on disk; --resume with them measures only the rest and keeps both."""
    monkeypatch.setenv("OUT", str(tmp_path))
    real, calls = tp.timed_windows, []

    def stop_on_second(*a, **kw):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(tp, "timed_windows", stop_on_second)
    argv = ["--models", "tiny", "--contexts", "256", "--modes", "full", "nosa-offload", "--pools", "1",
            "--budgets-gb", "0.002", "--host-gb", "0.0002", "--headroom-gb", "0", "--steps", "4", "--repeats", "2",
            "--distinct", "2", "--prefill-chunk", "128", "--batches", "1", "2", "--no-profile", "--no-plots",
            "--tag", "stopped"]
    with pytest.raises(KeyboardInterrupt):
        tp.main(argv)
    first = next(tmp_path.glob("throughput-tiny-stopped-*.json"))
    records = json.loads(first.read_text())
    runs, _, _ = tp.collect(records)
    # on the device batch 1 and 2, then offloaded largest first: batch 2, stopped in batch 1
    measured = {("tiny", "full", "-", 256, 1), ("tiny", "full", "-", 256, 2), ("tiny", "nosa-offload", "top-k", 256, 2)}
    assert set(runs) == measured
    kept = {json.dumps(r, sort_keys=True) for r in records if r["name"] == "throughput/decode"}

    saved = tmp_path / "first.json"
    saved.write_text(first.read_text())
    resumed = []
    monkeypatch.setattr(tp, "timed_windows", lambda *a, **kw: resumed.append(1) or real(*a, **kw))
    assert tp.main(argv + ["--resume", str(saved)]) == 0
    assert len(resumed) == 1  # only the offloaded batch 1
    records = json.loads(next(tmp_path.glob("throughput-tiny-stopped-*.json")).read_text())
    runs, _, _ = tp.collect(records)
    assert set(runs) == measured | {("tiny", "nosa-offload", "top-k", 256, 1)}
    assert kept <= {json.dumps(r, sort_keys=True) for r in records}  # the first call's records, as they were


def test_resume_needs_readable_records(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    for f in (bad, tmp_path / "missing.json"):
        with pytest.raises(SystemExit):
            tp.parse_args(["--models", "tiny", "--resume", str(f)])


def test_kernel_choices_set_and_recorded(tmp_path, monkeypatch):
    """--kernels sets the kernel modules' choices for the runs and each run's records name them; a
    choice that is not one of the listed values stops before any model is built."""
    from nosa_jax import offload
    from pallas_kernels import cache_write, selection, slots, topk

    for mod, attr in ((cache_write, "WRITE_IMPL"), (selection, "SCORES_FINISH"), (slots, "SLOTS_IMPL"),
                      (offload, "LOADS")):
        monkeypatch.setattr(mod, attr, getattr(mod, attr))  # restored after the test
    monkeypatch.setenv("OUT", str(tmp_path))
    argv = ["--models", "tiny", "--contexts", "256", "--modes", "nosa", "nosa-offload", "--pools", "1",
            "--budgets-gb", "0.002", "--host-gb", "0.0002", "--headroom-gb", "0", "--steps", "4", "--repeats", "1",
            "--distinct", "1", "--prefill-chunk", "128", "--batches", "1", "--no-profile", "--no-plots",
            "--tag", "kernels"]
    for bad in ("write=triton", "finish=pallas,sort=xla", "write", "loads=pallas", "slots_warps=3", "xla_x"):
        with pytest.raises(SystemExit, match="kernel choice"):
            tp.parse_args(argv + ["--kernels", bad])
    with pytest.raises(SystemExit):  # XLA options only for --ab variants
        tp.parse_args(argv + ["--kernels", "xla_gpu_enable_triton_gemm=true"])
    assert tp.main(argv + ["--kernels", "write=xla,finish=pallas,slots=xla,loads=separate",
                           "--layer-unroll", "0"]) == 0
    assert (cache_write.WRITE_IMPL, selection.SCORES_FINISH, slots.SLOTS_IMPL, offload.LOADS) == (
        "xla", "pallas", "xla", "separate")
    records = json.loads(next(tmp_path.glob("throughput-tiny-kernels-*.json")).read_text())
    runs = [r for r in records if r["name"] == "throughput/decode"]
    assert {r["settings"]["method"] for r in runs} == {"nosa", "nosa-offload"}
    for r in runs:
        assert r["settings"]["kernels"] == {"topk": selection.TOPK_IMPL, "search": topk.RADIX_SEARCH,
                                            "finish": "pallas", "pool": selection.TOPK_POOL, "write": "xla",
                                            "append": cache_write.APPEND_IMPL, "slots": "xla",
                                            "rows": slots.ROWS, "slots_warps": slots.WARPS, "loads": "separate"}
        assert r["settings"]["layer_unroll"] is True


def test_ab_windows_runs_each_variant_under_its_own_choices(monkeypatch):
    """bench.offload.ab_windows compiles one decode loop per variant under that variant's kernel
    choices and alternates them on one state, rotating the order from round to round: a stand-in
    loop that appends the digit 1 to the tokens when traced with the Pallas finish and 2 otherwise
    writes down which program ran each window; the module's choice is what it was before."""
    import typing
    from functools import partial

    import jax.numpy as jnp

    from bench import offload as bo
    from pallas_kernels import selection

    monkeypatch.setattr(selection, "SCORES_FINISH", "jnp")  # restored after the test

    class St(typing.NamedTuple):
        tokens: jax.Array  # [1, max_new_tokens]: the room check reads its length
        step: jax.Array
        ran: jax.Array

    @partial(jax.jit, static_argnames=("graphdef", "sampler", "eos_ids", "n_steps"))
    def loop(graphdef, state, st, logits, *, sampler, eos_ids, n_steps):
        digit = 1 if selection.SCORES_FINISH == "pallas" else 2
        return St(st.tokens, st.step + n_steps, st.ran * 10 + digit), logits + state

    monkeypatch.setattr(bo, "decode_loop", loop)
    gen = type("Gen", (), {"graphdef": None, "state": jnp.float32(0), "sampler": None})()
    variants = [{}, {"finish": "pallas"}]
    st = St(jnp.zeros((1, 32), jnp.int32), jnp.int32(0), jnp.int32(0))
    ab = bo.ab_windows(gen, st, jnp.float32(0), steps=4, repeats=2, variants=variants)
    # warm-up: two windows of each variant; then two rounds of one window each, the second round
    # in the other order
    assert int(ab.st.ran) == 2211_21_12
    assert int(ab.st.step) == (4 + 2 * 2) * 4 and ab.first_step == 4 * 4
    assert [len(t) for t in ab.times] == [2, 2] and all(x > 0 for t in ab.times for x in t)
    assert selection.SCORES_FINISH == "jnp"
    # one step short of the 32 the windows decode: refused before anything runs (past the state's
    # last token every sequence has stopped, and a window there times no decode step)
    short = St(jnp.zeros((1, 33), jnp.int32), jnp.int32(2), jnp.int32(0))
    with pytest.raises(ValueError, match="room for 31.*max_new_tokens >= 34"):
        bo.ab_windows(gen, short, jnp.float32(0), steps=4, repeats=2, variants=variants)
    with pytest.raises(ValueError, match="room for 31"):
        bo.timed_windows(gen, short, jnp.float32(0), steps=8, repeats=1, profile=True)


def test_ab_variants_with_xla_options():
    """An --ab variant's xla_*=value items are XLA options (typed), the rest kernel choices; the
    options reach XLA's compile of that variant's program: XLA refuses an option it does not know."""
    import typing
    from functools import partial

    import jax.numpy as jnp

    from bench import offload as bo
    from bench.common import parse_kernels

    assert parse_kernels("finish=pallas,xla_a=true,xla_b=false,xla_c=12,xla_d=x;y") == {
        "finish": "pallas", "xla": {"xla_a": True, "xla_b": False, "xla_c": 12, "xla_d": "x;y"}}

    class St(typing.NamedTuple):
        tokens: jax.Array
        step: jax.Array

    @partial(jax.jit, static_argnames=("graphdef", "sampler", "eos_ids", "n_steps"))
    def loop(graphdef, state, st, logits, *, sampler, eos_ids, n_steps):
        return St(st.tokens, st.step + n_steps), logits + state

    gen = type("Gen", (), {"graphdef": None, "state": jnp.float32(0), "sampler": None})()
    st = St(jnp.zeros((1, 64), jnp.int32), jnp.int32(0))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bo, "decode_loop", loop)
        ab = bo.ab_windows(gen, st, jnp.float32(0), steps=4, repeats=1,
                           variants=[{}, parse_kernels("xla_cpu_enable_fast_math=false")])
        assert [len(t) for t in ab.times] == [1, 1]
        with pytest.raises(Exception, match="xla_no_such_option"):
            bo.ab_windows(gen, st, jnp.float32(0), steps=4, repeats=1,
                          variants=[{}, parse_kernels("xla_no_such_option=true")])


def test_ab_mode_end_to_end(tmp_path, monkeypatch):
    """--ab measures each run as alternating windows of the variants and records each variant's
    step time and paired ratio to the first ('throughput/ab', apart from the table's records)."""
    from pallas_kernels import selection

    monkeypatch.setattr(selection, "SCORES_FINISH", selection.SCORES_FINISH)  # restored after the test
    monkeypatch.setenv("OUT", str(tmp_path))
    argv = ["--models", "tiny", "--contexts", "256", "--modes", "nosa", "nosa-offload", "--pools", "1",
            "--budgets-gb", "0.002", "--host-gb", "0.0002", "--headroom-gb", "0", "--steps", "4", "--repeats", "2",
            "--distinct", "1", "--prefill-chunk", "128", "--batches", "1", "--no-plots", "--tag", "ab"]
    with pytest.raises(SystemExit):
        tp.parse_args(argv + ["--ab", "default"])
    with pytest.raises(SystemExit, match="kernel choice"):
        tp.parse_args(argv + ["--ab", "default", "finish=cuda"])
    # 2 variants x (2 + 2) windows of 32 steps: 258 decode steps, over half of the 256-token context
    with pytest.raises(SystemExit):
        tp.parse_args(argv + ["--steps", "32", "--ab", "default", "finish=pallas"])
    tp.parse_args(argv + ["--steps", "15", "--ab", "default", "finish=pallas"])  # 122 steps: fits
    before = selection.SCORES_FINISH
    # three variants: 3 x (2 + 2) windows, more than the 2 + 2 + 1 of a timed run; each state must
    # have room for them all (bench.offload.check_room), or its misses would be counted over no step
    assert tp.main(argv + ["--ab", "default", "finish=pallas", "finish=jnp"]) == 0
    assert selection.SCORES_FINISH == before
    records = json.loads(next(tmp_path.glob("throughput-tiny-ab-*.json")).read_text())
    assert not [r for r in records if r["name"] == "throughput/decode"]
    ab = [r for r in records if r["name"] == "throughput/ab"]
    assert all(set(r) == KEYS for r in ab)
    got = {(r["settings"]["method"], r["settings"]["variant"], r["metric"]): r for r in ab}
    for method in ("nosa", "nosa-offload"):
        assert got[(method, "default", "step_time_vs_first")]["value"] == 1.0
        assert got[(method, "finish=pallas", "step_time_vs_first")]["value"] > 0
        assert got[(method, "finish=pallas", "step_time")]["settings"]["kernels"]["finish"] == "pallas"
        assert got[(method, "default", "step_time")]["settings"]["kernels"]["finish"] == before
        t = got[(method, "default", "step_time")]["value"]
        assert got[(method, "default", "throughput")]["value"] == pytest.approx(1 / (t / 1e3))
        w = got[(method, "default", "step_time")]["settings"]["window_times_s"]
        assert len(w) == 2 and t == pytest.approx(float(np.median(w)) / 4 * 1e3)
        assert got[(method, "finish=jnp", "step_time")]["settings"]["kernels"]["finish"] == "jnp"
    assert got[("nosa-offload", "default", "misses_per_layer_head_seq_step")]["value"] >= 0  # not NaN
    assert "an --ab comparison" in next(tmp_path.glob("throughput-tiny-ab-*.md")).read_text()


def test_kernel_choices_retrace_after_a_change(monkeypatch):
    """A jitted function that reads a kernel choice at trace time sees a new choice on its next call
    (jit's cache key does not hold the choice; bench.common.kernel_choices drops the stale traces)."""
    from bench.common import kernel_choices
    from pallas_kernels import selection

    monkeypatch.setattr(selection, "SCORES_FINISH", "jnp")  # restored after the test
    f = jax.jit(lambda x: x + (1 if selection.SCORES_FINISH == "pallas" else 0))
    assert int(f(0)) == 0
    kernel_choices({"finish": "pallas"})
    assert int(f(0)) == 1
    kernel_choices({"finish": "pallas"})  # no change: nothing to drop
    assert int(f(0)) == 1


def test_step_split_names_each_kernel_and_the_part_over_its_floor():
    """The profiler's events go to their part by kernel name or op_name: the Pallas kernels (no
    op_name) by their pallas_call names, cuBLAS's GEMMs to "gemm"; the verdict then names the part
    furthest above its share of the floor: the GEMMs against the weight floor, "rest" against none,
    and the attention against the selected KV plus, where it reads the misses itself, their PCIe time."""
    from bench.common import split_by_scope
    from bench.offload import SCOPES

    ev = lambda name, us: (name, 0.0, us, {})  # noqa: E731  (name, start, duration, args)
    events = [ev("nvjet_sm90_tst_256x16_64x6_2x1_v_bz_NNT", 4000.0), ev("sm90_xmma_gemm_bf16bf16_f32", 100.0),
              ev("nosa_sparse_decode_fetch", 2000.0), ev("nosa_two_stage_topk", 300.0),
              ev("nosa_decode_stage1_logits", 200.0), ev("input_reduce_fusion_131", 50.0),
              ev("nosa_update_slots", 30.0), ev("loop_multiply_fusion", 7.0), ev("input_scatter_fusion_127", 3.0)]
    op_names = {"input_reduce_fusion_131": "jit(decode_loop)/while/body/nosa_select/reduce_sum",
                "input_scatter_fusion_127": "jit(decode_loop)/while/body/nosa_append/scatter"}
    split = split_by_scope(events, SCOPES, op_names)
    assert split == {"flush": 0.0, "append": 3.0, "selection": 550.0, "slots": 30.0, "loads": 0.0,
                     "attention": 2000.0, "gemm": 4100.0, "rest": 7.0}

    # every Pallas kernel of the package has a part by its pallas_call name (the one-kernel offloaded
    # append fell into "rest" until session 24)
    import re

    names = {m for f in (ROOT / "pallas_kernels").glob("*.py") for line in f.read_text().splitlines()
             if "name=" in line for m in re.findall(r'"(nosa_[a-z0-9_]+)"', line)}
    assert {"nosa_offload_append", "nosa_decode_stage1_pool", "nosa_kv_load_blocks"} <= names
    parts = {n: [p for p, v in split_by_scope([ev(n, 1.0)], SCOPES, {}).items() if v] for n in names}
    assert {n: p for n, p in parts.items() if p in ([], ["rest"])} == {}

    v = {"step_time": 8.6, "device_time_per_step": 8200.0, "floor_compressed_time": 0.1, "floor_pcie_time": 1.5,
         "floor_kv_time": 0.5, "floor_weights_time": 3.7, "split_selection": 600.0, "split_loads": 0.0,
         "split_attention": 2100.0, "split_gemm": 4000.0, "split_rest": 1500.0}
    assert tp.responsible(v) == ("rest (the small kernels: slot update, cache writes, norms, rope, residuals) "
                                 "+1.50 ms over its floor")
    v["split_gemm"] = 5600.0  # GEMMs 1.9 ms over the weight floor: now they are the part to blame
    assert tp.responsible(v).startswith("GEMMs +1.90 ms")
    v |= {"split_gemm": 4000.0, "split_attention": 3700.0}  # 3.7 ms against 0.5 (KV) + 1.5 (PCIe)
    assert tp.responsible(v) == "attention (with the misses' PCIe reads) +1.70 ms over its floor"
    v |= {"split_attention": 1500.0, "split_loads": 1800.0}  # loads before the attention: each its own floor
    assert tp.responsible(v).startswith("rest (the small kernels")
    v["split_loads"] = 3200.0
    assert tp.responsible(v) == "loads +1.70 ms over its floor"
    v |= {"split_attention": 2100.0, "split_loads": 0.0}
    on_device = v | {"floor_pcie_time": 0.0, "split_attention": 2200.0}  # no misses: the KV floor alone
    assert tp.responsible(on_device) == "attention +1.70 ms over its floor"
    old = {k: x for k, x in v.items() if k != "split_gemm"} | {"split_rest": 5500.0}  # a record from before the split
    assert tp.responsible(old) == "rest (GEMMs and the small kernels) +1.80 ms over its floor"
