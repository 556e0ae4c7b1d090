"""Checkpoint converter (convert/) and loader (nosa_jax/checkpoint.py) on small random HF checkpoints.

The expected parameter layout is written out by hand here (HF [out, in] -> kernel [in, out], layers
stacked on axis 0, q/k/v side by side in one qkv_proj, gate/up in one gate_up_proj), independently
of the converter's own derivation from `abstract_params`.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import jax


import jax.numpy as jnp  # noqa: E402
import conftest  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

import convert  # noqa: E402
from convert import ConversionError, convert_checkpoint  # noqa: E402
from nosa_jax import checkpoint  # noqa: E402
from nosa_jax.checkpoint import CheckpointError, load_model, load_params, tokenizer_path  # noqa: E402
from nosa_jax.config import ModelConfig  # noqa: E402
from nosa_jax.model import abstract_params, from_params  # noqa: E402



FIXTURE_ROOT = conftest.FIXTURES
FIXTURES = [FIXTURE_ROOT / c for c in conftest.fixture_cases("config.json")]
L, H, I, HQ, HK, D, V = 2, 32, 48, 4, 2, 8, 64


def tiny_config(**over) -> dict:
    d = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": V,
        "hidden_size": H, "intermediate_size": I, "num_hidden_layers": L,
        "num_attention_heads": HQ, "num_key_value_heads": HK, "head_dim": D,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None,
        "max_position_embeddings": 512, "tie_word_embeddings": False, "attention_bias": False,
        "mlp_bias": False, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "float32",
        "nosa": {"block_size": 16, "kernel_size": 8, "kernel_stride": 4, "init_blocks": 1,
                 "local_blocks": 1, "topk": 4, "qk_select": 3, "note": "informational"},
    }
    d.update(over)
    return d


def tiny_state_dict(cfg: dict, *, seed=0, dtype=np.float32, nosa=True) -> dict[str, np.ndarray]:
    """A random HF state dict with the upstream names and [out, in] shapes (spec 1.2)."""
    rng = np.random.default_rng(seed)
    ab, mb = cfg["attention_bias"], cfg["mlp_bias"]
    o_bias = "bias" in abstract_params(ModelConfig.from_hf_dict(cfg))["layers"]["self_attn"]["o_proj"]
    sd = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    if not cfg["tie_word_embeddings"]:
        sd["lm_head.weight"] = (V, H)
    for i in range(L):
        p = f"model.layers.{i}."
        lin = {"self_attn.q_proj": (HQ * D, H), "self_attn.k_proj": (HK * D, H),
               "self_attn.v_proj": (HK * D, H), "self_attn.o_proj": (H, HQ * D),
               "mlp.gate_proj": (I, H), "mlp.up_proj": (I, H), "mlp.down_proj": (H, I)}
        if nosa:
            lin["self_attn.delta"] = (HK, HK * D)
            sd[p + "self_attn.A"] = (HK,)
        for m, shape in lin.items():
            sd[p + m + ".weight"] = shape
            if (m.startswith("mlp") and mb) or (m.startswith("self_attn") and ab and
                                                 (m != "self_attn.o_proj" or o_bias)):
                sd[p + m + ".bias"] = (shape[0],)
        sd[p + "input_layernorm.weight"] = (H,)
        sd[p + "post_attention_layernorm.weight"] = (H,)
    out = {}
    for k, shape in sd.items():
        a = rng.normal(0, 0.2, shape).astype(np.float32)
        if k.endswith("layernorm.weight") or k == "model.norm.weight":
            a += 1.0
        if k.endswith("self_attn.A"):
            a = -np.abs(a) - 0.5
        out[k] = a.astype(dtype)
    return out


def expected_params(sd: dict, cfg: dict) -> dict:
    """The nosa-jax layout of a HF state dict, by hand."""
    def stack(suffix, t=False):
        return np.stack([sd[f"model.layers.{i}.{suffix}"].T if t else sd[f"model.layers.{i}.{suffix}"]
                         for i in range(L)])

    layers = {"input_layernorm": {"weight": stack("input_layernorm.weight")},
              "post_attention_layernorm": {"weight": stack("post_attention_layernorm.weight")},
              "self_attn": {"A": stack("self_attn.A")}, "mlp": {}}
    for m in ("o_proj", "delta"):
        layers["self_attn"][m] = {"kernel": stack(f"self_attn.{m}.weight", True)}
        if f"model.layers.0.self_attn.{m}.bias" in sd:
            layers["self_attn"][m]["bias"] = stack(f"self_attn.{m}.bias")
    qkv = ("q_proj", "k_proj", "v_proj")  # columns q | k | v
    layers["self_attn"]["qkv_proj"] = {"kernel": np.concatenate([stack(f"self_attn.{m}.weight", True)
                                                                 for m in qkv], axis=-1)}
    if "model.layers.0.self_attn.q_proj.bias" in sd:
        layers["self_attn"]["qkv_proj"]["bias"] = np.concatenate([stack(f"self_attn.{m}.bias") for m in qkv],
                                                                 axis=-1)
    gate_up = ("gate_proj", "up_proj")  # columns gate | up
    layers["mlp"]["gate_up_proj"] = {"kernel": np.concatenate([stack(f"mlp.{m}.weight", True) for m in gate_up],
                                                              axis=-1)}
    layers["mlp"]["down_proj"] = {"kernel": stack("mlp.down_proj.weight", True)}
    if "model.layers.0.mlp.gate_proj.bias" in sd:
        layers["mlp"]["gate_up_proj"]["bias"] = np.concatenate([stack(f"mlp.{m}.bias") for m in gate_up], axis=-1)
        layers["mlp"]["down_proj"]["bias"] = stack("mlp.down_proj.bias")
    p = {"embed_tokens": {"embedding": sd["model.embed_tokens.weight"]},
         "norm": {"weight": sd["model.norm.weight"]}, "layers": layers}
    if not cfg["tie_word_embeddings"]:
        p["lm_head"] = {"kernel": sd["lm_head.weight"].T}
    return p


def write_hf(d: Path, cfg: dict, sd: dict, *, shards: int = 0, extra_files=()) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    if not shards:
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    else:
        names = sorted(sd)
        wm = {}
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = names[s::shards]
            save_file({k: sd[k] for k in part}, str(d / fname), metadata={"format": "pt"})
            wm.update({k: fname for k in part})
        (d / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": 0}, "weight_map": wm}))
    for name in extra_files:
        (d / name).write_text(json.dumps({"name": name}))
    return d


def assert_tree_equal(got, want, dtype=None):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        g = np.asarray(g)
        assert g.shape == w.shape, (path, g.shape, w.shape)
        if dtype is not None:
            assert g.dtype == dtype, (path, g.dtype)
        np.testing.assert_array_equal(g.astype(np.float32), np.asarray(w).astype(np.float32),
                                      err_msg=str(path))


def assert_nothing_written(parent: Path):
    """No output and no temporary directory left in the output's parent."""
    assert not parent.exists() or sorted(os.listdir(parent)) == [], os.listdir(parent)


