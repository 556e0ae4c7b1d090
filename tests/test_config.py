"""ModelConfig / NosaConfig parsing and validation (spec sections 1.3 and 2.1)."""

import copy
import dataclasses
import json

import pytest

from nosa_jax.config import ConfigError, ModelConfig, NosaConfig

from conftest import FIXTURES, fixture_cases

UPSTREAM = dict(kernel_size=32, kernel_stride=16, block_size=64, init_blocks=1, local_blocks=16,
                topk=64, qk_select=33)

BASE = {
    "model_type": "llama",
    "vocab_size": 100,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
}


def hf(**kw):
    d = copy.deepcopy(BASE)
    for k, v in kw.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    return d


def raises(fn, *fields):
    """fn() must raise ConfigError whose message names every given field."""
    with pytest.raises(ConfigError) as ei:
        fn()
    msg = str(ei.value)
    for f in fields:
        assert f in msg, f"ConfigError message does not name {f!r}: {msg}"
    return msg


# ------------------------------------------------------------------ defaults and overrides

def test_nosa_defaults_are_upstream():
    assert dataclasses.asdict(NosaConfig()) == UPSTREAM
    assert NosaConfig().forced_blocks == 18  # block 0 + 16 local + the current block
    assert NosaConfig().pool_stride == 4
    assert dataclasses.asdict(ModelConfig.from_hf_dict(hf()).nosa) == UPSTREAM
    assert dataclasses.asdict(NosaConfig.from_dict(None)) == UPSTREAM


def test_hf_fields_read():
    c = ModelConfig.from_hf_dict(hf(rms_norm_eps=1e-5, rope_theta=5e5, tie_word_embeddings=True,
                                    eos_token_id=[2, 7], bos_token_id=1, max_position_embeddings=4096))
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (100, 64, 128, 2)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.num_groups) == (4, 2, 16, 2)
    assert c.rms_norm_eps == 1e-5 and c.rope_theta == 5e5 and c.tie_word_embeddings
    assert c.eos_token_ids == (2, 7) and c.bos_token_id == 1 and c.max_position_embeddings == 4096
    # head_dim and num_key_value_heads are optional in HF Llama configs
    c = ModelConfig.from_hf_dict(hf(head_dim=None, num_key_value_heads=None))
    assert c.head_dim == 64 // 4 and c.num_key_value_heads == 4


def test_nosa_section_overrides():
    sec = dict(kernel_size=8, kernel_stride=4, block_size=8, init_blocks=1, local_blocks=1, topk=6,
               qk_select=4)
    c = ModelConfig.from_hf_dict(hf(nosa=sec))
    assert dataclasses.asdict(c.nosa) == sec
    partial = ModelConfig.from_hf_dict(hf(nosa={"topk": 80}))
    assert partial.nosa.topk == 80 and partial.nosa.qk_select == 33 and partial.nosa.block_size == 64


def test_keyword_overrides_win_over_section():
    c = ModelConfig.from_hf_dict(hf(nosa={"topk": 80, "qk_select": 40}), nosa_overrides={"topk": 70})
    assert c.nosa.topk == 70 and c.nosa.qk_select == 40
    n = NosaConfig.from_dict({"topk": 80}, topk=50, local_blocks=8)
    assert n.topk == 50 and n.local_blocks == 8 and n.kernel_size == 32
    # None means "not overridden"
    assert NosaConfig.from_dict({"topk": 80}, topk=None).topk == 80
    raises(lambda: NosaConfig.from_dict({}, bogus=3), "bogus")


# ------------------------------------------------------------------ informational keys

@pytest.mark.parametrize("case", fixture_cases("config.json"))
def test_fixture_configs_load(case):
    raw = json.loads((FIXTURES / case / "config.json").read_text())
    c = ModelConfig.from_json(FIXTURES / case / "config.json")
    assert dataclasses.asdict(c.nosa) == {k: raw["nosa"][k] for k in UPSTREAM}
    assert c.num_attention_heads == raw["num_attention_heads"] and c.head_dim == raw["head_dim"]
    assert c.rope_type == (raw.get("rope_scaling") or {}).get("rope_type", "default")


def test_informational_keys_accepted_when_consistent():
    sec = dict(UPSTREAM, window_size=1024, select_blocks=16, use_nope=False, dense_len=0,
               attn_implementation="sdpa", note="for information only")
    assert dataclasses.asdict(NosaConfig.from_dict(sec)) == UPSTREAM
    # consistency is judged against the OTHER settings, not the upstream constants
    small = dict(block_size=32, local_blocks=4, init_blocks=2, qk_select=10, topk=20, kernel_size=16,
                 kernel_stride=8, window_size=128, select_blocks=4)
    n = NosaConfig.from_dict(small)
    assert (n.local_blocks, n.qk_select) == (4, 10)


@pytest.mark.parametrize("key,value", [
    ("window_size", 512),        # != local_blocks * block_size = 1024
    ("select_blocks", 8),        # != qk_select - init_blocks - local_blocks = 16
    ("use_nope", True),
    ("dense_len", 4096),
    ("attn_implementation", "eager"),
])
def test_informational_keys_rejected_when_inconsistent(key, value):
    raises(lambda: NosaConfig.from_dict(dict(UPSTREAM, **{key: value})), key)
    raises(lambda: ModelConfig.from_hf_dict(hf(nosa={key: value})), key)


def test_unknown_nosa_key_rejected():
    raises(lambda: NosaConfig.from_dict({"topk": 64, "top_k": 64}), "top_k")
    raises(lambda: ModelConfig.from_hf_dict(hf(nosa={"kernel_len": 32})), "kernel_len")


