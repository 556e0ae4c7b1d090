"""nosa_jax.rope against NumPy float64 re-statements of the published Hugging Face rope types.

Formulas (transformers' ROPE_INIT_FUNCTIONS, written out independently here):
  default   inv_freq_i = 1 / theta^(2i/d)
  linear    default / factor
  dynamic   (NTK) theta' = theta * (factor * L / max_pos - (factor - 1))^(d/(d-2)), L = max(seq_len, max_pos)
  llama3    per-frequency: wavelength < orig/high -> unchanged; > orig/low -> / factor; between ->
            smooth interpolation s = (orig/wavelength - low)/(high - low): (1-s) inv/factor + s inv
  longrope  inv_freq_i = 1 / (ext_i * theta^(2i/d)), ext = short_factor (long_factor when the
            sequence is longer than original_max and switching is on); attention scaling
            sqrt(1 + ln(factor)/ln(original_max)) with factor = max_pos / original_max.
Application: GPT-NeoX rotate-half, x*cos + rotate_half(x)*sin, cos/sin = cat(freqs, freqs)*scaling.
"""



import json
import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from nosa_jax.config import ModelConfig
from nosa_jax.rope import apply_rope, rope_cos_sin, rope_parameters

# shared/ lies beside the repository (CI copies it there too)
_SHARED = next((d for d in (Path(__file__).resolve().parents[2] / "shared", Path("/work/shared"))
                if (d / "fixtures" / "upstream").is_dir()), Path("/work/shared"))
FIXTURE = _SHARED / "fixtures" / "upstream" / "R-6000"


def cfg(head_dim=32, theta=10000.0, rope_scaling=None, max_pos=2048, orig=None, switch=False):
    return ModelConfig(vocab_size=11, hidden_size=head_dim * 2, intermediate_size=8, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=head_dim, rope_theta=theta,
                       rope_scaling=rope_scaling, max_position_embeddings=max_pos,
                       original_max_position_embeddings=orig, longrope_switch=switch)


# ------------------------------------------------------------------ float64 reference formulas