@pytest.fixture
def hf(tmp_path):
    cfg = tiny_config()
    sd = tiny_state_dict(cfg)
    return write_hf(tmp_path / "hf", cfg, sd, extra_files=("tokenizer.json", "tokenizer_config.json",
                                                           "generation_config.json")), cfg, sd


def fail(hf_dir, tmp_path, match, **kw):
    """Convert expecting a ConversionError matching `match`; nothing may be left behind."""
    parent = tmp_path / "dest"
    parent.mkdir(exist_ok=True)
    with pytest.raises(ConversionError, match=match) as ei:
        convert_checkpoint(hf_dir, parent / "out", progress=False, **kw)
    assert_nothing_written(parent)
    return str(ei.value)


# ------------------------------------------------------------------------------------------------
# round trips


def test_round_trip_and_forward(hf, tmp_path, capsys):
    hf_dir, cfg, sd = hf
    out = convert_checkpoint(hf_dir, tmp_path / "conv", progress=True)
    assert out == (tmp_path / "conv").absolute()
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "nosa_jax.json",
                                       "params", "tokenizer.json", "tokenizer_config.json"]
    assert "reading hf" in capsys.readouterr().err  # the progress bar
    assert ModelConfig.from_json(out / "config.json") == ModelConfig.from_json(hf_dir / "config.json")
    written = json.loads((out / "config.json").read_text())
    assert written["nosa"] == ModelConfig.from_json(hf_dir / "config.json").nosa.to_dict()
    meta = json.loads((out / "nosa_jax.json").read_text())
    assert meta["format_version"] == checkpoint.FORMAT_VERSION and meta["dtype"] == "float32"
    assert meta["nosa_weights"] == "present" and meta["source"] == str(hf_dir.resolve())
    assert tokenizer_path(out) == out / "tokenizer.json" and tokenizer_path(tmp_path) is None

    want = expected_params(sd, cfg)
    c1, p_conv = load_params(out)
    c2, p_hf = load_params(hf_dir)
    assert c1 == c2
    assert_tree_equal(p_conv, want, np.float32)
    assert_tree_equal(p_hf, want, np.float32)
    assert all(isinstance(a, jax.Array) for a in jax.tree.leaves(p_conv) + jax.tree.leaves(p_hf))

    ids = jnp.asarray(np.random.default_rng(1).integers(0, V, (1, 40)))
    model = load_model(out, mode="nosa", q_chunk=16)
    ref = from_params(c2, p_hf, mode="nosa", q_chunk=16)
    logits = nnx_jit_logits()  # one compile serves both models (same graph)
    np.testing.assert_array_equal(np.asarray(logits(model, ids)), np.asarray(logits(ref, ids)))


