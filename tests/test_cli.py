"""The `nosa-jax` command line: generate (text and ids), score inputs, and clear errors."""

import numpy as np
import pytest

from nosa_jax.cli import main as cli_main
from nosa_jax.demo import demo_text, make_demo_checkpoint

from conftest import FIXTURES


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return make_demo_checkpoint(tmp_path_factory.mktemp("demo") / "hf", log=lambda *_: None)


def test_generate_from_text(demo_dir, tmp_path, capsys):
    out = tmp_path / "gen.npz"
    text = demo_text()
    assert cli_main(["generate", "--checkpoint", str(demo_dir), "--prompt", text[:300],
                     "--prompt", text[:420], "--max-new-tokens", "12", "--out", str(out),
                     "--save-logits", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert text[300:310] in printed  # the demo model continues its passage
    assert "tok/s" in printed and "KV cache" in printed
    r = np.load(out)
    assert r["generated_ids"].shape == (2, 12) and r["logits"].shape == (2, 12, 258)
    np.testing.assert_array_equal(r["generated_ids"], r["logits"].argmax(-1))


def test_generate_from_ids_with_sampling(tmp_path, capsys):
    case = FIXTURES / "T-40"
    ids = np.load(case / "expected.npz")["input_ids"]
    np.save(tmp_path / "ids.npy", np.stack([ids, ids[::-1]]))
    args = ["generate", "--checkpoint", str(case), "--input-ids", str(tmp_path / "ids.npy"), "--max-new-tokens",
            "8", "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "3", "--no-progress"]
    assert cli_main(args + ["--out", str(tmp_path / "a.npz")]) == 0
    assert cli_main(args + ["--out", str(tmp_path / "b.npz")]) == 0
    assert "generated ids:" in capsys.readouterr().out  # no tokenizer: ids are printed
    np.testing.assert_array_equal(np.load(tmp_path / "a.npz")["generated_ids"], np.load(tmp_path / "b.npz")["generated_ids"])


def test_cli_errors(demo_dir, tmp_path, capsys):
    case = str(FIXTURES / "T-40")
    np.save(tmp_path / "bad.npy", np.array([1, 2, 9999]))
    np.save(tmp_path / "float.npy", np.array([1.0, 2.0]))
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    cases = [
        (["generate", "--checkpoint", case, "--prompt", "hi"], "no tokenizer.json"),
        (["generate", "--checkpoint", case], "exactly one of --prompt"),
        (["generate", "--checkpoint", case, "--input-ids", str(tmp_path / "bad.npy")], "outside the vocabulary"),
        (["generate", "--checkpoint", str(demo_dir), "--prompt", "x" * 50, "--capacity", "20"], "exceeds the capacity"),
        (["score", "--checkpoint", case, "--input-ids", str(tmp_path / "bad.npy"), "--out", str(tmp_path / "o.npz")],
         "outside the vocabulary"),
        (["score", "--checkpoint", case, "--input-ids", str(tmp_path / "float.npy"), "--out", str(tmp_path / "o.npz")],
         "must hold integers"),
        (["score", "--checkpoint", case, "--input-ids", str(tmp_path / "junk.npy"), "--out", str(tmp_path / "o.npz")],
         "not a readable"),
        (["score", "--checkpoint", str(tmp_path / "nope"), "--input-ids", str(tmp_path / "bad.npy"),
          "--out", str(tmp_path / "o.npz")], "does not exist"),
    ]
    for argv, msg in cases:
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert msg in err, (argv, err)
    assert not (tmp_path / "o.npz").exists()


def test_score_batch_with_padding(tmp_path):
    """A left-padded batch through the CLI equals the rows scored alone."""
    case = FIXTURES / "T-1000"
    ids = np.load(case / "expected.npz")["input_ids"][:300]
    short = ids[:200]
    batch = np.stack([ids, np.concatenate([np.zeros(100, ids.dtype), short])])
    mask = np.stack([np.ones(300, np.int64), np.concatenate([np.zeros(100, np.int64), np.ones(200, np.int64)])])
    np.save(tmp_path / "ids.npy", batch)
    np.save(tmp_path / "mask.npy", mask)
    np.save(tmp_path / "short.npy", short)
    pos = np.stack([np.arange(250, 300), np.arange(250, 300)])
    np.save(tmp_path / "pos.npy", pos)
    np.save(tmp_path / "pos_short.npy", np.arange(150, 200))
    assert cli_main(["score", "--checkpoint", str(case), "--input-ids", str(tmp_path / "ids.npy"), "--attention-mask",
                     str(tmp_path / "mask.npy"), "--positions", str(tmp_path / "pos.npy"), "--out", str(tmp_path / "b.npz")]) == 0
    assert cli_main(["score", "--checkpoint", str(case), "--input-ids", str(tmp_path / "short.npy"), "--positions",
                     str(tmp_path / "pos_short.npy"), "--out", str(tmp_path / "s.npz")]) == 0
    b, s = np.load(tmp_path / "b.npz"), np.load(tmp_path / "s.npz")
    np.testing.assert_allclose(b["logits"][1], s["logits"][0], atol=1e-4)
    np.testing.assert_array_equal(b["selected_blocks"][1][..., : s["selected_blocks"].shape[-1]], s["selected_blocks"][0])


@pytest.mark.optimized
def test_score_infllmv2_mode(tmp_path, capsys):
    """score in infllmv2 mode: top-k of the pooled stage-1 scores, no bias; at 5000 tokens (79
    blocks > 64) the selection is sparse and differs from nosa mode's."""
    case = FIXTURES / "T-5000"
    e = np.load(case / "expected.npz")
    np.save(tmp_path / "ids.npy", e["input_ids"])
    np.save(tmp_path / "pos.npy", e["positions"][-4:])
    assert cli_main(["score", "--checkpoint", str(case), "--input-ids", str(tmp_path / "ids.npy"), "--positions",
                     str(tmp_path / "pos.npy"), "--mode", "infllmv2", "--out", str(tmp_path / "i.npz")]) == 0
    assert "perplexity" in capsys.readouterr().out
    r = np.load(tmp_path / "i.npz")
    sel = r["selected_blocks"][0]  # [L, Hk, P, 64]
    assert sel.shape == (2, 2, 4, 64) and (sel >= 0).all()
    qb = e["positions"][-4:] // 64
    for l in range(2):
        for h in range(2):
            for p in range(4):
                row = sel[l, h, p]
                assert (np.diff(row) > 0).all() and row.max() <= qb[p]
                assert {0, *range(qb[p] - 16, qb[p] + 1)} <= set(row.tolist())  # forced sink + local blocks
    assert any(set(sel[l, h, p]) != set(e["topk_idx"][l, h, -4 + p]) for l in range(2) for h in range(2) for p in range(4))


def test_generate_offloaded_equals_on_device(demo_dir, tmp_path, capsys):
    """`generate --offload`: the same tokens as the on-device cache, and the load statistics."""
    text = demo_text()
    common = ["generate", "--checkpoint", str(demo_dir), "--prompt", text[:300], "--prompt", text[:170],
              "--max-new-tokens", "60", "--no-progress"]
    assert cli_main(common + ["--out", str(tmp_path / "dev.npz")]) == 0
    assert cli_main(common + ["--offload", "--pool-slots", "6", "--out", str(tmp_path / "off.npz")]) == 0
    printed = capsys.readouterr().out
    assert "offloaded KV" in printed and "hit rate" in printed and "locality gamma" in printed
    np.testing.assert_array_equal(np.load(tmp_path / "off.npz")["generated_ids"],
                                  np.load(tmp_path / "dev.npz")["generated_ids"])


def test_plan(demo_dir, tmp_path, capsys):
    """`plan`: per-sequence bytes and largest batches, checked against the config's arithmetic."""
    import json

    out = tmp_path / "plan.json"
    assert cli_main(["plan", "--checkpoint", str(demo_dir), "--context", "1000", "--batch", "4", "--dtype", "float32",
                     "--gpu-memory-gb", "0.03", "--host-memory-gb", "1", "--pool-slots", "12",
                     "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "dense" in printed and "offloaded" in printed
    plan = json.loads(out.read_text())
    L, Hk, D, bs = 2, 2, 32, 16  # the demo config
    T = -(-1000 // bs) * bs  # tokens allocated: whole blocks
    # K, V and the eviction score per token (float32); length, rope_len; the decode kernel's split counter
    dense = L * T * Hk * (2 * D * 4 + 4) + 8 + Hk * 4
    assert plan["dense"]["device_bytes_per_seq"] == dense
    weights = plan["weights_bytes"]
    assert plan["dense"]["max_batch"] == (int(0.03 * 2**30) - weights) // dense
    host = L * Hk * (T // bs + 2) * bs * D * 4 * 2  # K and V blocks (+2 spare flush blocks) on the host
    assert plan["offloaded"]["host_bytes_per_seq"] == host
    assert plan["offloaded"]["max_batch"] <= 2**30 // host
    assert plan["offloaded"]["max_batch"] > plan["dense"]["max_batch"]


def test_plan_fit_pool(demo_dir, tmp_path, capsys):
    """`plan --pool-slots fit`: the offloaded largest batch of a top-k pool, and the largest pool
    that batch leaves room for (offload.fit_pool_slots on the device budget less the weights)."""
    import json

    import jax.numpy as jnp

    from nosa_jax.checkpoint import load_config
    from nosa_jax.offload import capacity_plan, fit_pool_slots, num_selected

    out = tmp_path / "plan.json"
    assert cli_main(["plan", "--checkpoint", str(demo_dir), "--context", "1000", "--dtype", "float32",
                     "--gpu-memory-gb", "0.05", "--host-memory-gb", "0.01", "--pool-slots", "fit",
                     "--json", str(out)]) == 0
    plan = json.loads(out.read_text())
    cfg = load_config(demo_dir)
    K = num_selected(cfg, 1000)
    top = capacity_plan(cfg, jnp.float32, context=1000, gpu_budget=int(0.05 * 2**30), host_budget=int(0.01 * 2**30),
                        pool_slots=K)
    b = top["offloaded"]["max_batch"]
    assert b > 0 and plan["offloaded"]["max_batch"] == b and plan["offloaded"]["fit_pool_batch"] == b
    S = fit_pool_slots(cfg, b, 1000, jnp.float32, "nosa", int(0.05 * 2**30) - top["weights_bytes"])
    assert plan["offloaded"]["fit_pool_slots"] == S > K  # host-bound: the device has room for more slots
    assert f"fit pool at batch {b}: {S} slots" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli_main(["plan", "--checkpoint", str(demo_dir), "--context", "1000", "--pool-slots", "lots"])


def test_offload_cli_errors(demo_dir, capsys):
    base = ["generate", "--checkpoint", str(demo_dir), "--prompt", demo_text()[:300], "--max-new-tokens", "4",
            "--no-progress"]
    assert cli_main(base + ["--offload", "--mode", "full"]) == 2
    assert "sparse modes" in capsys.readouterr().err
    assert cli_main(base + ["--offload", "--pool-slots", "2"]) == 2
    assert "pool_slots=2" in capsys.readouterr().err
    assert cli_main(base + ["--offload", "--host-memory-gb", "0.000001"]) == 2
    assert "host memory" in capsys.readouterr().err


def test_bench_front_door_plans(capsys):
    """`nosa-jax bench` forwards to bench/throughput.py (here its --dry-run plan, no measuring)."""
    assert cli_main(["bench", "--dry-run", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "nosa-offload" in out and "max batch" in out