def ref_default(d, theta):
    return np.array([1.0 / theta ** (2.0 * i / d) for i in range(d // 2)])


def ref_linear(d, theta, factor):
    return ref_default(d, theta) / factor


def ref_dynamic(d, theta, factor, max_pos, seq_len):
    L = max_pos if seq_len is None else max(seq_len, max_pos)
    theta2 = theta * ((factor * L / max_pos) - (factor - 1)) ** (d / (d - 2))
    return ref_default(d, theta2)


def ref_llama3(d, theta, factor, low, high, orig):
    out = []
    for f in ref_default(d, theta):
        wavelen = 2 * math.pi / f
        if wavelen < orig / high:
            out.append(f)
        elif wavelen > orig / low:
            out.append(f / factor)
        else:
            s = (orig / wavelen - low) / (high - low)
            out.append((1 - s) * f / factor + s * f)
    return np.array(out)


def ref_longrope(d, theta, short, long, max_pos, orig=None, factor=None, attention_factor=None,
                 seq_len=None, switch=False):
    """orig given: factor = max_pos / orig (Phi-3 convention); else orig = max_pos and `factor`."""
    if orig is not None:
        factor = max_pos / orig
    else:
        orig = max_pos
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    ext = np.asarray(long if (switch and seq_len is not None and seq_len > orig) else short, np.float64)
    inv = np.array([1.0 / (ext[i] * theta ** (2.0 * i / d)) for i in range(d // 2)])
    return inv, attention_factor


def check(got, want_inv, want_scaling=1.0):
    inv, scaling = got
    assert inv.shape == want_inv.shape
    np.testing.assert_allclose(inv, want_inv, rtol=2e-6, atol=0)
    assert scaling == pytest.approx(want_scaling, rel=1e-9)


# ------------------------------------------------------------------ rope_parameters

@pytest.mark.parametrize("d,theta", [(16, 10000.0), (64, 10000.0), (128, 500000.0), (32, 1e6)])
def test_default(d, theta):
    for seq_len in (None, 10, 100000):
        check(rope_parameters(cfg(d, theta), seq_len), ref_default(d, theta))
    # rope_type "default" spelled out behaves the same
    check(rope_parameters(cfg(d, theta, {"rope_type": "default"}), 5), ref_default(d, theta))


@pytest.mark.parametrize("key", ["rope_type", "type"])
def test_linear(key):
    c = cfg(64, 10000.0, {key: "linear", "factor": 4.0})
    for seq_len in (None, 7, 9000):
        check(rope_parameters(c, seq_len), ref_linear(64, 10000.0, 4.0))


@pytest.mark.parametrize("seq_len", [None, 1, 100, 2047, 2048, 2049, 3000, 8192, 65536])
def test_dynamic_ntk(seq_len):
    c = cfg(64, 10000.0, {"rope_type": "dynamic", "factor": 2.0}, max_pos=2048)
    check(rope_parameters(c, seq_len), ref_dynamic(64, 10000.0, 2.0, 2048, seq_len))
    if seq_len is not None and seq_len > 2048:  # really rescaled: lowest frequency smaller
        assert rope_parameters(c, seq_len)[0][-1] < ref_default(64, 10000.0)[-1] * (1 - 1e-4)


def test_llama3_all_three_regimes():
    rs = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
    c = cfg(128, 500000.0, rs, max_pos=131072)
    want = ref_llama3(128, 500000.0, 8.0, 1.0, 4.0, 8192)
    base = ref_default(128, 500000.0)
    # the parameters really exercise the unchanged, divided and interpolated regimes
    assert np.any(want == base) and np.any(np.isclose(want, base / 8)) and np.any(
        (want < base) & (want > base / 8) & ~np.isclose(want, base / 8))
    for seq_len in (None, 1000, 200000):
        check(rope_parameters(c, seq_len), want)


def _longrope_factors(half, seed=0):
    rng = np.random.default_rng(seed)
    short = np.round(1 + np.cumsum(rng.uniform(0.1, 0.5, half)), 6).tolist()
    long = np.round(1 + np.cumsum(rng.uniform(0.5, 1.5, half)), 6).tolist()
    return short, long


@pytest.mark.parametrize("seq_len", [None, 100, 4096, 4097, 6000, 40000])
@pytest.mark.parametrize("switch", [False, True])
def test_longrope_top_level_original(seq_len, switch):
    short, long = _longrope_factors(16)
    rs = {"rope_type": "longrope", "short_factor": short, "long_factor": long, "factor": 8.0}
    c = cfg(32, 10000.0, rs, max_pos=32768, orig=4096, switch=switch)
    want = ref_longrope(32, 10000.0, short, long, 32768, orig=4096, seq_len=seq_len, switch=switch)
    check(rope_parameters(c, seq_len), *want)
    assert want[1] == pytest.approx(math.sqrt(1 + math.log(8) / math.log(4096)))
    uses_long = switch and seq_len is not None and seq_len > 4096
    # the switch really changes the frequencies (and only past original_max)
    static = ref_longrope(32, 10000.0, short, long, 32768, orig=4096)[0]
    assert np.allclose(rope_parameters(c, seq_len)[0], static, rtol=1e-6) == (not uses_long)


def test_longrope_original_inside_rope_scaling_and_attention_factor():
    """Spec section 8: original_max_position_embeddings is read at the top level OR inside
    rope_scaling; an explicit attention_factor wins over the computed one."""
    short, long = _longrope_factors(16, seed=1)
    inside = {"rope_type": "longrope", "short_factor": short, "long_factor": long,
              "original_max_position_embeddings": 4096}
    want = ref_longrope(32, 10000.0, short, long, 32768, orig=4096)
    check(rope_parameters(cfg(32, 10000.0, inside, max_pos=32768), 6000), *want)
    c = cfg(32, 10000.0, inside, max_pos=32768, switch=True)
    check(rope_parameters(c, 6000), *ref_longrope(32, 10000.0, short, long, 32768, orig=4096, seq_len=6000,
                                                   switch=True))
    explicit = dict(inside, attention_factor=1.5)
    check(rope_parameters(cfg(32, 10000.0, explicit, max_pos=32768), 10),
          *ref_longrope(32, 10000.0, short, long, 32768, orig=4096, attention_factor=1.5))


def test_longrope_factor_only_and_no_scaling():
    short, long = _longrope_factors(8, seed=2)
    # no original_max anywhere: original = max_position_embeddings, factor from rope_scaling
    rs = {"rope_type": "longrope", "short_factor": short, "long_factor": long, "factor": 4.0}
    want = ref_longrope(16, 10000.0, short, long, 2048, factor=4.0)
    assert want[1] == pytest.approx(math.sqrt(1 + math.log(4.0) / math.log(2048)))
    check(rope_parameters(cfg(16, 10000.0, rs, max_pos=2048), 100), *want)
    c = cfg(16, 10000.0, rs, max_pos=2048, switch=True)
    check(rope_parameters(c, 3000), *ref_longrope(16, 10000.0, short, long, 2048, factor=4.0, seq_len=3000,
                                                   switch=True))
    # max_pos == original_max -> factor 1 -> no attention scaling
    rs1 = {"rope_type": "longrope", "short_factor": short, "long_factor": long}
    check(rope_parameters(cfg(16, 10000.0, rs1, max_pos=4096, orig=4096), 10),
          *ref_longrope(16, 10000.0, short, long, 4096, orig=4096))
    assert rope_parameters(cfg(16, 10000.0, rs1, max_pos=4096, orig=4096), 10)[1] == 1.0


# ------------------------------------------------------------------ upstream fixture

def test_fixture_r6000_rope_parameters():
    exp = np.load(FIXTURE / "expected.npz")
    c = ModelConfig.from_json(FIXTURE / "config.json")
    inv, scaling = rope_parameters(c, int(exp["input_ids"].shape[0]))
    np.testing.assert_allclose(inv, exp["rope_inv_freq"], rtol=1e-6, atol=0)
    assert scaling == pytest.approx(float(exp["rope_attention_scaling"]), rel=1e-6)
    # our own formula, from the raw config.json, reproduces the upstream numbers too
    raw = json.loads((FIXTURE / "config.json").read_text())
    rs = raw["rope_scaling"]
    want_inv, want_s = ref_longrope(raw["head_dim"], raw["rope_theta"], rs["short_factor"], rs["long_factor"],
                                    raw["max_position_embeddings"], orig=raw["original_max_position_embeddings"])
    np.testing.assert_allclose(want_inv, exp["rope_inv_freq"], rtol=1e-6)
    assert want_s == pytest.approx(float(exp["rope_attention_scaling"]), rel=1e-6)
    # upstream is static (short_factor even at 6000 > 4096); the switching variant is not
    c_sw = ModelConfig.from_json(FIXTURE / "config.json", longrope_switch=True)
    inv_sw, _ = rope_parameters(c_sw, 6000)
    assert not np.allclose(inv_sw, exp["rope_inv_freq"], rtol=1e-3)
    np.testing.assert_allclose(inv_sw, ref_longrope(raw["head_dim"], raw["rope_theta"], rs["short_factor"],
                                                    rs["long_factor"], raw["max_position_embeddings"],
                                                    orig=4096, seq_len=6000, switch=True)[0], rtol=2e-6)


# ------------------------------------------------------------------ application

def np_rotate_half(x):
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def np_apply_rope(x, positions, inv_freq, scaling):
    """HF: freqs = positions (fp32) * inv_freq (fp32) in fp32; cos/sin of cat(freqs, freqs)."""
    freqs = positions.astype(np.float32)[..., None] * np.asarray(inv_freq, np.float32)  # fp32 product
    emb = np.concatenate([freqs, freqs], axis=-1).astype(np.float64)
    cos, sin = np.cos(emb) * scaling, np.sin(emb) * scaling
    x = x.astype(np.float64)
    return x * cos[:, :, None, :] + np_rotate_half(x) * sin[:, :, None, :]


@pytest.mark.parametrize("name", ["default", "longrope"])
def test_apply_rope_vs_numpy(name):
    rng = np.random.default_rng(5)
    d = 32
    if name == "default":
        inv, scaling = rope_parameters(cfg(d, 10000.0))
    else:
        short, long = _longrope_factors(d // 2)
        inv, scaling = rope_parameters(cfg(d, 10000.0, {"rope_type": "longrope", "short_factor": short,
                                                        "long_factor": long}, max_pos=32768, orig=4096))
        assert scaling > 1.05
    B, T, H = 2, 40, 3
    positions = np.stack([np.arange(T), rng.integers(0, 6000, size=T)]).astype(np.int32)
    x = rng.normal(size=(B, T, H, d)).astype(np.float32)
    cos, sin = rope_cos_sin(jnp.asarray(positions), inv, scaling, jnp.float32)
    got = np.asarray(apply_rope(jnp.asarray(x), cos, sin))
    want = np_apply_rope(x, positions, inv, scaling)
    np.testing.assert_allclose(got, want, atol=3e-5, rtol=1e-5)
    # norm preserved up to the scaling (a rotation per frequency pair)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), scaling * np.linalg.norm(x, axis=-1), rtol=1e-5)
    # bfloat16 cos/sin (the HF cast to the activation dtype) stay within bf16 rounding
    cos16, sin16 = rope_cos_sin(jnp.asarray(positions), inv, scaling, jnp.bfloat16)
    assert cos16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(cos16, np.float32), np.asarray(cos), atol=1e-2)


def test_apply_rope_layout_is_rotate_half():
    """Pair (i, i + d/2) rotates by position * inv_freq_i (GPT-NeoX), not interleaved pairs."""
    d = 8
    inv = np.array([1.0, 0.1, 0.01, 0.001], np.float32)
    x = np.zeros((1, 1, 1, d), np.float32)
    x[..., 1] = 1.0  # first half, frequency index 1
    pos = np.array([[3]], np.int32)
    cos, sin = rope_cos_sin(jnp.asarray(pos), inv, 1.0, jnp.float32)
    got = np.asarray(apply_rope(jnp.asarray(x), cos, sin))[0, 0, 0]
    want = np.zeros(d)
    want[1], want[1 + d // 2] = math.cos(0.3), math.sin(0.3)
    np.testing.assert_allclose(got, want, atol=1e-6)
    # position 0 is the identity (times the scaling)
    cos, sin = rope_cos_sin(jnp.zeros((1, 1), jnp.int32), inv, 1.25, jnp.float32)
    np.testing.assert_allclose(np.asarray(apply_rope(jnp.asarray(x), cos, sin)), 1.25 * x, atol=1e-7)
