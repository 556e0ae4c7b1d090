"""NOSA-JAX: NOSA (Native and Offloadable Sparse Attention) models in JAX / Flax NNX.

Modules: config (ModelConfig, NosaConfig), nosa (the reference math), cache (incremental KV cache),
model (NosaForCausalLM), generate (jitted decode loop, samplers), checkpoint (load_model), cli.
"""

__version__ = "0.1.0"
