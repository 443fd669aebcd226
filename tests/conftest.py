"""Shared test fixtures."""

import os

import pytest
import torch

# The fused MoE backend's Triton kernels (moe/glue_triton.py) run under Triton's interpreter where no
# GPU is: it has to be on before the kernels are defined, so before any test module imports moedit.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors: a second intra-op thread mostly waits for a core on a shared 2-core machine
    (measured: a 60×5 matmul took 16 ms with two threads, micro models 4× the CPU time). Modules opt in
    with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
