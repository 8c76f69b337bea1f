"""Shared plumbing for the kernels: the guarded Triton import, backend choice, input checks.

Shape alphabet used across ringserve.kernels:
    T   tokens (Tq query tokens, Tk key/value tokens)
    H   query heads
    Hkv key/value heads (H is a multiple of Hkv: grouped-query attention, G = H // Hkv)
    D   head dim
    S   splits / partial results being merged

Environment: TRITON_INTERPRET=1 makes Triton run its kernels on the CPU (numpy); the kernels here are
written so that works, and CI runs them that way. It is read by Triton when a kernel is *defined*, so it
must be set before `ringserve.kernels` is imported.
"""

from __future__ import annotations

import os
from typing import Iterable

import torch

try:  # Triton is optional: without it every public kernel runs its torch reference.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised only where triton is not installed
    HAS_TRITON = False

    class _Constexpr:  # stands in for tl.constexpr in the kernels' annotations
        pass

    class _TritonStub:
        """Lets the @triton.jit kernel definitions import; they are never launched without Triton."""

        @staticmethod
        def jit(fn=None, **_kw):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def cdiv(a: int, b: int) -> int:
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n: int) -> int:
            return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()

    class _TlStub:
        constexpr = _Constexpr

    triton = _TritonStub()  # type: ignore[assignment]
    tl = _TlStub()  # type: ignore[assignment]


BACKENDS = ("auto", "triton", "torch")
LOG2E = 1.4426950408889634  # 1/ln(2): exp(x) = exp2(x * LOG2E)
LN2 = 0.6931471805599453  # ln(2): natural log = log2 * LN2


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_usable(device: torch.device) -> bool:
    """Can a Triton kernel be launched on tensors of this device right now?"""
    if not HAS_TRITON:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreting()


def resolve_backend(backend: str, device: torch.device, extra: Iterable[str] = ()) -> str:
    """Map "auto" to a concrete backend and refuse one that cannot run here.

    "auto" = "triton" on CUDA (when Triton is installed), the torch reference elsewhere. "triton" on a
    CPU tensor runs only under TRITON_INTERPRET=1 (that is how CI exercises the kernels).
    """
    allowed = BACKENDS + tuple(extra)
    if backend not in allowed:
        raise ValueError(f"backend={backend!r} is not one of {allowed}; pass backend='auto' to let ringserve pick")
    if backend == "auto":
        return "triton" if device.type == "cuda" and HAS_TRITON else "torch"
    if backend == "triton" and not triton_usable(device):
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' needs the triton package; install it or pass backend='torch'")
        raise RuntimeError(
            f"backend='triton' cannot run on {device.type} tensors; move them to CUDA, set TRITON_INTERPRET=1 "
            "before importing ringserve.kernels (CPU interpreter, slow), or pass backend='torch'"
        )
    return backend


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
KV8_DTYPES = (torch.int8, torch.float8_e4m3fn)


def check_float(name: str, x: torch.Tensor, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {x.dtype}; expected one of {names} (convert with {name}.to(torch.bfloat16))")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, kv_dtypes=FLOAT_DTYPES) -> tuple[int, int, int, int, int]:
    """Validate q (Tq, H, D), k and v (Tk, Hkv, D); return (Tq, Tk, H, Hkv, D)."""
    check_float("q", q)
    check_float("k", k, kv_dtypes)
    check_float("v", v, kv_dtypes)
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"expected q (Tq, H, D), k and v (Tk, Hkv, D); got q{tuple(q.shape)}, k{tuple(k.shape)}, "
            f"v{tuple(v.shape)} (drop the batch dimension: ringserve attends one sequence at a time)"
        )
    if k.shape != v.shape:
        raise ValueError(f"k{tuple(k.shape)} and v{tuple(v.shape)} must have the same shape (Tk, Hkv, D)")
    if k.dtype != v.dtype:
        raise TypeError(f"k ({k.dtype}) and v ({v.dtype}) must have the same dtype")
    Tq, H, D = q.shape
    Tk, Hkv, Dk = k.shape
    if Dk != D:
        raise ValueError(f"head dim of q ({D}) and k/v ({Dk}) differ; they must be equal")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(
            f"query heads H={H} must be a multiple of key/value heads Hkv={Hkv} (grouped-query attention); "
            "check the model's num_attention_heads / num_key_value_heads"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v are on different devices ({q.device}, {k.device}, {v.device}); move them to one")
    return Tq, Tk, H, Hkv, D


def check_head_dim(D: int, supported: tuple[int, ...]) -> None:
    if D not in supported:
        raise ValueError(
            f"head dim D={D} is not supported by the Triton kernel (supported: {supported}); "
            "pass backend='torch' for the reference implementation"
        )


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """Kernels index (T, H) by stride but need the D axis dense."""
    return x if x.stride(-1) == 1 else x.contiguous()
