"""Command-line options shared by several commands, and how they become config overrides.

Kept apart from abliterate.cli so that the command modules can share them without importing each other.
"""

from __future__ import annotations

import os
from typing import Annotated

import typer

# Options shared by the commands that load a model or talk to the Hub.
TrustRemoteCode = Annotated[bool | None, typer.Option(
    "--trust-remote-code/--no-trust-remote-code", help="Run code shipped with the model repository (only code you trust).")]
DeviceMap = Annotated[str | None, typer.Option("--device-map", help="accelerate device_map: auto, cpu, cuda:0, ...")]
MaxMemory = Annotated[str | None, typer.Option(
    "--max-memory", help='Memory per device when loading, e.g. "0=20GiB,cpu=60GiB".')]
OffloadFolder = Annotated[str | None, typer.Option(
    "--offload-folder", help="Folder for weights offloaded to disk when they do not fit.")]
Token = Annotated[str | None, typer.Option(
    "--token", help="Hugging Face token (default: HF_TOKEN or `hf auth login`); never written to a file.")]


def model_flags(trust_remote_code: bool | None, device_map: str | None, max_memory: str | None,
                offload_folder: str | None) -> dict[str, object]:
    """The model-loading flags as config overrides (None: not given, the config decides)."""
    return {"model.trust_remote_code": trust_remote_code, "model.device_map": device_map,
            "model.max_memory": max_memory, "model.offload_folder": offload_folder}


def use_token(token: str | None) -> None:
    """Hand --token to huggingface_hub the way it reads one (HF_TOKEN), so it is never part of a config."""
    if token:
        os.environ["HF_TOKEN"] = token
