"""Starting and stopping the local API from a config: the command and the tray app share this.

The first edge client is built (and connected, when the verifier is there) before the server listens,
so a missing draft model or a bad key stops it at start with its reason; the pool builds more clients
as requests overlap, up to ``[api] max_concurrent``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

from specd.desktop.client.connection import ConnectionFailed
from specd.desktop.client.edge_client import EdgeClient, StatusCallback
from specd.desktop.commands.launch import ClientSetup, build_client
from specd.desktop.serve.app import ApiServer, BindError, build_app
from specd.desktop.serve.pool import ClientPool
from specd.desktop.serve.state import ServeState
from specd.shared.addresses import is_loopback
from specd.shared.config import Config, read_secret
from specd.shared.config_origins import Origins
from specd.shared.errors import ConfigError, RemoteError

log = logging.getLogger("specd.serve")


@dataclass
class LocalApi:
    server: ApiServer
    pool: ClientPool
    state: ServeState
    first: ClientSetup

    @property
    def url(self) -> str:
        return self.server.url

    async def stop(self) -> None:
        await self.server.stop()
        await self.pool.close()


def api_key(config: Config, origins: Origins | None = None) -> str | None:
    """The key apps must send (None: none), refused when the API listens beyond this machine without one."""
    api = config.api
    key = read_secret(api.api_key_env, "") if api.api_key_env else None
    if not key and not is_loopback(api.host):
        origins = origins or Origins(traced=False)
        where = (f"the environment variable {api.api_key_env} (named by {origins.name('api.api_key_env')}) is unset"
                 if api.api_key_env else f"{origins.name('api.api_key_env')} is empty")
        raise ConfigError(f"{origins.describe('api.host', api.host)} listens beyond this machine, which needs a key, "
                          f"but {where}: set a key there, or listen on 127.0.0.1")
    return key


async def start_local_api(config: Config, origins: Origins | None = None, *, device: str | None = None,
                          drafter: bool = True, progress: Callable[[str], object] | None = None,
                          on_status: StatusCallback | None = None, first: ClientSetup | None = None,
                          verifier_key: str | None = None) -> LocalApi:
    """Build the first client (unless given), connect it when the verifier answers, and listen.
    ``verifier_key``: the verifier's key when it is not in the config's place (the app's keyring)."""
    key = api_key(config, origins)

    def build() -> ClientSetup:
        setup = build_client(config, device=device, progress=progress, drafter=drafter, on_status=on_status)
        if verifier_key:
            setup.client.endpoint = dataclasses.replace(setup.client.endpoint, api_key=verifier_key)
        return setup

    async def another() -> EdgeClient:
        setup = await asyncio.to_thread(build)
        await _connect(setup.client)
        return setup.client

    setup = first or await asyncio.to_thread(build)
    pool = ClientPool(another, config.api.max_concurrent)
    pool.add(setup.client)
    await _connect(setup.client)
    state = ServeState(pool=pool, defaults=setup.settings, tokenizer=setup.tokenizer,
                       configured_model=config.models.target, verifier_url=config.client.server_url)
    server = ApiServer(build_app(state, api_key=key, cors_origins=config.api.cors_origins,
                                 host=config.api.host), config.api.host,
                       config.api.port)
    try:
        await server.start()
    except BindError as exc:
        await pool.close()
        names = origins or Origins(traced=False)
        raise ConfigError(f"{exc}; {names.describe('api.port', config.api.port)}") from None
    return LocalApi(server=server, pool=pool, state=state, first=setup)


async def _connect(client: EdgeClient) -> None:
    """Shake hands now (the model's name and limits); a verifier that is down is tried again per answer."""
    if client.connected:
        return
    with contextlib.suppress(ConnectionFailed, RemoteError, OSError):
        await client.connect()
    if not client.connected:
        log.warning("the verifier at %s is not reachable yet; answers follow [client] on_disconnect",
                    client.endpoint.display)
