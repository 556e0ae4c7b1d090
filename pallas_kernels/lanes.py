"""Shared by the kernel files: Triton tensors have power-of-two shapes, so rows are padded."""


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()
