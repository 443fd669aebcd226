"""Shared test fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors: a second intra-op thread mostly waits for a core on a shared 2-core machine
    (measured: a 60×5 matmul took 16 ms with two threads, micro models 4× the CPU time). Modules opt in
    with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
