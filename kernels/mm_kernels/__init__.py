"""Pallas kernels for mm (depends on jax only): fused flash attention for GPU (Triton) and TPU (Mosaic)."""

from mm_kernels.common import BlockSizes
from mm_kernels.flash_gpu import flash_attention_gpu
from mm_kernels.flash_tpu import flash_attention_tpu

__all__ = ["BlockSizes", "flash_attention_gpu", "flash_attention_tpu"]
