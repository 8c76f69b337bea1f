"""How a retained session's K and V are stored in its pages: the KV formats.

A page of the device and host pools is `block` (S) token slots of every layer, K and V, in the model's
dtype: per layer and per K or V, P = S * Hkv * D * itemsize bytes. Every format uses the same pages
(so capacity, moves and billing count pages), packing more tokens into a page when it stores fewer
bytes per token:

    exact   the model's dtype                       S tokens per page
    fp8     float8_e4m3fn + one fp32 scale          per (token, head): D + 4 bytes
    int4    4-bit, asymmetric, two channel groups   per (token, head): D / 2 + 8 bytes (fp16 scale and
            (channels [0, D/2) in the low nibble,   minimum per group of D / 2 channels; KIVI-style
            [D/2, D) in the high one)               groups of 32-128 channels)

Within a page-layer of a packed format, the data of its S_F token slots (S_F, Hkv, Db) comes first,
then their scales (S_F, Hkv, ns), 4-byte aligned. `views` exposes both as strided tensors over a pool
layer (no copy), which is what the paged kernel and the writes use; `encode` / `decode` are the
torch codecs (the kernel dequantizes in registers, the same arithmetic).

Bytes per token relative to exact (D = 64, Hkv any): bf16 — fp8 0.53, int4 0.31; fp32 (the CPU) —
fp8 0.27, int4 0.16. A session is billed by its tokens' bytes in its format (`token_bytes`), not by
the unused slots of its pages: capacity counts pages, the price counts tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FORMATS = ("exact", "fp8", "int4")
ORDER = {f: i for i, f in enumerate(FORMATS)}  # a session may only move to a later (smaller) format


@dataclass(frozen=True)
class PageLayout:
    """Where a format puts its tokens in one page-layer of S * Hkv * D * itemsize bytes."""

    format: str
    tokens: int  # S_F: token slots per page
    data_dtype: torch.dtype
    data_width: int  # elements per (token, head) of data: D (exact, fp8) or D / 2 bytes (int4)
    scale_dtype: torch.dtype | None
    scale_width: int  # scale elements per (token, head): 0, 1 (fp8), 4 (int4: scale, min of each half)
    scale_offset: int  # bytes from the page-layer start to the scales


def _parts(fmt: str, head_dim: int, dtype: torch.dtype):
    """(data bytes per token-head, storage dtype, scales per token-head, scale dtype) of a packed format."""
    if fmt == "fp8":
        return head_dim, torch.float8_e4m3fn, 1, torch.float32
    if fmt == "int4":
        if head_dim % 2:
            raise ValueError(f"int4 KV needs an even head dim, got {head_dim}")
        return head_dim // 2, torch.uint8, 4, torch.float16
    raise ValueError(f"unknown KV format {fmt!r}; formats: {', '.join(FORMATS)}")


def token_bytes(fmt: str, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes one token's K (or V) of one layer takes in `fmt`, scales included: what a session's stored
    bytes (and so its price) count, page slots aside."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    if fmt == "exact":
        return kv_heads * head_dim * itemsize
    data, _, sw, scale_dtype = _parts(fmt, head_dim, dtype)
    return kv_heads * (data + sw * torch.empty((), dtype=scale_dtype).element_size())


def layout(fmt: str, block: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> PageLayout:
    """The page layout of `fmt` for pages of `block` tokens of (kv_heads, head_dim) in `dtype`."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    page = block * kv_heads * head_dim * itemsize  # bytes of one page-layer of K (or V)
    if fmt == "exact":
        return PageLayout(fmt, block, dtype, head_dim, None, 0, page)
    data, sdt, sw, scale_dtype = _parts(fmt, head_dim, dtype)
    tokens = page // token_bytes(fmt, kv_heads, head_dim, dtype)
    while True:  # the data region ends 4-byte aligned, so the scales can be viewed in place
        off = -(-tokens * kv_heads * data // 4) * 4
        if off + tokens * kv_heads * sw * torch.empty((), dtype=scale_dtype).element_size() <= page:
            break
        tokens -= 1
    return PageLayout(fmt, tokens, sdt, data, scale_dtype, sw, off)


def views(pool_layer: torch.Tensor, lay: PageLayout) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(data (N, S_F, Hkv, Db), scales (N, S_F, Hkv, ns) or None) over one pool layer (N, S, Hkv, D),
    in place."""
    if lay.format == "exact":
        return pool_layer, None
    N = pool_layer.shape[0]
    Hkv = pool_layer.shape[2]
    raw = pool_layer.view(torch.uint8).reshape(N, -1)  # (N, page bytes)
    page = raw.shape[1]
    data = raw.view(lay.data_dtype) if lay.data_dtype.itemsize == 1 else raw
    data = data.as_strided((N, lay.tokens, Hkv, lay.data_width), (page, Hkv * lay.data_width, lay.data_width, 1))
    isz = torch.empty((), dtype=lay.scale_dtype).element_size()
    sv = raw.view(lay.scale_dtype)  # (N, page / isz)
    scales = sv.as_strided((N, lay.tokens, Hkv, lay.scale_width), (page // isz, Hkv * lay.scale_width,
                                                                    lay.scale_width, 1),
                           storage_offset=sv.storage_offset() + lay.scale_offset // isz)
    return data, scales


def encode(fmt: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x (..., D) in the model dtype -> (data, scales (..., ns)) of the format (kernels/quant.py defines
    the arithmetic, which the paged kernel's dequantization matches)."""
    from ringserve.kernels.quant import quantize_int4_ref, quantize_kv_ref

    if fmt == "exact":
        return x, None
    if fmt == "fp8":
        q, scale = quantize_kv_ref(x, dtype=torch.float8_e4m3fn)
        return q, scale[..., None]
    if fmt == "int4":
        return quantize_int4_ref(x)
    raise ValueError(f"unknown KV format {fmt!r}")


def decode(fmt: str, data: torch.Tensor, scales: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """(data, scales) of the format -> x (..., D) in `dtype`."""
    from ringserve.kernels.quant import dequantize_int4_ref, dequantize_kv_ref

    if fmt == "exact":
        return data.to(dtype)
    if fmt == "fp8":
        return dequantize_kv_ref(data, scales[..., 0], dtype=dtype)
    if fmt == "int4":
        return dequantize_int4_ref(data, scales, dtype=dtype)
    raise ValueError(f"unknown KV format {fmt!r}")

