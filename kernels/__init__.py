"""ringserve.kernels: attention kernels that return (out, lse), the LSE merge, and the 8-bit KV format.

Every public kernel `x` has a plain-torch twin `x_ref` with the same signature. Each takes
`backend="auto" | "triton" | "torch"` ("auto": Triton on CUDA, torch elsewhere); flash_attention also
takes "cudnn" / "flash" (PyTorch's fused ops with LSE). Without Triton installed everything runs the
torch references. Shapes: T tokens, H query heads, Hkv KV heads, D head dim.
"""

from ._common import HAS_TRITON
from .attention import SUPPORTED_HEAD_DIMS, flash_attention, flash_attention_ref
from .decode import MAX_QUERY_TOKENS, decode_attention, decode_attention_ref
from .paged import paged_attention, paged_attention_ref
from .merge import merge_attention, merge_attention_ref, merge_attention_stack, merge_attention_stack_ref
from .quant import dequantize_kv, dequantize_kv_ref, quantize_kv, quantize_kv_ref

__all__ = [
    "HAS_TRITON",
    "MAX_QUERY_TOKENS",
    "SUPPORTED_HEAD_DIMS",
    "decode_attention",
    "decode_attention_ref",
    "dequantize_kv",
    "dequantize_kv_ref",
    "flash_attention",
    "flash_attention_ref",
    "merge_attention",
    "merge_attention_ref",
    "merge_attention_stack",
    "merge_attention_stack_ref",
    "paged_attention",
    "paged_attention_ref",
    "quantize_kv",
    "quantize_kv_ref",
]