@pytest.mark.parametrize("bias", ["attention_bias", "mlp_bias"])
def test_biases(tmp_path, bias):
    cfg = tiny_config(**{bias: True})
    sd = tiny_state_dict(cfg, seed=3)
    assert any(k.endswith(".bias") for k in sd)
    hf_dir = write_hf(tmp_path / "hf", cfg, sd)
    out = convert_checkpoint(hf_dir, tmp_path / "conv", progress=False)
    assert_tree_equal(load_params(out)[1], expected_params(sd, cfg))


QKV_COLS = {"q_proj": (0, HQ * D), "k_proj": (HQ * D, (HQ + HK) * D),
            "v_proj": ((HQ + HK) * D, (HQ + 2 * HK) * D)}  # column ranges in the fused qkv_proj


def test_fused_qkv_columns(tmp_path):
    """Distinct q, k, v weights and biases land, exactly, in their own column ranges q | k | v of the
    fused qkv_proj (converted directory and in-memory HF load)."""
    cfg = tiny_config(attention_bias=True)
    sd = tiny_state_dict(cfg, seed=23)
    w = [sd[f"model.layers.0.self_attn.{m}.weight"] for m in ("k_proj", "v_proj")]
    assert not np.array_equal(*w)  # a k/v mix-up cannot go unnoticed
    hf_dir = write_hf(tmp_path / "hf", cfg, sd)
    out = convert_checkpoint(hf_dir, tmp_path / "conv", progress=False)
    for p in (load_params(out)[1], load_params(hf_dir)[1]):
        fused = p["layers"]["self_attn"]["qkv_proj"]
        assert fused["kernel"].shape == (L, H, (HQ + 2 * HK) * D) and fused["bias"].shape == (L, (HQ + 2 * HK) * D)
        for i in range(L):
            for m, (a, b) in QKV_COLS.items():
                name = f"model.layers.{i}.self_attn.{m}"
                np.testing.assert_array_equal(np.asarray(fused["kernel"][i, :, a:b]), sd[name + ".weight"].T)
                np.testing.assert_array_equal(np.asarray(fused["bias"][i, a:b]), sd[name + ".bias"])


def test_fused_qkv_projection_vs_numpy(tmp_path):
    """The model's q, k, v (before the rotation) from a converted checkpoint equal x @ W.T + b
    computed in float64 from the HF tensors, for several rows and for one (model._dense's path)."""
    from flax import nnx

    from nosa_jax.model import Attention

    cfg = tiny_config(attention_bias=True)
    sd = tiny_state_dict(cfg, seed=29)
    mcfg, p = load_params(convert_checkpoint(write_hf(tmp_path / "hf", cfg, sd), tmp_path / "conv",
                                             progress=False))
    rng = np.random.default_rng(0)
    for i in range(L):
        attn = Attention(mcfg, jnp.float32, nnx.Rngs(0))
        state = nnx.state(attn, nnx.Param)
        nnx.replace_by_pure_dict(state, jax.tree.map(lambda a: a[i], p["layers"]["self_attn"]))
        nnx.update(attn, state)
        for B, T in ((2, 5), (1, 1)):
            x = rng.standard_normal((B, T, H)).astype(np.float32)
            cos = jnp.ones((B, T, D), jnp.float32)  # cos 1, sin 0: no rotation
            q, k, v, *_ = attn.project(jnp.asarray(x), cos, jnp.zeros_like(cos))
            for got, m, heads in ((q, "q_proj", HQ), (k, "k_proj", HK), (v, "v_proj", HK)):
                name = f"model.layers.{i}.self_attn.{m}"
                want = x.astype(np.float64) @ sd[name + ".weight"].T.astype(np.float64) + sd[name + ".bias"]
                np.testing.assert_allclose(np.asarray(got), want.reshape(B, T, heads, D), rtol=1e-5, atol=1e-6,
                                           err_msg=f"{name}, {B}x{T}")


