"""The built-in default: a small NOSA checkpoint that the project generates deterministically.

`make_demo_checkpoint(dir, retrain=True)` writes a Hugging Face style directory (config.json,
model.safetensors with upstream parameter names, tokenizer.json) holding a 2-layer NOSA model
trained for a short while (optax, on the CPU, fixed seed) to continue a public-domain passage
shipped with the package; the result of that run ships in `data/demo_checkpoint` (1.5 MB) so the
demo starts at once.
Its NOSA settings are scaled down (block 16, top-k 6) so that block selection is really sparse at a
few hundred tokens. The demo then converts it and generates from a prompt cut from the passage,
showing how much of the true continuation the sparse-attention model reproduces.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from safetensors.numpy import save_file

from .config import ModelConfig, NosaConfig
from .model import NosaForCausalLM

DEMO_NOSA = NosaConfig(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, local_blocks=1,
                       topk=6, qk_select=4)
SEED = 20251015


def demo_text() -> str:
    return resources.files("nosa_jax").joinpath("data/demo_text.txt").read_text(encoding="utf-8")


def byte_tokenizer():
    """A byte-level tokenizer (256 byte symbols + <s>, </s>) built with the `tokenizers` library."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab["<s>"], vocab["</s>"] = 256, 257
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    return tok


def demo_config() -> ModelConfig:
    return ModelConfig(vocab_size=258, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5,
                       rope_theta=10000.0, max_position_embeddings=4096, bos_token_id=256,
                       eos_token_ids=(257,), nosa=DEMO_NOSA)


def train_demo_model(cfg: ModelConfig, ids: np.ndarray, steps: int, log=print) -> NosaForCausalLM:
    """Teacher-forced next-token training in `nosa` mode (gradients reach A and delta through the
    attention bias, as upstream trains them; the selection itself is not differentiated)."""
    model = NosaForCausalLM(cfg, mode="nosa", rngs=nnx.Rngs(SEED))
    # start the eviction heads away from zero so the bias matters from the first step
    state = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(state)
    pure["layers"]["self_attn"]["A"] = jnp.full_like(pure["layers"]["self_attn"]["A"], -0.5)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    graphdef, params = nnx.split(model, nnx.Param)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-3, weight_decay=0.0))
    opt_state = opt.init(params)
    window = 512
    starts = np.arange(0, len(ids) - window - 1, 32)

    def loss_fn(params, x, y):
        m = nnx.merge(graphdef, params)
        out = m(x)
        logp = jax.nn.log_softmax(out.logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, y[..., None], axis=-1))

    @jax.jit
    def train_step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(SEED)
    for step in range(steps):
        s = rng.choice(starts, size=6)
        x = np.stack([ids[i:i + window] for i in s])
        y = np.stack([ids[i + 1:i + window + 1] for i in s])
        params, opt_state, loss = train_step(params, opt_state, jnp.asarray(x), jnp.asarray(y))
        if step % 50 == 0 or step == steps - 1:
            log(f"  train step {step:4d}/{steps}  loss {float(loss):.3f}")
    return nnx.merge(graphdef, params)


def make_demo_checkpoint(out_dir: str | Path, *, retrain: bool = False, steps: int = 400, log=print) -> Path:
    """Put the demo HF checkpoint in `out_dir` (kept when already there).

    By default the copy shipped with the package (`data/demo_checkpoint`, produced by this very
    function) is used; `retrain=True` trains it again from scratch (a few minutes on 2 CPU cores).
    """
    out = Path(out_dir)
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file() and not retrain:
        return out
    out.mkdir(parents=True, exist_ok=True)
    if not retrain:
        shipped = resources.files("nosa_jax").joinpath("data/demo_checkpoint")
        for name in ("config.json", "tokenizer.json", "model.safetensors"):
            (out / name).write_bytes(shipped.joinpath(name).read_bytes())
        log(f"demo checkpoint (shipped with the package) -> {out}")
        return out
    tok = byte_tokenizer()
    cfg = demo_config()
    ids = np.asarray(tok.encode(demo_text()).ids, np.int32)
    log(f"training the demo NOSA model ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}) on "
        f"{len(ids)} tokens of the built-in text, {steps} steps")
    model = train_demo_model(cfg, ids, steps, log=log)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tmp = out / "model.safetensors.tmp"
    from convert.hf import to_hf_state_dict

    save_file(to_hf_state_dict(cfg, params), str(tmp))
    tok.save(str(out / "tokenizer.json"))
    hf = cfg.to_hf_dict()
    hf["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    tmp.rename(out / "model.safetensors")
    return out
