"""tests/train: one intra-op thread per process. On the shared 2-core machine, two OpenMP threads per test
process next to DALI's threads and other jobs oversubscribe the cores: a ResNet-18 step at 32 px measured
1-3 s with 2 threads against 0.35 s with 1. Correctness, not speed, is tested here."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # subprocesses (CLI, torchrun) inherit it
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