def test_sharded_index(tmp_path):
    cfg = tiny_config()
    sd = tiny_state_dict(cfg, seed=5)
    hf_dir = write_hf(tmp_path / "hf", cfg, sd, shards=3)
    out = convert_checkpoint(hf_dir, tmp_path / "conv", progress=False)
    meta = json.loads((out / "nosa_jax.json").read_text())
    assert len(meta["source_files"]) == 3 and "sharded" in meta["source_format"]
    assert_tree_equal(load_params(out)[1], expected_params(sd, cfg))
    assert_tree_equal(load_params(hf_dir)[1], expected_params(sd, cfg))


def test_tied_embeddings(tmp_path):
    cfg = tiny_config(tie_word_embeddings=True)
    sd = tiny_state_dict(cfg, seed=7)
    assert "lm_head.weight" not in sd
    out = convert_checkpoint(write_hf(tmp_path / "a", cfg, sd), tmp_path / "conv_a", progress=False)
    c, p = load_params(out)
    assert c.tie_word_embeddings and "lm_head" not in p
    assert_tree_equal(p, expected_params(sd, cfg))
    load_model(out, mode="full")  # builds

    # a checkpoint that also stores the (equal) tied head is accepted, and says so
    sd2 = dict(sd, **{"lm_head.weight": sd["model.embed_tokens.weight"].copy()})
    out = convert_checkpoint(write_hf(tmp_path / "b", cfg, sd2), tmp_path / "conv_b", progress=False)
    assert "lm_head" not in load_params(out)[1]
    assert any("tied" in n for n in json.loads((out / "nosa_jax.json").read_text())["notes"])

    # ... but a different one is reported
    sd3 = dict(sd, **{"lm_head.weight": sd["model.embed_tokens.weight"] + 1.0})
    msg = fail(write_hf(tmp_path / "c", cfg, sd3), tmp_path, "tie_word_embeddings")
    assert "differs from model.embed_tokens.weight" in msg and '"tie_word_embeddings": false' in msg


def test_bf16_source_and_dtype_conversion(tmp_path):
    cfg = tiny_config(torch_dtype="bfloat16")
    sd = tiny_state_dict(cfg, seed=11, dtype=ml_dtypes.bfloat16)
    hf_dir = write_hf(tmp_path / "hf", cfg, sd)
    want = expected_params(sd, cfg)

    out = convert_checkpoint(hf_dir, tmp_path / "keep", progress=False)  # dtype kept
    assert json.loads((out / "nosa_jax.json").read_text())["dtype"] == "bfloat16"
    assert_tree_equal(load_params(out)[1], want, jnp.bfloat16)
    assert_tree_equal(load_params(hf_dir)[1], want, jnp.bfloat16)
    assert_tree_equal(load_params(out, dtype="float32")[1], want, np.float32)  # exact upcast

    out = convert_checkpoint(hf_dir, tmp_path / "f32", dtype="float32", progress=False)
    assert_tree_equal(load_params(out)[1], want, np.float32)
    model = load_model(out, mode="full", dtype="bfloat16")
    assert jax.tree.leaves(nnx_params(model))[0].dtype == jnp.bfloat16

    # float32 source -> float16 / bfloat16 output
    sd32 = tiny_state_dict(cfg, seed=12)
    hf32 = write_hf(tmp_path / "hf32", cfg, sd32)
    for name, dt in (("float16", np.float16), ("bfloat16", ml_dtypes.bfloat16)):
        out = convert_checkpoint(hf32, tmp_path / name, dtype=name, progress=False)
        want = jax.tree.map(lambda a: a.astype(dt), expected_params(sd32, cfg))
        assert_tree_equal(load_params(out)[1], want, dt)


def nnx_jit_logits():
    from flax import nnx

    return nnx.jit(lambda m, x: m(x).logits)


def nnx_params(model):
    from flax import nnx

    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_missing_nosa_weights(tmp_path, capsys):
    cfg = tiny_config(attention_bias=True)
    sd = tiny_state_dict(cfg, seed=13, nosa=False)
    assert not any("self_attn.A" in k or "delta" in k for k in sd)
    hf_dir = write_hf(tmp_path / "hf", cfg, sd)
    out = convert_checkpoint(hf_dir, tmp_path / "conv", progress=False)
    err = capsys.readouterr().err
    assert "notice: NOSA weights missing" in err and "A=0, delta=0" in err
    meta = json.loads((out / "nosa_jax.json").read_text())
    assert meta["nosa_weights"] == "missing"
    assert any("A=0, delta=0" in n for n in meta["notes"])
    _, p = load_params(out)
    attn = p["layers"]["self_attn"]
    for a in (attn["A"], attn["delta"]["kernel"], attn["delta"]["bias"]):
        assert not np.asarray(a).any()
    assert attn["A"].shape == (L, HK) and attn["delta"]["kernel"].shape == (L, HK * D, HK)
    np.testing.assert_array_equal(np.asarray(attn["qkv_proj"]["kernel"][1, :, :HQ * D]),
                                  sd["model.layers.1.self_attn.q_proj.weight"].T)
    # the in-memory HF load does the same and says so
    _, p2 = load_params(hf_dir)
    assert_tree_equal(p2, p)
    assert "NOSA weights missing" in capsys.readouterr().err


