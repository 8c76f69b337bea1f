"""Attention over paged KV: the queries of B sequences against K/V kept in fixed-size pages.

    paged_attention(q, k_pages, v_pages, page_table, kv_len, *, max_len=None, scale=None,
                    num_splits=None, out_dtype=None, backend="auto") -> (out, lse)

    q           (B, Tq, H, D)    Tq query tokens of each of B sequences
    k_pages     (N, S, Hkv, D)   one layer of a page pool: N pages of S token slots each; any strides
    v_pages     (N, S, Hkv, D)   with the D axis dense (a layer of `workers.kvpages.PagePool` is one)
    page_table  (B, Pmax) int32  the pages of each sequence's storage, in order: storage slot i of
                                 sequence b lies in page page_table[b, i // S], slot i % S
    kv_len      (B, Tq) int32    query (b, t) attends storage slots [0, kv_len[b, t]) of sequence b
    max_len     an upper bound of kv_len (saves a device sync when the caller knows it)
    out         (B, Tq, H, D) in q.dtype (or out_dtype); lse (B, Tq, H) float32, natural log. A query
                with kv_len 0 gets out = 0, lse = -inf, so partials merge with ringserve.kernels.merge.

Causality is a per-query length: a rank stores its tokens in position order, so the keys a query at
position p may see are exactly a prefix of the storage, whatever positions the rank holds (zigzag
pieces, round-robin blocks). One kernel serves a decode batch (B sequences, Tq = 1), a multi-token
append against its own retained context (B = 1, lengths growing along t), and a prefill chunk's
queries against the retained context (every length equal).

How it runs (split-KV, as kernels/decode.py): one program handles one (sequence, KV head, piece of
the storage, block of query rows), where the rows are the G = H / Hkv query heads sharing that KV head
times the query tokens, so each K/V byte is read once per row block. Keys are addressed through the
page table one BLOCK_N tile at a time (the page id of every key in the tile is loaded, so any page
size works). Each piece writes an fp32 (out, lse) partial; `merge_attention_stack` combines them.
"""

from __future__ import annotations

import torch

from ._common import LOG2E, check_float, check_head_dim, interpreting, last_dim_contiguous, resolve_backend, tl, triton
from .attention import SUPPORTED_HEAD_DIMS, _online_softmax
from .decode import DEFAULT_DECODE_CONFIG, _sm_count
from .merge import merge_attention_stack


@triton.jit
def _load_kv(K, KS, page, slot, hkv, offs_d, ok, stride_kn, stride_ks, stride_kh, stride_sn, stride_ss, stride_sh,
             dtype, FMT: tl.constexpr, HALF: tl.constexpr, HIGH: tl.constexpr):
    """One tile of K (or V) as (BLOCK_N, D) — or, for int4, the half HIGH of its channels (BLOCK_N, D / 2) —
    dequantized in registers to `dtype`. ok: the tile's valid rows (None: all)."""
    ptr = K + page[:, None] * stride_kn + slot[:, None] * stride_ks + hkv * stride_kh + offs_d[None, :]
    if FMT == 2:
        x = tl.load(ptr, mask=ok[:, None], other=0)
    else:
        x = tl.load(ptr, mask=ok[:, None], other=0.0)
    if FMT == 0:
        return x.to(dtype)
    sp = KS + page * stride_sn + slot * stride_ss + hkv * stride_sh
    if FMT == 1:  # fp8 e4m3, one fp32 scale per (token, head)
        return (x.to(tl.float32) * tl.load(sp, mask=ok, other=0.0)[:, None]).to(dtype)
    # int4: channel c < D/2 in the low nibble of byte c, c >= D/2 in the high nibble of byte c - D/2;
    # each half has its own fp16 scale and minimum
    nib = (x >> 4) if HIGH else (x & 15)
    scale = tl.load(sp + 2 * HIGH, mask=ok, other=0.0).to(tl.float32)
    zero = tl.load(sp + 2 * HIGH + 1, mask=ok, other=0.0).to(tl.float32)
    return (nib.to(tl.float32) * scale[:, None] + zero[:, None]).to(dtype)


