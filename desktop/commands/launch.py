"""Putting an edge client together from the config: drafter on the best device, tokenizer, endpoint.

Used by ``specd chat``, ``specd demo``, ``specd bench`` and the tray app. It blocks (model preparation
and loading), so async callers run it in a thread.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from specd.desktop.client.answer import Settings
from specd.desktop.client.connection import Endpoint
from specd.desktop.client.edge_client import EdgeClient, StatusCallback
from specd.desktop.drafters.devices import DeviceChoice
from specd.shared.config import Config
from specd.shared.config_origins import Origins
from specd.shared.errors import DeviceError, ModelError
from specd.shared.fingerprint import tokenizer_fingerprint
from specd.shared.models import Progress, ensure_hf_folder, load_tokenizer_from, resolve_source

log = logging.getLogger("specd.client")


@dataclass(slots=True)
class ClientSetup:
    client: EdgeClient
    choice: DeviceChoice | None  # None: cloud-only (no drafter)
    settings: Settings
    tokenizer: Any
    drafter_error: str | None = None  # why the client is cloud-only although a drafter was wanted


def with_draft(config: Config, model_path: str | None) -> Config:
    """``config`` with ``--model-path`` as the draft model."""
    if not model_path:
        return config
    return msgspec.structs.replace(config, models=msgspec.structs.replace(config.models, draft=model_path))


def build_client(config: Config, *, device: str | None = None, model_path: str | None = None,
                 progress: Progress | None = None, drafter: bool = True, url: str | None = None,
                 on_status: StatusCallback | None = None) -> ClientSetup:
    """Load the draft model (falling back across devices, then to cloud-only when none can run it)
    and return an unconnected :class:`EdgeClient` with the settings from ``config``."""
    say = progress or (lambda _msg: None)
    config = with_draft(config, model_path)
    loaded, choice, error = None, None, None
    if drafter:
        from specd.desktop.drafters import load_drafter

        try:
            loaded, choice = load_drafter(config, device, say)
        except (DeviceError, ModelError) as exc:
            error = str(exc)
    # Cloud-only answers need the draft model's tokenizer too: when it cannot be loaded either, its
    # error is the one to show, and "cloud-only" would be untrue.
    tokenizer = loaded.load_tokenizer() if loaded is not None else load_tokenizer(config, say)
    if error is not None:
        say(f"No draft model can run here, so answers are cloud-only: {error}")
        log.warning("cloud-only: %s", error)
    client = EdgeClient(Endpoint.from_config(config.client, url), tokenizer=tokenizer,
                        fingerprint=tokenizer_fingerprint(tokenizer), drafter=loaded,
                        on_disconnect=config.client.on_disconnect, reconnect_max_s=config.client.reconnect_max_s,
                        on_status=on_status)
    return ClientSetup(client=client, choice=choice, settings=Settings.from_config(config), tokenizer=tokenizer,
                       drafter_error=error)


def check_draft_model(config: Config, origins: Origins) -> None:
    """Refuse, before anything starts, a draft model that is not there (a missing file or folder, a
    folder that holds no model or no tokenizer): without it there is no tokenizer, so not even a
    cloud-only answer. The message names where the model was set (``--model-path``, a file)."""
    from specd.desktop.drafters.openvino import is_openvino_folder
    from specd.desktop.drafters.ortgenai import is_genai_folder

    try:
        source = resolve_source(config.models.draft)
        folder = Path(source.ref)
        if source.kind == "folder" and not (is_genai_folder(folder) or is_openvino_folder(folder)):
            ensure_hf_folder(source)  # a folder is only checked here, never prepared
    except ModelError as exc:
        raise ModelError(f"{origins.name('models.draft')}: {exc}") from None


def load_tokenizer(config: Config, progress: Progress | None = None) -> Any:
    """The draft model's tokenizer without loading the model (cloud-only clients need it too)."""
    spec = config.models.draft
    folder = Path(spec).expanduser()
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        folder = ensure_hf_folder(spec, cache_override=config.models.cache_dir, progress=progress)
    return load_tokenizer_from(folder)