# ------------------------------------------------------------------ validation

def test_nosa_value_validation():
    raises(lambda: NosaConfig(qk_select=65), "qk_select", "topk")
    raises(lambda: NosaConfig(local_blocks=40), "qk_select")  # 1 + 40 + 1 forced > 33 picks
    raises(lambda: NosaConfig(init_blocks=20, local_blocks=13), "qk_select")  # 34 forced
    NosaConfig(init_blocks=20, local_blocks=12)  # 33 forced: fits
    NosaConfig(init_blocks=1, local_blocks=31, qk_select=33)  # exactly fits: 33 forced
    raises(lambda: NosaConfig(topk=0, qk_select=0), "topk")
    raises(lambda: NosaConfig(kernel_size=24), "kernel_size")  # not a multiple of the stride
    raises(lambda: NosaConfig(block_size=40), "block_size")  # not a multiple of the stride
    raises(lambda: NosaConfig(init_blocks=-1), "init_blocks")
    raises(lambda: NosaConfig(topk=64.0), "topk")
    raises(lambda: NosaConfig(topk=True), "topk")
    raises(lambda: ModelConfig.from_hf_dict(hf(nosa={"qk_select": 70})), "qk_select")


def test_model_value_validation():
    raises(lambda: ModelConfig.from_hf_dict(hf(rope_scaling={"rope_type": "yarn", "factor": 4.0})), "yarn")
    raises(lambda: ModelConfig.from_hf_dict(hf(rope_scaling={"type": "su", "factor": 4.0})), "su")
    raises(lambda: ModelConfig.from_hf_dict(hf(hidden_act="swish_glu")), "hidden_act")
    raises(lambda: ModelConfig.from_hf_dict(hf(model_type="mistral")), "model_type")
    raises(lambda: ModelConfig.from_hf_dict(hf(num_attention_heads=6, num_key_value_heads=4)),
           "num_attention_heads", "num_key_value_heads")
    raises(lambda: ModelConfig.from_hf_dict(hf(vocab_size=None)), "vocab_size")
    raises(lambda: ModelConfig.from_hf_dict(hf(head_dim=15)), "head_dim")
    raises(lambda: ModelConfig.from_hf_dict(hf(rope_scaling={"rope_type": "linear", "factor": 0.5})), "factor")
    raises(lambda: ModelConfig.from_hf_dict(hf(rope_scaling={"rope_type": "llama3", "factor": 8.0})),
           "low_freq_factor")
    raises(lambda: ModelConfig.from_hf_dict(hf(rope_scaling={"rope_type": "longrope",
                                                             "short_factor": [1.0] * 8,
                                                             "long_factor": [1.0] * 7,
                                                             "factor": 2.0})), "long_factor")
    raises(lambda: ModelConfig.from_hf_dict(hf(sliding_window=4096)), "sliding_window")
    with pytest.raises(ConfigError):
        ModelConfig.from_json(FIXTURES / "does-not-exist.json")


def test_supported_values_accepted():
    for act in ("silu", "gelu", "relu"):
        assert ModelConfig.from_hf_dict(hf(hidden_act=act)).hidden_act == act
    for rs in ({"rope_type": "linear", "factor": 2.0}, {"type": "dynamic", "factor": 2.0},
               {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192},
               {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8, "factor": 4.0}):
        c = ModelConfig.from_hf_dict(hf(rope_scaling=rs))
        assert c.rope_type == rs.get("rope_type", rs.get("type"))
    # neutral values of keys that would otherwise change the math are fine
    ModelConfig.from_hf_dict(hf(sliding_window=None, use_sliding_window=False, partial_rotary_factor=1.0))


# ------------------------------------------------------------------ round trip

ROUND_TRIP = [
    {},
    dict(tie_word_embeddings=True, eos_token_id=2, bos_token_id=1, rms_norm_eps=1e-5,
         nosa=dict(kernel_size=8, kernel_stride=4, block_size=8, init_blocks=1, local_blocks=1, topk=6,
                   qk_select=4)),
    dict(eos_token_id=[2, 5], attention_bias=True, mlp_bias=True, hidden_act="gelu",
         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}),
    dict(max_position_embeddings=32768, original_max_position_embeddings=4096,
         rope_scaling={"rope_type": "longrope", "short_factor": [1.0 + i / 10 for i in range(8)],
                       "long_factor": [2.0 + i for i in range(8)], "factor": 8.0}),
]


@pytest.mark.parametrize("extra", ROUND_TRIP, ids=["plain", "small-nosa", "llama3-bias", "longrope"])
def test_to_hf_dict_round_trip(extra):
    c = ModelConfig.from_hf_dict(hf(**extra))
    d = c.to_hf_dict()
    back = ModelConfig.from_hf_dict(json.loads(json.dumps(d)))  # through real JSON
    assert back == c
    assert hash(back) == hash(c)
    # the written dict is a Llama config carrying every NOSA setting explicitly
    assert d["model_type"] == "llama" and d["nosa"] == dataclasses.asdict(c.nosa)
    # and it differs from a config with another NOSA setting
    other = ModelConfig.from_hf_dict(hf(**dict(extra, nosa=dict(UPSTREAM, topk=63))))
    assert other != c or c.nosa.topk == 63


def test_from_json_reads_file(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps(hf(nosa={"topk": 40})))
    assert ModelConfig.from_json(p).nosa.topk == 40
    p.write_text("{not json")
    raises(lambda: ModelConfig.from_json(p), "JSON")