def test_inv_freq_buffers_are_ignored(tmp_path):
    cfg = tiny_config()
    sd = tiny_state_dict(cfg, seed=17)
    sd["model.rotary_emb.inv_freq"] = np.ones(D // 2, np.float32)
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(D // 2, np.float32)
    out = convert_checkpoint(write_hf(tmp_path / "hf", cfg, sd), tmp_path / "conv", progress=False)
    meta = json.loads((out / "nosa_jax.json").read_text())
    assert "model.rotary_emb.inv_freq" in meta["ignored_tensors"]
    del sd["model.rotary_emb.inv_freq"], sd["model.layers.0.self_attn.rotary_emb.inv_freq"]
    assert_tree_equal(load_params(out)[1], expected_params(sd, cfg))


@pytest.mark.skipif(not FIXTURES, reason=f"no upstream fixtures under {FIXTURE_ROOT}")
@pytest.mark.parametrize("fixture", FIXTURES, ids=[p.name for p in FIXTURES])
def test_upstream_fixture(fixture, tmp_path):
    from safetensors.numpy import load_file

    out = convert_checkpoint(fixture, tmp_path / "conv", progress=False)
    cfg_conv, p_conv = load_params(out)
    cfg_hf, p_hf = load_params(fixture)
    assert cfg_conv == cfg_hf == ModelConfig.from_json(fixture / "config.json")
    assert_tree_equal(p_conv, jax.tree.map(np.asarray, p_hf), np.float32)
    sd = load_file(str(fixture / "model.safetensors"))
    assert_tree_equal(p_conv, expected_params(sd, json.loads((fixture / "config.json").read_text())))


@pytest.mark.skipif(not (FIXTURE_ROOT / "T-40" / "expected.npz").is_file(),
                    reason=f"upstream fixture {FIXTURE_ROOT / 'T-40'} not available")
def test_upstream_fixture_logits(tmp_path):
    """End to end: a converted upstream checkpoint reproduces upstream's logits."""
    fixture = FIXTURE_ROOT / "T-40"
    exp = np.load(fixture / "expected.npz")
    model = load_model(convert_checkpoint(fixture, tmp_path / "conv", progress=False))
    out = model(jnp.asarray(exp["input_ids"])[None], positions=jnp.asarray(exp["positions"])[None])
    np.testing.assert_allclose(np.asarray(out.logits[0]), exp["logits"], atol=1e-4, rtol=0)


def test_overwrite(hf, tmp_path):
    hf_dir, cfg, sd = hf
    out = tmp_path / "conv"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(ConversionError, match="already exists.*overwrite=True"):
        convert_checkpoint(hf_dir, out, progress=False)
    assert os.listdir(out) == ["old.txt"]
    # a failing conversion with overwrite=True keeps the old directory untouched
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps(tiny_config()))
    with pytest.raises(ConversionError, match="no weight files"):
        convert_checkpoint(tmp_path / "bad", out, overwrite=True, progress=False)
    assert os.listdir(out) == ["old.txt"]
    convert_checkpoint(hf_dir, out, overwrite=True, progress=False)
    assert "old.txt" not in os.listdir(out) and (out / "nosa_jax.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "conv", "hf"]
    assert_tree_equal(load_params(out)[1], expected_params(sd, cfg))
    with pytest.raises(ConversionError, match="choose an output path outside"):
        convert_checkpoint(hf_dir, hf_dir, overwrite=True, progress=False)
    with pytest.raises(ConversionError, match="choose an output path outside"):
        convert_checkpoint(hf_dir, tmp_path, overwrite=True, progress=False)


# ------------------------------------------------------------------------------------------------
# bad inputs: a clear error naming the problem and the fix, and nothing left behind


def test_error_missing_directory(tmp_path):
    fail(tmp_path / "nope", tmp_path, r"nope does not exist; check the path")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_params(tmp_path / "nope")


def test_error_missing_config(hf, tmp_path):
    hf_dir, _, _ = hf
    (hf_dir / "config.json").unlink()
    fail(hf_dir, tmp_path, r"has no config.json.*download it")
    with pytest.raises(CheckpointError, match="neither a converted nosa-jax checkpoint"):
        load_params(hf_dir)


def test_error_no_weight_files(hf, tmp_path):
    hf_dir, _, _ = hf
    (hf_dir / "model.safetensors").unlink()
    msg = fail(hf_dir, tmp_path, "no weight files found")
    for name in ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                 "pytorch_model.bin"):
        assert name in msg
    (hf_dir / "weights.safetensors").write_bytes(b"x")
    fail(hf_dir, tmp_path, r"found \['weights.safetensors'\].*name a single file model.safetensors")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_error_corrupt_safetensors(hf, tmp_path, damage):
    hf_dir, _, _ = hf
    f = hf_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"truncate": data[:-1000], "garbage": b"not a safetensors file at all",
                   "empty": b""}[damage])
    fail(hf_dir, tmp_path, r"model.safetensors is not a readable safetensors file .*corrupt or "
                           r"truncated.*re-download")


