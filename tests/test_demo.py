"""The built-in default: the shipped demo checkpoint converts and generates; retraining writes a
loadable checkpoint with upstream names."""

import numpy as np

from nosa_jax.checkpoint import load_model
from nosa_jax.cli import main as cli_main
from nosa_jax.demo import byte_tokenizer, demo_text, make_demo_checkpoint
from nosa_jax.generate import generate


def test_demo_command(tmp_path, capsys):
    assert cli_main(["demo", "--workdir", str(tmp_path), "--modes", "nosa", "--max-new-tokens", "48",
                     "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "matches the true continuation" in out
    assert (tmp_path / "converted" / "nosa_jax.json").is_file()


def test_shipped_demo_model_continues_the_text(tmp_path):
    """The shipped model was trained with NOSA attention: in nosa mode it continues the passage."""
    hf = make_demo_checkpoint(tmp_path / "hf")
    model = load_model(hf, mode="nosa")
    tok = byte_tokenizer()
    text = demo_text()
    prompt = tok.encode(text[:300]).ids
    truth = tok.encode(text[300:]).ids[:60]
    got = generate(model, [prompt], max_new_tokens=60, eos_ids=[]).tokens[0]
    assert np.mean(np.array(got) == np.array(truth)) > 0.8


def test_demo_retrain_writes_loadable_checkpoint(tmp_path):
    hf = make_demo_checkpoint(tmp_path / "hf", retrain=True, steps=2, log=lambda *_: None)
    assert {p.name for p in hf.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json"}
    model = load_model(hf, mode="nosa")
    assert model.cfg.nosa.block_size == 16
    out = model(np.asarray([[1, 2, 3, 4]]))
    assert np.isfinite(np.asarray(out.logits)).all()


def test_generate_text_api(tmp_path):
    model = load_model(make_demo_checkpoint(tmp_path / "hf"), mode="nosa")
    tok = byte_tokenizer()
    text = demo_text()
    res = generate(model, [text[:300]], max_new_tokens=30, tokenizer=tok, eos_ids=[])
    assert res.texts[0].startswith(text[300:310])
