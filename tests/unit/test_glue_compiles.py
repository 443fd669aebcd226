"""The fused backend's Triton kernels compile for Hopper (sm_90: H100, H200), all the way to a cubin by the
ptxas that Triton ships, on a machine without a GPU, and move their rows in 16-byte accesses. The interpreter (the other tests) checks what the
kernels compute but not that the GPU compiler accepts them: types, loops over loaded bounds, constexpr
branches. Each signature the dispatcher launches is compiled once.

The compiler runs in a fresh process: the interpreter, which tests/conftest.py turns on, patches
triton.language in place, and the compiler cannot run on the patched functions afterwards."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from moedit.moe import glue_triton

SEGMENT_SUM = [  # (source, output, SEGMENTS, WEIGHTED, BIAS)
    ("*fp32", "*bf16", False, False, False),  # gather: float32 activations to bf16 expert rows
    ("*bf16", "*fp32", True, False, False),  # gather's backward: segment sum of bf16 row gradients
    ("*bf16", "*fp32", True, True, True),  # combine of GELU experts: weights and the output bias
    ("*bf16", "*fp32", True, True, False),  # combine of SwiGLU experts (no bias)
    ("*fp32", "*fp32", True, True, True),  # the same without autocast
]


def compile_all() -> list[str]:
    """Compile every kernel signature for sm_90; returns the names compiled."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def build(fn, signature: dict, constexprs: dict, num_warps: int = 4) -> None:
        # as a launch specialises them: pointers 16-byte aligned, strides and sizes multiples of 16
        hints = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k, v in signature.items()
                 if v.startswith("*") or k.startswith("stride") or k in ("M", "n")}
        src = ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in constexprs}}, constexprs=constexprs,
                        attrs=hints)
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
        assert kernel.asm["cubin"]
        # rows move in 16-byte accesses (ld/st .v4.b32), the memory-bound kernels' first requirement
        assert "ld.global.v4" in kernel.asm["ptx"] and "st.global.v4" in kernel.asm["ptx"], fn.__name__

    block, warps = glue_triton._row_tile(1152)  # the DiT-XL width

    done = []
    for src, out, segments, weighted, bias in SEGMENT_SUM:
        build(glue_triton._segment_sum_kernel,
              {"src_ptr": src, "idx_ptr": "*i64", "w_ptr": "*fp32", "ptr_ptr": "*i64", "bias_ptr": "*fp32",
               "bexp_ptr": "*i64", "out_ptr": out, "stride_src": "i64", "stride_out": "i64"},
              {"D": 1152, "SEGMENTS": segments, "WEIGHTED": weighted, "BIAS": bias, "BLOCK_D": block}, warps)
        done.append(f"segment_sum {src}->{out} segments={segments} weighted={weighted} bias={bias}")
    for bias in (False, True):
        build(glue_triton._combine_backward_kernel,
              {"dout_ptr": "*fp32", "ys_ptr": "*bf16", "tok_ptr": "*i64", "pos_ptr": "*i64", "w_ptr": "*fp32",
               "bias_ptr": "*fp32", "bexp_ptr": "*i64", "dys_ptr": "*bf16", "dw_ptr": "*fp32", "stride_dout": "i64",
               "stride_ys": "i64", "stride_dys": "i64"},
              {"D": 1152, "BIAS": bias, "BLOCK_D": block}, warps)
        done.append(f"combine_backward bias={bias}")
    for backward in (False, True):
        build(glue_triton._bias_gelu_kernel,
              {"z_ptr": "*bf16", "b_ptr": "*bf16", "e_ptr": "*i64", "g_ptr": "*bf16", "out_ptr": "*bf16", "M": "i32"},
              {"H": 4608, "BACKWARD": backward, "BLOCK_M": 16, "BLOCK_H": 256})
        build(glue_triton._swiglu_kernel,
              {"a_ptr": "*bf16", "b_ptr": "*bf16", "g_ptr": "*bf16", "out_ptr": "*bf16", "db_ptr": "*bf16", "n": "i64"},
              {"BACKWARD": backward, "BLOCK": glue_triton._SWIGLU_BLOCK})
        done += [f"bias_gelu backward={backward}", f"swiglu backward={backward}"]
    return done


@pytest.mark.skipif(not glue_triton.TRITON_FOUND, reason="triton is not installed")
def test_every_kernel_compiles_for_hopper() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[-2] == "compiled 11 kernel signatures for sm_90", proc.stdout


if __name__ == "__main__":
    names = compile_all()
    print("\n".join(names))
    print(f"compiled {len(names)} kernel signatures for sm_90")
