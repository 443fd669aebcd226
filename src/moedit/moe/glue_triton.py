"""Triton kernels for the routing glue around the grouped expert products (backend `fused`).

The grouped backend moves rows with several full passes over the (M, D) assignment tensor: cast, repeat,
permute (or gather), and after the experts permute back, widen to float32, weight, sum (or index_add_).
Here each direction is one pass, as ScatterMoE argues, and no pass accumulates through atomics:

- gather  : xs[p] = x[src[p]] cast to the experts' dtype, p over the M expert-sorted rows.
            Backward: dx[i] = Σ_{j ∈ seg(i)} dxs[pos[j]]          (a segment sum, float32)
- combine : out[i] = Σ_{j ∈ seg(i)} w[j] · (ys[pos[j]] + b2[e[j]])   (float32, cast once)
            Backward: dys[pos[j]] = w[j] · dout[tok[j]],  dw[j] = ⟨dout[tok[j]], ys[pos[j]] + b2[e[j]]⟩,
            db2 = Σ over each expert's rows of dys (one matrix product)

The assignments j are listed token-major (CSR): seg(i) = [ptr[i], ptr[i+1]), tok[j] its token, pos[j]
its row among the expert-sorted rows. Token choice is token-major already; other routers are sorted
by token once. A token with no assignment has an empty segment and gets exactly zero, as in every
backend. Each output element is written by exactly one program, so results are deterministic.

Between the two expert products, `bias_gelu` computes h = GELU_tanh(z + b1[expert]) in one pass over the
(M, H) rows, the widest tensor of the layer, where PyTorch writes the bias rows, adds and applies GELU
in three; its backward recomputes u = z + b1[e] and writes dz in one pass, the bias gradient being one
matrix product (experts.sum_per_expert). For SwiGLU experts `swiglu` does the same for silu(a)·b.

The kernels run on CUDA; with TRITON_INTERPRET=1 set before this module is imported, Triton's
interpreter runs them on CPU tensors, which is how the test suite checks them against the loop.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from moedit.moe.experts import sum_per_expert

TRITON_FOUND = importlib.util.find_spec("triton") is not None
if TRITON_FOUND:
    import triton
    import triton.language as tl


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(device: torch.device) -> str | None:
    """Why the fused backend cannot run on `device`, or None when it can."""
    if not TRITON_FOUND:
        return "the fused MoE backend needs Triton (pip install triton); use backend grouped or auto"
    if device.type != "cuda" and not interpreting():
        return (f"the fused MoE backend runs its Triton kernels on CUDA, not {device.type} (TRITON_INTERPRET=1 "
                f"runs them slowly on CPU, for tests); use backend grouped or auto")
    return None


def _row_tile(D: int) -> tuple[int, int]:
    """(BLOCK_D, num_warps) for the row kernels: a whole row per program up to 8,192 columns (masked
    lanes beyond D move no memory), with warps enough that each thread holds 8 elements, so that
    bf16 rows move in 16-byte accesses; wider rows take several column blocks."""
    block = max(16, min(8192, triton.next_power_of_2(D)))
    return block, max(1, min(16, block // 256))


if TRITON_FOUND:

    @triton.jit
    def _segment_sum_kernel(src_ptr, idx_ptr, w_ptr, ptr_ptr, bias_ptr, bexp_ptr, out_ptr, D: tl.constexpr,
                            stride_src, stride_out, SEGMENTS: tl.constexpr, WEIGHTED: tl.constexpr,
                            BIAS: tl.constexpr, BLOCK_D: tl.constexpr):
        """out[row] = Σ_{j ∈ seg(row)} (w[j]·) (src[idx[j]] (+ bias[bexp[j]])); without SEGMENTS each row's
        segment is {row}. `bias` is (E, D) contiguous: the second expert product's bias, added here."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = cols < D
        if SEGMENTS:
            acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
            j = tl.load(ptr_ptr + row)
            end = tl.load(ptr_ptr + row + 1)
            while j < end:  # a while loop: Triton's interpreter takes no loaded values as range() bounds
                r = tl.load(idx_ptr + j)
                v = tl.load(src_ptr + r * stride_src + cols, mask=mask, other=0.0).to(tl.float32)
                if BIAS:
                    v += tl.load(bias_ptr + tl.load(bexp_ptr + j) * D + cols, mask=mask, other=0.0).to(tl.float32)
                if WEIGHTED:
                    v = v * tl.load(w_ptr + j)
                acc += v
                j += 1
        else:  # one row each: a gather with a cast
            acc = tl.load(src_ptr + tl.load(idx_ptr + row) * stride_src + cols, mask=mask, other=0.0)
        tl.store(out_ptr + row * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _combine_backward_kernel(dout_ptr, ys_ptr, tok_ptr, pos_ptr, w_ptr, bias_ptr, bexp_ptr, dys_ptr, dw_ptr,
                                 D: tl.constexpr, stride_dout, stride_ys, stride_dys, BIAS: tl.constexpr,
                                 BLOCK_D: tl.constexpr):
        """For assignment j: dys[pos[j]] = w[j]·dout[tok[j]] and dw[j] = ⟨dout[tok[j]], ys[pos[j]] (+ bias[bexp[j]])⟩."""
        j = tl.program_id(0).to(tl.int64)
        t = tl.load(tok_ptr + j)
        p = tl.load(pos_ptr + j)
        w = tl.load(w_ptr + j)
        dot = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for c0 in tl.static_range(0, D, BLOCK_D):  # D is a compile-time constant: the loop unrolls
            cols = c0 + tl.arange(0, BLOCK_D)
            mask = cols < D
            g = tl.load(dout_ptr + t * stride_dout + cols, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(ys_ptr + p * stride_ys + cols, mask=mask, other=0.0).to(tl.float32)
            if BIAS:
                y += tl.load(bias_ptr + tl.load(bexp_ptr + j) * D + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(dys_ptr + p * stride_dys + cols, (g * w).to(dys_ptr.dtype.element_ty), mask=mask)
            dot += g * y
        tl.store(dw_ptr + j, tl.sum(dot, axis=0))


if TRITON_FOUND:

    @triton.jit
    def _gelu_parts(u):
        """GELU_tanh(u) = u·(1 + tanh(a))/2 with a = √(2/π)·(u + 0.044715·u³), and its derivative."""
        a = 0.7978845608028654 * (u + 0.044715 * u * u * u)
        a = tl.minimum(tl.maximum(a, -20.0), 20.0)  # tanh is ±1 to float32 beyond; keeps exp() finite
        t = 2.0 * tl.sigmoid(2.0 * a) - 1.0  # tanh(a)
        gelu = 0.5 * u * (1.0 + t)
        slope = 0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3 * 0.044715 * u * u)
        return gelu, slope

    @triton.jit
    def _bias_gelu_kernel(z_ptr, b_ptr, e_ptr, g_ptr, out_ptr, M, H: tl.constexpr, BACKWARD: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
        """Forward: out = GELU(z + b[e]); backward: out = g · GELU'(z + b[e]); a (BLOCK_M, BLOCK_H) tile each."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        mask = (rows < M)[:, None] & (cols < H)[None, :]
        e = tl.load(e_ptr + rows, mask=rows < M, other=0)
        at = rows[:, None] * H + cols[None, :]
        u = tl.load(z_ptr + at, mask=mask, other=0.0).to(tl.float32)
        u += tl.load(b_ptr + e[:, None] * H + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        gelu, slope = _gelu_parts(u)
        if BACKWARD:
            out = tl.load(g_ptr + at, mask=mask, other=0.0).to(tl.float32) * slope
        else:
            out = gelu
        tl.store(out_ptr + at, out.to(out_ptr.dtype.element_ty), mask=mask)


    @triton.jit
    def _swiglu_kernel(a_ptr, b_ptr, g_ptr, out_ptr, db_ptr, n, BACKWARD: tl.constexpr, BLOCK: tl.constexpr):
        """Forward: out = silu(a)·b; backward: out = g·b·silu'(a) (= da) and db = g·silu(a)."""
        at = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = at < n
        a = tl.load(a_ptr + at, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + at, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(a)
        if BACKWARD:
            g = tl.load(g_ptr + at, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + at, (g * b * sig * (1.0 + a * (1.0 - sig))).to(out_ptr.dtype.element_ty), mask=mask)
            tl.store(db_ptr + at, (g * a * sig).to(db_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(out_ptr + at, (a * sig * b).to(out_ptr.dtype.element_ty), mask=mask)


def _bias_gelu_launch(z_MH: torch.Tensor, b_EH: torch.Tensor, expert_M: torch.Tensor,
                      g_MH: torch.Tensor | None) -> torch.Tensor:
    M, H = z_MH.shape
    out_MH = torch.empty_like(z_MH)
    if M == 0 or H == 0:
        return out_MH
    block_h = max(16, min(256, triton.next_power_of_2(H)))
    grid = (triton.cdiv(M, 16), triton.cdiv(H, block_h))
    _bias_gelu_kernel[grid](z_MH, b_EH, expert_M, g_MH if g_MH is not None else z_MH, out_MH, M, H,
                            BACKWARD=g_MH is not None, BLOCK_M=16, BLOCK_H=block_h)
    return out_MH


class _BiasGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z_MH, b_EH, expert_M):
        z_MH, b_EH = z_MH.contiguous(), b_EH.contiguous()
        ctx.save_for_backward(z_MH, b_EH, expert_M)
        return _bias_gelu_launch(z_MH, b_EH, expert_M, None)

    @staticmethod
    def backward(ctx, g_MH):
        z_MH, b_EH, expert_M = ctx.saved_tensors
        dz_MH = _bias_gelu_launch(z_MH, b_EH, expert_M, g_MH.contiguous())
        return dz_MH, sum_per_expert(dz_MH, expert_M, b_EH.shape[0]).to(b_EH.dtype), None


def bias_gelu(z_MH: torch.Tensor, b_EH: torch.Tensor, expert_M: torch.Tensor) -> torch.Tensor:
    """GELU_tanh(z_MH + b_EH[expert_M]) in one pass (and one pass back); float32 inside, z's dtype out."""
    return _BiasGelu.apply(z_MH, b_EH, expert_M)


_SWIGLU_BLOCK = 1024


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a_MH, b_MH):
        a_MH, b_MH = a_MH.contiguous(), b_MH.contiguous()
        ctx.save_for_backward(a_MH, b_MH)
        h_MH = torch.empty_like(a_MH)
        if a_MH.numel():
            _swiglu_kernel[(triton.cdiv(a_MH.numel(), _SWIGLU_BLOCK),)](a_MH, b_MH, a_MH, h_MH, h_MH, a_MH.numel(),
                                                                       BACKWARD=False, BLOCK=_SWIGLU_BLOCK)
        return h_MH

    @staticmethod
    def backward(ctx, g_MH):
        a_MH, b_MH = ctx.saved_tensors
        da_MH, db_MH = torch.empty_like(a_MH), torch.empty_like(b_MH)
        if a_MH.numel():
            _swiglu_kernel[(triton.cdiv(a_MH.numel(), _SWIGLU_BLOCK),)](a_MH, b_MH, g_MH.contiguous(), da_MH, db_MH,
                                                                       a_MH.numel(), BACKWARD=True, BLOCK=_SWIGLU_BLOCK)
        return da_MH, db_MH


def swiglu(a_MH: torch.Tensor, b_MH: torch.Tensor) -> torch.Tensor:
    """silu(a_MH) · b_MH in one pass (two outputs in one pass back); float32 inside, a's dtype out."""
    return _SwiGLU.apply(a_MH, b_MH)


def _segment_sum(src_RD: torch.Tensor, idx_J: torch.Tensor, rows: int, dtype: torch.dtype,
                 ptr_N1: torch.Tensor | None = None, w_J: torch.Tensor | None = None,
                 b_ED: torch.Tensor | None = None, expert_J: torch.Tensor | None = None) -> torch.Tensor:
    D = src_RD.shape[1]
    out_ND = torch.empty(rows, D, dtype=dtype, device=src_RD.device)
    if rows == 0 or D == 0:
        return out_ND.zero_()
    block, warps = _row_tile(D)
    grid = (rows, triton.cdiv(D, block))
    unused = idx_J  # a pointer the kernel never reads, for arguments a variant does without
    _segment_sum_kernel[grid](src_RD, idx_J, _or(w_J, unused), _or(ptr_N1, unused), _or(b_ED, unused),
                              _or(expert_J, unused), out_ND, D, src_RD.stride(0), out_ND.stride(0),
                              SEGMENTS=ptr_N1 is not None, WEIGHTED=w_J is not None, BIAS=b_ED is not None,
                              BLOCK_D=block, num_warps=warps)
    return out_ND


def _or(t: torch.Tensor | None, default: torch.Tensor) -> torch.Tensor:
    return t if t is not None else default


class _Gather(torch.autograd.Function):
    """xs[p] = x[src[p]].to(dtype); the backward sums each token's rows through its CSR segment."""

    @staticmethod
    def forward(ctx, x_ND, src_M, ptr_N1, pos_J, dtype):
        x_ND = x_ND.contiguous()
        ctx.save_for_backward(ptr_N1, pos_J)
        ctx.x_dtype = x_ND.dtype
        return _segment_sum(x_ND, src_M, src_M.shape[0], dtype)

    @staticmethod
    def backward(ctx, dxs_MD):
        ptr_N1, pos_J = ctx.saved_tensors
        dx_ND = _segment_sum(dxs_MD.contiguous(), pos_J, ptr_N1.shape[0] - 1, ctx.x_dtype, ptr_N1=ptr_N1)
        return dx_ND, None, None, None, None


class _Combine(torch.autograd.Function):
    """out[i] = Σ_{j ∈ seg(i)} w[j] · (ys[pos[j]] + b[expert[j]]) in float32, cast to out_dtype."""

    @staticmethod
    def forward(ctx, ys_MD, w_J, b_ED, tok_J, pos_J, ptr_N1, expert_J, expert_M, out_dtype):
        ys_MD, w32_J = ys_MD.contiguous(), w_J.float().contiguous()
        b_ED = b_ED.contiguous() if b_ED is not None else None
        ctx.save_for_backward(ys_MD, w32_J, b_ED, tok_J, pos_J, expert_J, expert_M)
        ctx.w_dtype = w_J.dtype
        return _segment_sum(ys_MD, pos_J, ptr_N1.shape[0] - 1, out_dtype, ptr_N1=ptr_N1, w_J=w32_J, b_ED=b_ED,
                            expert_J=expert_J)

    @staticmethod
    def backward(ctx, dout_ND):
        ys_MD, w32_J, b_ED, tok_J, pos_J, expert_J, expert_M = ctx.saved_tensors
        dout_ND = dout_ND.contiguous()
        dys_MD = torch.empty_like(ys_MD)
        dw_J = torch.empty_like(w32_J)
        M, D = ys_MD.shape
        if M > 0 and D > 0:
            block, warps = _row_tile(D)
            _combine_backward_kernel[(M,)](dout_ND, ys_MD, tok_J, pos_J, w32_J, _or(b_ED, tok_J), _or(expert_J, tok_J),
                                           dys_MD, dw_J, D, dout_ND.stride(0), ys_MD.stride(0), dys_MD.stride(0),
                                           BIAS=b_ED is not None, BLOCK_D=block, num_warps=warps)
        else:
            dys_MD.zero_()
            dw_J.zero_()
        db_ED = None
        if b_ED is not None:  # Σ over each expert's rows of w·dout, which is dys
            db_ED = sum_per_expert(dys_MD, expert_M, b_ED.shape[0]).to(b_ED.dtype)
        return dys_MD, dw_J.to(ctx.w_dtype), db_ED, None, None, None, None, None, None


def gather_rows(x_ND: torch.Tensor, src_M: torch.Tensor, ptr_N1: torch.Tensor, pos_J: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    """The expert-sorted rows x[src_M] in `dtype`; (ptr_N1, pos_J) is the token-major CSR of the same
    assignments, which the backward uses to sum each token's gradient rows without atomics."""
    return _Gather.apply(x_ND, src_M, ptr_N1, pos_J, dtype)


def combine_rows(ys_MD: torch.Tensor, w_J: torch.Tensor, tok_J: torch.Tensor, pos_J: torch.Tensor,
                 ptr_N1: torch.Tensor, out_dtype: torch.dtype, b_ED: torch.Tensor | None = None,
                 expert_J: torch.Tensor | None = None, expert_M: torch.Tensor | None = None) -> torch.Tensor:
    """out[i] = Σ_{j ∈ [ptr[i], ptr[i+1])} w_J[j] · (ys_MD[pos_J[j]] + b_ED[expert_J[j]]) (float32 sums, one
    cast). With a bias, expert_J is each assignment's expert and expert_M each sorted row's, for its gradient."""
    if b_ED is not None and (expert_J is None or expert_M is None):
        raise ValueError("combine_rows with a bias needs expert_J (per assignment) and expert_M (per sorted row)")
    return _Combine.apply(ys_MD, w_J, b_ED, tok_J, pos_J, ptr_N1, expert_J, expert_M, out_dtype)