@triton.jit
def _paged_split_kernel(
    Q, K, V, KS, VS, PT, KVL, OP, LP,
    stride_qb, stride_qt, stride_qh,
    stride_kn, stride_ks, stride_kh, stride_vn, stride_vs, stride_vh,
    stride_ksn, stride_kss, stride_ksh, stride_vsn, stride_vss, stride_vsh,
    stride_pb, stride_lb, stride_lt,
    stride_ops, stride_opt, stride_oph, stride_lps, stride_lpt, stride_lph,
    Tq, Hkv,
    split_len,  # keys per split, a multiple of BLOCK_N
    qk_scale,  # softmax scale * log2(e)
    PAGE: tl.constexpr,  # S: token slots per page (of the session's format)
    GROUP: tl.constexpr,  # H // Hkv
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,  # (token, head-in-group) rows per program, >= 16 for tl.dot
    BLOCK_N: tl.constexpr,
    FMT: tl.constexpr,  # 0 exact, 1 fp8 (+ scale), 2 int4 (packed nibbles + scale and minimum per half)
    UPCAST: tl.constexpr,  # compute the dots in fp32 (the CPU interpreter's bf16 dot is wrong)
    PRECISION: tl.constexpr,
):
    b = tl.program_id(0) // Hkv
    hkv = tl.program_id(0) % Hkv
    split = tl.program_id(1)
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    t = rows // GROUP  # query token of each row
    h = hkv * GROUP + rows % GROUP  # query head of each row
    row_ok = t < Tq
    offs_n = tl.arange(0, BLOCK_N)
    HALF: tl.constexpr = D // 2
    W: tl.constexpr = HALF if FMT == 2 else D  # channels per loaded tile
    offs_w = tl.arange(0, W)

    kvl = tl.load(KVL + b * stride_lb + t * stride_lt, mask=row_ok, other=0)  # (BLOCK_M,) visible keys per row
    q_ptr = Q + b * stride_qb + t[:, None] * stride_qt + h[:, None] * stride_qh + offs_w[None, :]
    q0 = tl.load(q_ptr, mask=row_ok[:, None], other=0.0)  # int4: the low half of the channels
    if UPCAST:
        q0 = q0.to(tl.float32)
    q1 = q0
    if FMT == 2:
        q1 = tl.load(q_ptr + HALF, mask=row_ok[:, None], other=0.0).to(q0.dtype)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_M, W], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, W], dtype=tl.float32)

    n_lo = split * split_len
    n_hi = tl.minimum(tl.max(kvl, 0), n_lo + split_len)  # the longest row bounds the loop
    pt = PT + b * stride_pb

    for start_n in range(n_lo, n_hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < n_hi
        page = tl.load(pt + cols // PAGE, mask=col_ok, other=0).to(tl.int64)
        slot = cols % PAGE
        k0 = _load_kv(K, KS, page, slot, hkv, offs_w, col_ok, stride_kn, stride_ks, stride_kh,
                      stride_ksn, stride_kss, stride_ksh, q0.dtype, FMT, HALF, 0)
        qk = tl.dot(q0, tl.trans(k0), input_precision=PRECISION)
        if FMT == 2:
            k1 = _load_kv(K, KS, page, slot, hkv, offs_w, col_ok, stride_kn, stride_ks, stride_kh,
                          stride_ksn, stride_kss, stride_ksh, q0.dtype, FMT, HALF, 1)
            qk += tl.dot(q1, tl.trans(k1), input_precision=PRECISION)
        qk = tl.where(cols[None, :] < kvl[:, None], qk, float("-inf"))
        p, alpha, m_i, l_i = _online_softmax(qk, m_i, l_i, qk_scale, True)
        v0 = _load_kv(V, VS, page, slot, hkv, offs_w, col_ok, stride_vn, stride_vs, stride_vh,
                      stride_vsn, stride_vss, stride_vsh, q0.dtype, FMT, HALF, 0)
        acc0 = tl.dot(p.to(q0.dtype), v0, acc0 * alpha[:, None], input_precision=PRECISION)
        if FMT == 2:
            v1 = _load_kv(V, VS, page, slot, hkv, offs_w, col_ok, stride_vn, stride_vs, stride_vh,
                          stride_vsn, stride_vss, stride_vsh, q0.dtype, FMT, HALF, 1)
            acc1 = tl.dot(p.to(q0.dtype), v1, acc1 * alpha[:, None], input_precision=PRECISION)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)  # ln(2)
    r = b * Tq + t  # row of the flattened (B * Tq) query axis
    o_ptr = OP + split * stride_ops + r[:, None] * stride_opt + h[:, None] * stride_oph + offs_w[None, :]
    tl.store(o_ptr, acc0 / l_safe[:, None], mask=row_ok[:, None])
    if FMT == 2:
        tl.store(o_ptr + HALF, acc1 / l_safe[:, None], mask=row_ok[:, None])
    tl.store(LP + split * stride_lps + r * stride_lpt + h * stride_lph, lse, mask=row_ok)


FORMATS = {"exact": 0, "fp8": 1, "int4": 2}


def _check_paged(q, k_pages, v_pages, page_table, kv_len, k_scales=None, v_scales=None, kv_format="exact"):
    check_float("q", q)
    if kv_format not in FORMATS:
        raise ValueError(f"kv_format must be one of {tuple(FORMATS)}, got {kv_format!r}")
    if q.dim() != 4 or k_pages.dim() != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(f"expected q (B, Tq, H, D), k_pages and v_pages (N, S, Hkv, D); got q{tuple(q.shape)}, "
                         f"k_pages{tuple(k_pages.shape)}, v_pages{tuple(v_pages.shape)}")
    B, Tq, H, D = q.shape
    N, S, Hkv, Dk = k_pages.shape
    want_d, want_dtype = {"exact": (D, q.dtype), "fp8": (D, torch.float8_e4m3fn), "int4": (D // 2, torch.uint8)}[kv_format]
    if Dk != want_d or Hkv == 0 or H % Hkv:
        raise ValueError(f"q has H={H}, D={D}; the {kv_format} pages Hkv={Hkv}, width {Dk} (expected {want_d}): "
                         "H must be a multiple of Hkv")
    if k_pages.dtype != want_dtype or v_pages.dtype != want_dtype:
        raise TypeError(f"{kv_format} pages must be {want_dtype} (q is {q.dtype}); got {k_pages.dtype}, {v_pages.dtype}")
    if kv_format != "exact":
        ns = 1 if kv_format == "fp8" else 4
        for name, sc in (("k_scales", k_scales), ("v_scales", v_scales)):
            if sc is None or tuple(sc.shape) != (N, S, Hkv, ns):
                raise ValueError(f"{kv_format} pages need {name} of shape {(N, S, Hkv, ns)}, got "
                                 f"{None if sc is None else tuple(sc.shape)}")
    if page_table.dim() != 2 or page_table.shape[0] != B or page_table.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"page_table must be (B={B}, Pmax) int32; got {tuple(page_table.shape)} {page_table.dtype}")
    if tuple(kv_len.shape) != (B, Tq) or kv_len.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"kv_len must be (B, Tq) = {(B, Tq)} int32; got {tuple(kv_len.shape)} {kv_len.dtype}")
    if not (q.device == k_pages.device == v_pages.device == page_table.device == kv_len.device):
        raise ValueError("q, the pages, page_table and kv_len must be on one device")
    return B, Tq, H, D, S, Hkv


def paged_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_table: torch.Tensor,
    kv_len: torch.Tensor,
    *,
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
    kv_format: str = "exact",
    max_len: int | None = None,
    scale: float | None = None,
    num_splits: int | None = None,
    out_dtype: torch.dtype | None = None,
    backend: str = "auto",
    config: tuple[int, int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of B sequences' queries over their paged K/V; see the module docstring. A packed
    kv_format ("fp8", "int4") reads its pages and scales as stored and dequantizes in registers.

    `config` = (BLOCK_N, num_warps, num_stages, programs per SM) overrides the decode kernel's tuned default.
    """
    B, Tq, H, D, S, Hkv = _check_paged(q, k_pages, v_pages, page_table, kv_len, k_scales, v_scales, kv_format)
    backend = resolve_backend(backend, q.device)
    out_dtype = q.dtype if out_dtype is None else out_dtype
    scale = D**-0.5 if scale is None else float(scale)
    if backend == "torch":
        return paged_attention_ref(q, k_pages, v_pages, page_table, kv_len, k_scales=k_scales, v_scales=v_scales,
                                   kv_format=kv_format, scale=scale, out_dtype=out_dtype)
    check_head_dim(D, SUPPORTED_HEAD_DIMS)
    max_len = int(kv_len.max()) if max_len is None else int(max_len)
    if max_len <= 0 or B * Tq == 0:
        return (torch.zeros((B, Tq, H, D), dtype=out_dtype, device=q.device),
                torch.full((B, Tq, H), float("-inf"), dtype=torch.float32, device=q.device))
    q = last_dim_contiguous(q)
    page_table, kv_len = page_table.to(torch.int32), kv_len.to(torch.int32)
    if interpreting():
        block_n, num_warps, num_stages, waves = 16, 4, 1, 1
    else:
        block_n, num_warps, num_stages, waves = config or DEFAULT_DECODE_CONFIG
    G = H // Hkv
    block_m = max(16, min(64, triton.next_power_of_2(Tq * G)))
    row_blocks = triton.cdiv(Tq * G, block_m)
    n_blocks = triton.cdiv(max_len, block_n)
    if num_splits is None:  # enough programs to fill the GPU; long query blocks need no split
        programs = waves * _sm_count(q.device.index or 0) if q.device.type == "cuda" else 4
        num_splits = triton.cdiv(programs, B * Hkv * row_blocks)
    num_splits = max(1, min(int(num_splits), n_blocks))
    split_len = triton.cdiv(n_blocks, num_splits) * block_n
    n_splits = triton.cdiv(max_len, split_len)
    out_part = torch.empty((n_splits, B * Tq, H, D), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((n_splits, B * Tq, H), dtype=torch.float32, device=q.device)
    ks = k_scales if k_scales is not None else lse_part.view(1, 1, 1, -1)  # placeholders, never read (exact)
    vs = v_scales if v_scales is not None else lse_part.view(1, 1, 1, -1)
    _paged_split_kernel[(B * Hkv, n_splits, row_blocks)](
        q, k_pages, v_pages, ks, vs, page_table, kv_len, out_part, lse_part,
        q.stride(0), q.stride(1), q.stride(2),
        k_pages.stride(0), k_pages.stride(1), k_pages.stride(2),
        v_pages.stride(0), v_pages.stride(1), v_pages.stride(2),
        ks.stride(0), ks.stride(1), ks.stride(2), vs.stride(0), vs.stride(1), vs.stride(2),
        page_table.stride(0), kv_len.stride(0), kv_len.stride(1),
        out_part.stride(0), out_part.stride(1), out_part.stride(2),
        lse_part.stride(0), lse_part.stride(1), lse_part.stride(2),
        Tq, Hkv, split_len, scale * LOG2E,
        PAGE=S, GROUP=G, D=D, BLOCK_M=block_m, BLOCK_N=block_n, FMT=FORMATS[kv_format],
        UPCAST=interpreting() and q.dtype == torch.bfloat16,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
    out, lse = merge_attention_stack(out_part, lse_part, out_dtype=out_dtype, backend="triton")
    return out.view(B, Tq, H, D), lse.view(B, Tq, H)


def _unpack(kv_format: str, pages: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    """Pages of a packed format as fp32 (n, S, Hkv, D) (the arithmetic of kernels/quant.py)."""
    from .quant import dequantize_int4_ref, dequantize_kv_ref

    if kv_format == "exact":
        return pages.float()
    if kv_format == "fp8":
        return dequantize_kv_ref(pages, scales[..., 0], dtype=torch.float32)
    return dequantize_int4_ref(pages, scales, dtype=torch.float32)


def paged_attention_ref(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_table: torch.Tensor,
    kv_len: torch.Tensor,
    *,
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
    kv_format: str = "exact",
    max_len: int | None = None,
    scale: float | None = None,
    num_splits: int | None = None,
    out_dtype: torch.dtype | None = None,
    backend: str = "torch",
    config: tuple[int, int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of paged_attention: gather each sequence's pages (dequantized), then masked softmax
    attention in fp32 (`max_len`, `num_splits`, `backend`, `config` are accepted for signature parity
    and ignored)."""
    B, Tq, H, D, S, Hkv = _check_paged(q, k_pages, v_pages, page_table, kv_len, k_scales, v_scales, kv_format)
    scale = D**-0.5 if scale is None else float(scale)
    out = torch.zeros((B, Tq, H, D), dtype=torch.float32, device=q.device)
    lse = torch.full((B, Tq, H), float("-inf"), dtype=torch.float32, device=q.device)
    for b in range(B):
        n = int(kv_len[b].max()) if Tq else 0
        if n <= 0:
            continue
        pages = page_table[b, : -(-n // S)].long()
        k = _unpack(kv_format, k_pages[pages], None if k_scales is None else k_scales[pages])
        v = _unpack(kv_format, v_pages[pages], None if v_scales is None else v_scales[pages])
        k, v = k.reshape(-1, Hkv, D)[:n], v.reshape(-1, Hkv, D)[:n]  # (n, Hkv, D)
        k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)  # (n, H, D)
        s = torch.einsum("thd,nhd->htn", q[b].float(), k) * scale  # (H, Tq, n)
        visible = torch.arange(n, device=q.device)[None, :] < kv_len[b][:, None]  # (Tq, n)
        s = s.masked_fill(~visible[None], float("-inf"))
        l = torch.logsumexp(s, -1)  # (H, Tq)
        p = torch.exp(s - l.nan_to_num(neginf=0.0)[..., None]).nan_to_num(0.0)
        out[b] = torch.einsum("htn,nhd->thd", p, v)
        lse[b] = l.transpose(0, 1)
    return out.to(out_dtype or q.dtype), lse
