"""Checkpoint conversion: HF / PyTorch NOSA-Llama checkpoints -> nosa-jax (orbax) directories."""

from .hf import ConversionError, HFCheckpoint, convert_checkpoint, hf_layout, load_hf_checkpoint

__all__ = ["ConversionError", "HFCheckpoint", "convert_checkpoint", "hf_layout", "load_hf_checkpoint"]
