"""wss:// end to end with certificates made in the test (trustme): the client verifies by default and
says why it refused; the key travels only inside TLS.
"""

from __future__ import annotations

import asyncio
import ssl

import msgspec
import pytest
import torch
import trustme

from specd.daemon.server import Verifier
from specd.desktop.client.connection import ConnectionFailed, Endpoint, open_connection
from specd.shared import messages as m
from specd.shared.errors import ConfigError
from specd.shared.fingerprint import tokenizer_fingerprint
from specd.shared.protocol import ClientSession, RoundVerdict, Welcomed
from tests.daemon_support import daemon_config
from tests.tiny_models import save_tiny_model, tiny_tokenizer

pytestmark = pytest.mark.timeout(120)
torch.set_num_threads(1)
FINGERPRINT = tokenizer_fingerprint(tiny_tokenizer())
KEY = "tls-test-key"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("target"), seed=1)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A private CA, a certificate for localhost/127.0.0.1, and one for another name."""
    folder = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    for name, hosts in (("good", ("localhost", "127.0.0.1")), ("other", ("verifier.example.com",))):
        cert = ca.issue_cert(*hosts)
        cert.private_key_pem.write_to_path(str(folder / f"{name}.key"))
        with open(folder / f"{name}.pem", "wb") as fh:
            for blob in cert.cert_chain_pems:
                fh.write(blob.bytes())
    return folder


def tls_config(folder, pki, name: str = "good"):
    cfg = daemon_config(folder)
    server = msgspec.structs.replace(cfg.server, tls_cert=str(pki / f"{name}.pem"), tls_key=str(pki / f"{name}.key"))
    return msgspec.structs.replace(cfg, server=server)


async def handshake_and_round(ws) -> RoundVerdict:
    session = ClientSession(tokenizer=FINGERPRINT)
    await ws.send(session.hello())
    (welcome,) = session.receive(await asyncio.wait_for(ws.recv(), 10))
    assert isinstance(welcome, Welcomed)
    await ws.send(session.start([1, 5, 6], max_new_tokens=4, sampling=m.Sampling(temperature=0.0)))
    session.receive(await asyncio.wait_for(ws.recv(), 10))
    await ws.send(session.draft([7, 8])[1])
    (verdict,) = session.receive(await asyncio.wait_for(ws.recv(), 10))
    assert isinstance(verdict, RoundVerdict)
    return verdict


async def test_wss_end_to_end_with_a_private_ca(tiny_folder, pki):
    async with Verifier(tls_config(tiny_folder, pki), api_key=KEY) as v:
        assert v.url.startswith("wss://")
        for host in ("localhost", "127.0.0.1"):
            ws = await open_connection(Endpoint(f"wss://{host}:{v.port}", api_key=KEY, ca_file=str(pki / "ca.pem")))
            assert isinstance(ws.transport.get_extra_info("ssl_object"), ssl.SSLObject)
            assert ws.transport.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
            verdict = await handshake_and_round(ws)
            assert verdict.verdict.position == 3
            await ws.close()


async def test_the_client_verifies_certificates_by_default_and_says_why_it_refused(tiny_folder, pki):
    async with Verifier(tls_config(tiny_folder, pki), api_key=KEY) as v:
        # No ca_file: the private CA is not trusted.
        with pytest.raises(ConnectionFailed) as info:
            await open_connection(Endpoint(f"wss://localhost:{v.port}", api_key=KEY))
        text = str(info.value)
        assert f"refused the certificate of localhost:{v.port}" in text
        assert "unable to get local issuer certificate" in text and "ca_file" in text
        assert not info.value.retry
        assert v.metrics.sessions_total == 0, "nothing reached the protocol, and the key was never sent in clear"
        # Opting out of verification (debugging only) connects.
        ws = await open_connection(Endpoint(f"wss://localhost:{v.port}", api_key=KEY, tls_verify=False))
        await handshake_and_round(ws)
        await ws.close()


async def test_a_certificate_for_another_name_is_refused_with_the_reason(tiny_folder, pki):
    async with Verifier(tls_config(tiny_folder, pki, "other"), api_key=KEY) as v:
        with pytest.raises(ConnectionFailed) as info:
            await open_connection(Endpoint(f"wss://localhost:{v.port}", api_key=KEY, ca_file=str(pki / "ca.pem")))
        assert "refused the certificate" in str(info.value)
        assert "Hostname mismatch" in str(info.value) and "localhost" in str(info.value)


async def test_plain_ws_to_a_tls_server_and_wss_to_a_plain_server_fail_clearly(tiny_folder, pki):
    async with Verifier(tls_config(tiny_folder, pki), api_key=KEY) as v:
        with pytest.raises(ConnectionFailed) as info:
            await open_connection(Endpoint(f"ws://localhost:{v.port}", api_key=KEY, open_timeout=5))
        assert f"the connection to localhost:{v.port} was closed during the handshake" in str(info.value)
        assert "use a wss:// URL" in str(info.value)
    async with Verifier(daemon_config(tiny_folder), api_key=KEY) as v:
        with pytest.raises(ConnectionFailed) as info:
            await open_connection(Endpoint(f"wss://localhost:{v.port}", api_key=KEY, ca_file=str(pki / "ca.pem"),
                                           open_timeout=5))
        assert "TLS handshake" in str(info.value) and "wss:// server" in str(info.value)


async def test_a_wrong_key_over_tls_is_refused_with_a_message(tiny_folder, pki):
    async with Verifier(tls_config(tiny_folder, pki), api_key=KEY) as v:
        with pytest.raises(ConnectionFailed) as info:
            await open_connection(Endpoint(f"wss://localhost:{v.port}", api_key="wrong", ca_file=str(pki / "ca.pem")))
        assert "the key was refused" in str(info.value) and not info.value.retry
        assert not v.target.forward_positions


async def test_a_missing_or_mismatched_certificate_stops_the_verifier_at_start(tiny_folder, pki):
    cfg = tls_config(tiny_folder, pki)
    missing = msgspec.structs.replace(cfg, server=msgspec.structs.replace(cfg.server, tls_cert=str(pki / "no.pem")))
    with pytest.raises(ConfigError, match="does not exist"):
        await Verifier(missing).start()
    mismatched = msgspec.structs.replace(cfg, server=msgspec.structs.replace(cfg.server,
                                                                             tls_key=str(pki / "other.key")))
    with pytest.raises(ConfigError, match="TLS: cannot use"):
        await Verifier(mismatched).start()


@pytest.mark.parametrize(("client_section", "connects"), [
    ({"ca_file": "{pki}/ca.pem"}, True),  # the private CA from the config is trusted
    ({}, False),  # verified against the system's CAs by default: refused
    ({"tls_verify": False}, True),  # opting out (debugging only) connects
    ({"ca_file": "{pki}/ca.pem", "tls_verify": False}, True),
])
async def test_build_client_takes_tls_verify_and_ca_file_from_the_config(tiny_folder, pki, monkeypatch,
                                                                          client_section, connects):
    """``[client] tls_verify`` and ``ca_file`` reach the connection the launcher builds (``specd chat``,
    the tray app), checked by a real TLS handshake with the verifier's certificate."""
    from specd.desktop.commands.launch import build_client
    from specd.shared.config import load_config

    monkeypatch.setenv("SPECD_API_KEY", KEY)
    section = {k: v.format(pki=pki) if isinstance(v, str) else v for k, v in client_section.items()}
    async with Verifier(tls_config(tiny_folder, pki), api_key=KEY) as v:
        cfg = load_config(None, overrides={"models": {"draft": str(tiny_folder)},
                                           "client": {"server_url": f"wss://localhost:{v.port}", **section}})
        setup = await asyncio.to_thread(build_client, cfg, drafter=False)
        try:
            if connects:
                await setup.client.connect()
                assert setup.client.connected and v.metrics.sessions_total == 1
            else:
                with pytest.raises(ConnectionFailed, match="refused the certificate") as info:
                    await setup.client.connect()
                assert "ca_file" in str(info.value) and v.metrics.sessions_total == 0
        finally:
            await setup.client.close()