def test_error_index_missing_shard(tmp_path):
    cfg = tiny_config()
    hf_dir = write_hf(tmp_path / "hf", cfg, tiny_state_dict(cfg), shards=2)
    (hf_dir / "model-00002-of-00002.safetensors").unlink()
    fail(hf_dir, tmp_path, r"references shard file\(s\) \['model-00002-of-00002.safetensors'\] "
                           r"that are missing.*download the missing shard")


def test_error_index_inconsistent(tmp_path):
    cfg = tiny_config()
    hf_dir = write_hf(tmp_path / "hf", cfg, tiny_state_dict(cfg), shards=2)
    idx = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    idx["weight_map"]["model.norm.weight"] = ("model-00002-of-00002.safetensors"
                                             if idx["weight_map"]["model.norm.weight"].startswith(
                                                 "model-00001") else "model-00001-of-00002.safetensors")
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(idx))
    fail(hf_dir, tmp_path, r"does not match its shards: model.norm.weight")
    (hf_dir / "model.safetensors.index.json").write_text("{not json")
    fail(hf_dir, tmp_path, r"model.safetensors.index.json is not valid JSON")


def test_error_shape_mismatch(tmp_path):
    cfg = tiny_config()
    sd = tiny_state_dict(cfg)
    sd["model.layers.1.self_attn.k_proj.weight"] = np.zeros((HK * D + 1, H), np.float32)
    sd["model.layers.0.self_attn.delta.weight"] = np.zeros((HK * D, HK), np.float32)  # transposed
    msg = fail(write_hf(tmp_path / "hf", cfg, sd), tmp_path, "shape")
    assert "model.layers.1.self_attn.k_proj.weight: expected [16, 32], found [17, 32]" in msg
    assert "model.layers.0.self_attn.delta.weight: expected [2, 16], found [16, 2]" in msg
    assert "use the config that came with these weights" in msg
    # a config.json of another size
    msg = fail(write_hf(tmp_path / "hf2", tiny_config(hidden_size=48), tiny_state_dict(cfg)),
               tmp_path, "shape")
    assert "model.embed_tokens.weight: expected [64, 48], found [64, 32]" in msg


def test_error_missing_and_unexpected(tmp_path):
    cfg = tiny_config()
    sd = tiny_state_dict(cfg)
    for k in ("model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight",
              "model.norm.weight"):
        del sd[k]
    msg = fail(write_hf(tmp_path / "a", cfg, sd), tmp_path, "missing tensor")
    assert "model.layers.{0-1}.mlp.up_proj.weight" in msg and "model.norm.weight" in msg
    assert "num_hidden_layers" in msg

    sd = tiny_state_dict(cfg)
    sd["model.layers.2.mlp.up_proj.weight"] = sd["model.layers.1.mlp.up_proj.weight"]
    sd["model.layers.0.self_attn.q_norm.weight"] = np.ones(D, np.float32)
    msg = fail(write_hf(tmp_path / "b", cfg, sd), tmp_path, "unexpected tensor")
    assert "model.layers.0.self_attn.q_norm.weight" in msg and "model.layers.2.mlp.up_proj.weight" in msg

    sd = tiny_state_dict(cfg)  # biases present although the config has none
    sd["model.layers.0.self_attn.q_proj.bias"] = np.zeros(HQ * D, np.float32)
    fail(write_hf(tmp_path / "c", cfg, sd), tmp_path,
         r"unexpected.*q_proj.bias.*set \"attention_bias\": true in config.json")
    sd = tiny_state_dict(cfg)  # the model has an o_proj bias too when attention_bias is set
    sd["model.layers.1.self_attn.o_proj.bias"] = np.zeros(H, np.float32)
    fail(write_hf(tmp_path / "c2", cfg, sd), tmp_path,
         r"unexpected.*o_proj.bias.*set \"attention_bias\": true in config.json")
    sd = tiny_state_dict(tiny_config(mlp_bias=True))
    fail(write_hf(tmp_path / "d", cfg, sd), tmp_path, r"set \"mlp_bias\": true in config.json")


