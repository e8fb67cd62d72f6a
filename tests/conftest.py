"""Shared fixtures: every model a test uses is built locally (no network)."""

import os
from pathlib import Path

import pytest

# Tests never reach the Hub: anything that tries gets an immediate error instead of a hang.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The toys' matrices are tiny: a second torch thread only adds synchronisation, and on a shared 2-core machine it
# made a subprocess `abliterate run` of the toy ten times slower (76 s instead of 8 s). Set before torch is imported,
# so the test process and every `abliterate` subprocess it starts get one thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def toy_refuser_dir() -> Path:
    """The toy refuser checkpoint (built once per machine and cached; see abliterate/toy.py)."""
    from abliterate.toy import toy_refuser

    return toy_refuser()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: a second torch thread only adds synchronisation, badly so on a shared 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
