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


def _build_toy(name: str) -> str:
    """Build one cached toy (in a worker process): the demo's toy refuser or a chat toy by name."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # the collection phase's output is not captured
    if name == "toy":
        from abliterate.toy import toy_refuser

        return str(toy_refuser())
    from chat_toys import chat_toy

    return str(chat_toy(name)[0])


def pytest_collection_finish(session: pytest.Session) -> None:
    """When the chat toys' tests are collected, build every toy not cached yet two at a time, before any test runs.

    Training a toy takes one to two minutes on one thread and dominates a first run of the suite (six toys); the
    machines this runs on have two cores, and a toy's tiny matrices gain nothing from a second thread, so two train
    at once. The builds are the fixtures' own (each renamed into place whole); the fixtures then find them cached.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from chat_toys import TOYS, chat_toy_dir

    from abliterate.toy import toy_refuser_path

    if not {item.path.name for item in session.items} & CHAT_TOY_TESTS:
        return
    targets = {"toy": toy_refuser_path() / "toy_refuser.json",
               **{name: chat_toy_dir(name) / "chat_toy.json" for name in TOYS}}
    missing = [name for name, marker in targets.items() if not marker.is_file()]
    if len(missing) > 1:  # one toy builds as fast in its own fixture
        with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(_build_toy, missing))


CHAT_TOY_TESTS = {"test_chat_toys.py", "test_eval_chat_toys.py"}


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