def test_error_partial_nosa_weights(tmp_path):
    cfg = tiny_config()
    sd = tiny_state_dict(cfg)
    del sd["model.layers.1.self_attn.A"], sd["model.layers.1.self_attn.delta.weight"]
    msg = fail(write_hf(tmp_path / "hf", cfg, sd), tmp_path, "NOSA eviction weights are only partly")
    assert "model.layers.1.self_attn.A" in msg and "model.layers.1.self_attn.delta.weight" in msg


def test_error_untied_without_lm_head(tmp_path):
    cfg = tiny_config()
    sd = tiny_state_dict(cfg)
    del sd["lm_head.weight"]
    fail(write_hf(tmp_path / "hf", cfg, sd), tmp_path,
         r"lm_head.weight is missing.*set \"tie_word_embeddings\": true")


@pytest.mark.parametrize("over, field", [
    ({"model_type": "mistral"}, "model_type"),
    ({"hidden_act": "tanh"}, "hidden_act"),
    ({"sliding_window": 128}, "sliding_window"),
    ({"nosa": {"block_size": 60}}, "nosa.block_size"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_scaling"),
])
def test_error_unsupported_config(tmp_path, over, field):
    sd = tiny_state_dict(tiny_config())
    msg = fail(write_hf(tmp_path / "hf", tiny_config(**over), sd), tmp_path, re.escape(field))
    assert "config.json" in msg


def test_error_bad_config_json(hf, tmp_path):
    hf_dir, _, _ = hf
    (hf_dir / "config.json").write_text("{oops")
    fail(hf_dir, tmp_path, "config.json is not valid JSON")


def test_error_unsupported_dtypes(tmp_path):
    cfg = tiny_config()
    hf_dir = write_hf(tmp_path / "hf", cfg, tiny_state_dict(cfg))
    fail(hf_dir, tmp_path, r"unsupported dtype 'int8'.*float32", dtype="int8")
    sd = tiny_state_dict(cfg)
    sd["model.norm.weight"] = np.ones(H, np.int32)
    fail(write_hf(tmp_path / "q", cfg, sd), tmp_path, r"model.norm.weight \(int32\).*quantized")
    sd = tiny_state_dict(cfg)
    sd["model.norm.weight"] = np.full(H, 1e6, np.float32)
    fail(write_hf(tmp_path / "big", cfg, sd), tmp_path, r"model.norm.weight overflows float16.*bfloat16",
         dtype="float16")


def test_error_while_writing_leaves_nothing(hf, tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    def boom(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", boom)
    fail(hf[0], tmp_path, r"No space left on device.*free disk space")


def test_torch_bin_needs_torch(hf, tmp_path, monkeypatch):
    hf_dir, _, _ = hf
    (hf_dir / "model.safetensors").rename(hf_dir / "pytorch_model.bin")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    fail(hf_dir, tmp_path, r"pytorch_model.bin, which needs PyTorch.*`pip install torch`")


def test_torch_bin(tmp_path):
    torch = pytest.importorskip("torch", reason="torch is not installed: the .bin reading path "
                                                "(optional dependency) is not exercised")
    cfg = tiny_config()
    sd = tiny_state_dict(cfg, seed=19)
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    names = sorted(sd)
    wm = {}
    for s, part in enumerate((names[::2], names[1::2])):
        fname = f"pytorch_model-{s + 1:05d}-of-00002.bin"
        torch.save({k: torch.from_numpy(sd[k]).to(torch.bfloat16) for k in part}, hf_dir / fname)
        wm.update({k: fname for k in part})
    (hf_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))
    out = convert_checkpoint(hf_dir, tmp_path / "conv", progress=False)
    want = jax.tree.map(lambda a: a.astype(ml_dtypes.bfloat16), expected_params(sd, cfg))
    assert_tree_equal(load_params(out)[1], want, jnp.bfloat16)


# ------------------------------------------------------------------------------------------------
# loader errors on converted directories


def test_loader_errors(hf, tmp_path):
    hf_dir, _, _ = hf
    out = convert_checkpoint(hf_dir, tmp_path / "conv", progress=False)
    with pytest.raises(CheckpointError, match="unsupported dtype"):
        load_params(out, dtype="float64")
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=I + 8)))
    with pytest.raises(CheckpointError, match=r"mlp.gate_up_proj.kernel: config expects \[2, 32, 112\], "
                                              r"stored \[2, 32, 96\].*re-run the conversion"):
        load_params(out)
    (out / "config.json").write_text(json.dumps(cfg))
    meta = json.loads((out / "nosa_jax.json").read_text())
    (out / "nosa_jax.json").write_text(json.dumps(dict(meta, format_version=99)))
    with pytest.raises(CheckpointError, match="format_version 99 is not supported"):
        load_params(out)
    (out / "nosa_jax.json").write_text(json.dumps(meta))
    import shutil

    shutil.rmtree(out / "params")
    with pytest.raises(CheckpointError, match="no params/ directory.*re-run"):
        load_params(out)


