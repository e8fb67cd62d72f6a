"""Shared fixtures: every model a test uses is built locally (no network)."""

import os

# Tests never reach the Hub: anything that tries gets an immediate error instead of a hang.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
