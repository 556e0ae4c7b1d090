"""Small random NOSA models for tests (weights large enough that selections are well separated)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nosa_jax.config import ModelConfig, NosaConfig
from nosa_jax.model import NosaForCausalLM

SMALL_NOSA = NosaConfig(kernel_size=8, kernel_stride=4, block_size=8, init_blocks=1, local_blocks=1,
                        topk=6, qk_select=4)


def small_config(**kw) -> ModelConfig:
    base = dict(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
                nosa=SMALL_NOSA, max_position_embeddings=4096)
    base.update(kw)
    return ModelConfig(**base)


def triton_small_config(**kw) -> ModelConfig:
    """small_config at shapes the Pallas Triton kernels accept (head_dim 16, block 16)."""
    return small_config(head_dim=16, nosa=NosaConfig(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1,
                                                     local_blocks=1, topk=4, qk_select=3), **kw)


def random_model(cfg: ModelConfig, mode: str, seed: int = 0, std: float = 0.35) -> NosaForCausalLM:
    """Random weights with a non-trivial eviction head (A of both signs) in the given mode."""
    model = NosaForCausalLM(cfg, mode=mode, rngs=nnx.Rngs(seed))
    state = nnx.state(model, nnx.Param)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "weight":  # norms
            val = 1.0 + 0.1 * rng.standard_normal(leaf.shape)
        elif name == "A":
            val = rng.uniform(-2.0, 1.0, leaf.shape)
        else:
            val = std * rng.standard_normal(leaf.shape)
        return jnp.asarray(val, leaf.dtype)

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state)))
    nnx.update(model, state)
    return model


def h200_lowering_text(fn, *args) -> str:
    """StableHLO of jit(fn) lowered for CUDA on an abstract H200 (no GPU needed): lets CPU tests
    check what the Triton kernels will be compiled with (grid, shapes, no per-layer copies)."""
    dev = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=dev)
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def verified_triton_modules(fn, *args):
    """Cross-lower jit(fn) for CUDA on an abstract H200 (no GPU needed) and run the MLIR verifier
    on every Triton module Pallas builds (the op constraints Triton itself checks, e.g. power-of-two
    tensor sizes). Returns (StableHLO text, [Triton module asm])."""
    from jax._src.pallas.triton import pallas_call_registration as pcr

    modules = []
    original = pcr.lowering.lower_jaxpr_to_triton_module

    def verified(*a, **kw):
        res = original(*a, **kw)
        assert res.module.operation.verify()
        modules.append(res.module.operation.get_asm())
        return res

    pcr.lowering.lower_jaxpr_to_triton_module = verified
    try:
        txt = h200_lowering_text(fn, *args)
    finally:
        pcr.lowering.lower_jaxpr_to_triton_module = original
    return txt, modules


_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%\S+\s*=\s*(.*?)\s+([\w\-]+)\(")


def hlo_instructions(hlo: str, fused: bool = True) -> list[tuple[str, str, str]]:
    """(result type, opcode, line) of the instructions of a compiled HLO module; fused=False
    leaves out those inside fused computations (the bodies of fusion instructions, which make no
    buffer of their own: a whole-layer dynamic-slice in a fusion that then gathers a few rows
    reads only those rows)."""
    skip = set() if fused else set(re.findall(r"\sfusion\(.*?calls=%([\w.\-]+)", hlo))
    out, inside = [], None
    for ln in hlo.splitlines():
        head = re.match(r"^(?:ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$", ln)
        if head:
            inside = head.group(1)
        elif ln.startswith("}"):
            inside = None
        elif inside is not None and inside not in skip and (m := _INSTRUCTION.match(ln)):
            out.append((m.group(1), m.group(2), ln.strip()[:200]))
    return out


def hlo_shape(a) -> str:
    """An array's type as HLO text writes it, e.g. "bf16[4,16,128]"."""
    names = {"bfloat16": "bf16", "float16": "f16", "float32": "f32", "int32": "s32", "uint32": "u32", "bool": "pred"}
    return f"{names[a.dtype.name]}[{','.join(map(str, a.shape))}]"


def copies_of(hlo: str, shapes) -> list[str]:
    """Copy instructions (`copy`, `copy-start`; also inside fusions) of a compiled HLO module whose
    result has one of `shapes` (e.g. "bf16[4,16,128]")."""
    return [ln for ty, op, ln in hlo_instructions(hlo)
            if op in ("copy", "copy-start") and any(s + "{" in ty for s in shapes)]


def np_load_blocks(pools, host_kv, cis, layer: int, loads, slots, block_size: int, new=None):
    """NumPy replay of `kv_loader.load_blocks` on copies of pools = (k, v, bias) [L, B, T, Hk(, D)]:
    every entry with loads[b, h, e] = j >= 0 copies block j of the store host_kv [L, B, Hk, NB, 2,
    bs, D] (and its cis [L, B, T, Hk] rows) into slot slots[b, h, e] of `layer`; then, if
    new = (new_k, new_v, new_cis, new_row), each (b, h) with new_row >= 0 gets the token at that row."""
    rk, rv, rb = (np.array(p, copy=True) for p in pools)
    bs = block_size
    B, Hk, K = loads.shape
    for b in range(B):
        for h in range(Hk):
            for e in range(K):
                j, s = loads[b, h, e], slots[b, h, e]
                if j >= 0:
                    rk[layer, b, s * bs:(s + 1) * bs, h] = host_kv[layer, b, h, j, 0]
                    rv[layer, b, s * bs:(s + 1) * bs, h] = host_kv[layer, b, h, j, 1]
                    rb[layer, b, s * bs:(s + 1) * bs, h] = cis[layer, b, j * bs:(j + 1) * bs, h]
            if new is not None and new[3][b, h] >= 0:
                r = new[3][b, h]
                rk[layer, b, r, h], rv[layer, b, r, h], rb[layer, b, r, h] = new[0][b, h], new[1][b, h], new[2][b, h]
    return rk, rv, rb