@pytest.mark.parametrize("version", [1, 2])
def test_older_format_directory_is_fused_on_load(tmp_path, version):
    """A directory converted before projections were fused loads in the fused layout: format 1 has
    separate layers.self_attn.{q,k,v}_proj and layers.mlp.{gate,up}_proj, format 2 the fused
    qkv_proj but separate gate/up. A damaged one is still reported."""
    import shutil

    import orbax.checkpoint as ocp

    cfg = tiny_config(attention_bias=True, mlp_bias=True)
    sd = tiny_state_dict(cfg, seed=31)
    out = convert_checkpoint(write_hf(tmp_path / "hf", cfg, sd), tmp_path / "conv", progress=False)

    def separate(module, names):
        return {m: {leaf: np.stack([sd[f"model.layers.{i}.{module}.{m}.{hf}"].T for i in range(L)])
                    for leaf, hf in (("kernel", "weight"), ("bias", "bias"))} for m in names}

    def write_old(drop=()):
        old = expected_params(sd, cfg)
        split = [("mlp", "gate_up_proj", ("gate_proj", "up_proj"))]
        if version == 1:
            split.append(("self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj")))
        for module, fused, names in split:
            mod = old["layers"][module]
            del mod[fused]
            mod.update(separate(module, [m for m in names if m not in drop]))
        shutil.rmtree(out / "params")
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(out / "params", old)
            ckptr.wait_until_finished()
        meta = json.loads((out / "nosa_jax.json").read_text())
        (out / "nosa_jax.json").write_text(json.dumps(dict(meta, format_version=version)))

    write_old()
    assert_tree_equal(load_params(out)[1], expected_params(sd, cfg), np.float32)
    want16 = jax.tree.map(lambda a: a.astype(ml_dtypes.bfloat16), expected_params(sd, cfg))
    assert_tree_equal(load_params(out, dtype="bfloat16")[1], want16, jnp.bfloat16)
    load_model(out, mode="full")  # builds
    write_old(drop=("up_proj",))
    with pytest.raises(CheckpointError, match=r"missing layers.mlp.gate_up_proj.bias.*unexpected "
                                              r"layers.mlp.gate_proj.bias.*re-run the conversion"):
        load_params(out)


def test_public_api():
    assert issubclass(ConversionError, ValueError) and issubclass(CheckpointError, ValueError)
    assert convert.convert_checkpoint is convert_checkpoint


def test_export_to_hf_names_round_trips(tmp_path):
    """convert.hf.to_hf_state_dict (Flax -> upstream names) is the exact inverse of the loader."""
    import json as _json

    from safetensors.numpy import save_file as _save

    from convert.hf import to_hf_state_dict
    from nosa_jax.checkpoint import flatten_params, load_params
    from nosa_jax.config import ModelConfig, NosaConfig
    from nosa_jax.model import NosaForCausalLM
    from flax import nnx

    cfg = ModelConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=4, attention_bias=True,
                      mlp_bias=True, nosa=NosaConfig(kernel_size=8, kernel_stride=4, block_size=8,
                                                      init_blocks=1, local_blocks=1, topk=6, qk_select=4))
    params = nnx.to_pure_dict(nnx.state(NosaForCausalLM(cfg, rngs=nnx.Rngs(3)), nnx.Param))
    sd = to_hf_state_dict(cfg, params)
    assert "model.layers.2.self_attn.delta.bias" in sd and sd["model.layers.1.self_attn.A"].shape == (2,)
    _save(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(_json.dumps(cfg.to_hf_dict()))
    _, back = load_params(tmp_path)
    want, got = flatten_params(params), flatten_params(back)
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=str(k))
