"""Named client keys on a real verifier: add, use, revoke (open sessions closed, other keys untouched),
reload on file change and on SIGHUP, per-key limits, a loose keys file refused, /metrics per key, usage
in `keys list`, and a lookup by hash that compares nothing with the presented key."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import time
import urllib.request
from pathlib import Path

import msgspec
import pytest
import torch
from websockets.exceptions import ConnectionClosed, InvalidStatus

import specd.daemon.client_auth as client_auth
from specd.daemon.client_auth import ClientKeys
from specd.daemon.client_keys import key_digest, read_keys_file
from specd.daemon.keys_cli import keys_main
from specd.daemon.server import Verifier
from specd.shared import messages as m
from specd.shared.errors import ConfigError
from specd.shared.fingerprint import tokenizer_fingerprint
from tests.daemon_process import DaemonProcess
from tests.daemon_support import Client, daemon_config, eventually
from tests.tiny_models import save_tiny_model, tiny_tokenizer

pytestmark = pytest.mark.timeout(180)
torch.set_num_threads(1)
FINGERPRINT = tokenizer_fingerprint(tiny_tokenizer())
GREEDY = m.Sampling(temperature=0.0)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("target"), seed=1)


def keys(capsys, keys_file: Path, *args: str) -> str:
    """``specd-verifier keys ARGS --keys-file FILE``; its stdout (the key, for ``add``)."""
    capsys.readouterr()
    assert keys_main([*args, "--keys-file", str(keys_file)]) == 0
    return capsys.readouterr().out.strip()


def keyed_config(folder: Path, keys_file: Path, **limits):
    cfg = daemon_config(folder, **limits)
    return msgspec.structs.replace(cfg, server=msgspec.structs.replace(cfg.server, keys_file=str(keys_file)))


async def metrics(v: Verifier) -> str:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{v.port}/metrics", timeout=10) as response:
            return response.read().decode()

    return await asyncio.to_thread(get)


async def refused(url: str, key: str | None) -> int:
    with pytest.raises(InvalidStatus) as info:
        await Client.open(url, FINGERPRINT, api_key=key)
    return info.value.response.status_code


async def test_revoking_a_key_refuses_it_and_closes_its_sessions_but_no_others(tiny_folder, tmp_path, capsys,
                                                                                caplog):
    caplog.set_level(logging.INFO, logger="specd.daemon")
    keys_file = tmp_path / "keys.toml"
    alice, bob = keys(capsys, keys_file, "add", "alice"), keys(capsys, keys_file, "add", "bob")
    assert oct(keys_file.stat().st_mode & 0o777) == "0o600"
    assert alice not in keys_file.read_text() and key_digest(alice).hex() in keys_file.read_text()
    async with Verifier(keyed_config(tiny_folder, keys_file)) as v:
        assert await refused(v.url, None) == 401 and await refused(v.url, "specd-unknown") == 401
        alice_session = await Client.open(v.url, FINGERPRINT, api_key=alice)
        bob_session = await Client.open(v.url, FINGERPRINT, api_key=bob)
        await bob_session.start([1, 5, 6], max_new_tokens=4, sampling=GREEDY, mode="cloud")
        assert len(await bob_session.stream_all()) == 4

        revoked_at = time.monotonic()
        keys(capsys, keys_file, "revoke", "alice")  # the verifier sees the file change; no signal, no restart
        error = await alice_session.message(timeout=5.0)
        assert isinstance(error, m.Error) and error.code == "key_revoked" and error.fatal and "alice" in error.message
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(alice_session.ws.recv(), 5.0)
        assert time.monotonic() - revoked_at <= 5.0
        assert alice_session.ws.close_code == 1008
        assert await refused(v.url, alice) == 401  # from the next connection on

        await bob_session.start([1, 7, 8], max_new_tokens=4, sampling=GREEDY, mode="cloud")  # untouched
        assert len(await bob_session.stream_all()) == 4
        await bob_session.start([1, 9, 10], max_new_tokens=8, sampling=GREEDY)  # and a speculative round
        verdict = await bob_session.round([5, 6])
        text = await metrics(v)
        assert 'specd_client_sessions_total{client="alice"} 1' in text
        assert 'specd_client_sessions{client="bob"} 1' in text
        assert 'specd_client_rounds_total{client="bob"} 1' in text
        assert 'specd_client_refusals_total{client="alice",reason="key_revoked"} 2' in text  # the close, the 401
        # Only bob ran prompts: all of the verifier's prefill is his; then 8 streamed tokens and the round's.
        prefilled = int(re.search(r"^specd_prefill_tokens_total (\d+)$", text, re.M).group(1))
        assert f'specd_client_prompt_tokens_total{{client="bob"}} {prefilled}' in text
        bob_tokens = prefilled + 8 + len(verdict.new_tokens)
        assert f'specd_client_tokens_total{{client="bob"}} {bob_tokens}' in text
        await bob_session.close()
        await eventually(lambda: v.sessions == 0, "bob's session closed")
    # The journal: one line per session opened and closed, with the key's name and the peer, never the key.
    journal = [r.getMessage() for r in caplog.records]
    for name in ("alice", "bob"):
        assert sum(bool(re.fullmatch(rf"session \w+ opened from 127\.0\.0\.1:\d+, key {name}", line))
                   for line in journal) == 1
        assert sum(bool(re.fullmatch(rf"session \w+ closed \(\d+\) from 127\.0\.0\.1:\d+, key {name}", line))
                   for line in journal) == 1
    assert not any(alice in line or bob in line for line in journal)
    capsys.readouterr()
    assert keys_main(["list", "--keys-file", str(keys_file)]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].split()[:5] == ["NAME", "STATUS", "CREATED", "LAST", "USED"]
    rows = {line.split()[0]: line.split() for line in listing[1:]}
    assert rows["alice"][1] == "revoked" and rows["bob"][1] == "active"
    assert rows["bob"][4] == str(bob_tokens) and rows["bob"][5] == "1"  # tokens used and sessions, kept across restarts
    assert alice not in "\n".join(listing) and bob not in "\n".join(listing)


async def test_per_key_session_and_token_limits_are_refused_naming_the_limit(tiny_folder, tmp_path, capsys):
    keys_file = tmp_path / "keys.toml"
    carol = keys(capsys, keys_file, "add", "carol", "--max-sessions", "1")
    dave = keys(capsys, keys_file, "add", "dave", "--tokens-per-minute", "10")
    async with Verifier(keyed_config(tiny_folder, keys_file)) as v:
        first = await Client.open(v.url, FINGERPRINT, api_key=carol)
        second = await Client.open(v.url, FINGERPRINT, api_key=carol, hello=False)
        error = await second.message()
        assert error.code == "too_many_sessions" and "max_sessions = 1" in error.message and "carol" in error.message
        other = await Client.open(v.url, FINGERPRINT, api_key=dave)  # another key is not held back by carol's
        await first.close()
        await eventually(lambda: v.sessions == 1, "carol's session closed")
        again = await Client.open(v.url, FINGERPRINT, api_key=carol)  # its slot is free again
        await again.close()

        # dave may use 10 tokens a minute: a 3-token prompt and a 40-token answer overdraw it once, then stop.
        await other.ws.send(other.session.start([1, 5, 6], max_new_tokens=40, sampling=GREEDY, mode="cloud"))
        streamed, error = 0, None
        while error is None:
            msg = await other.message()
            if isinstance(msg, m.Tokens):
                streamed += len(msg.tokens)
            elif isinstance(msg, m.Error):
                error = msg
        assert error.code == "rate_limited" and error.fatal and "tokens_per_minute = 10" in error.message
        # Admitted while the minute's budget lasted (plus what refilled meanwhile: a sixth of a token a second).
        assert 10 <= 2 + streamed <= 11, streamed
        text = await metrics(v)
        assert 'specd_client_refusals_total{client="carol",reason="too_many_sessions"} 1' in text
        assert 'specd_client_refusals_total{client="dave",reason="rate_limited"} 1' in text

        # A new limit takes effect on reload, without a restart.
        keys(capsys, keys_file, "set-limits", "carol", "--max-sessions", "0")
        await eventually(lambda: v.gate.keys.usage["carol"].record.max_sessions == 0, "the new limit read")
        sessions = [await Client.open(v.url, FINGERPRINT, api_key=carol) for _ in range(2)]
        for client in sessions:
            await client.close()


async def test_a_keys_file_others_can_read_is_refused_naming_it(tiny_folder, tmp_path, capsys):
    keys_file = tmp_path / "keys.toml"
    key = keys(capsys, keys_file, "add", "erin")
    keys_file.chmod(0o640)
    with pytest.raises(ConfigError, match=f"{keys_file}.*mode 0640.*chmod 600"):
        Verifier(keyed_config(tiny_folder, keys_file))
    assert keys_main(["list", "--keys-file", str(keys_file)]) == 2
    assert "chmod 600" in capsys.readouterr().err

    keys_file.chmod(0o600)
    async with Verifier(keyed_config(tiny_folder, keys_file)) as v:
        keys(capsys, keys_file, "add", "frank")
        keys_file.chmod(0o604)  # loosened while serving: the reload is refused and the keys in force stay
        await v.reload_keys()
        client = await Client.open(v.url, FINGERPRINT, api_key=key)
        await client.close()
        assert "frank" not in v.gate.keys.usage


async def test_the_key_from_the_environment_is_the_one_named_default(tiny_folder, tmp_path, capsys):
    keys_file = tmp_path / "keys.toml"
    named = keys(capsys, keys_file, "add", "gina")
    async with Verifier(keyed_config(tiny_folder, keys_file), api_key="shared-secret") as v:
        for key in ("shared-secret", named):
            client = await Client.open(v.url, FINGERPRINT, api_key=key)
            await client.close()
        await eventually(lambda: v.sessions == 0, "sessions closed")
        text = await metrics(v)
        assert 'specd_client_sessions_total{client="default"} 1' in text
        assert 'specd_client_sessions_total{client="gina"} 1' in text
    assert keys_main(["add", "default", "--keys-file", str(keys_file)]) == 2
    assert "SPECD_API_KEY" in capsys.readouterr().err


def test_a_key_is_found_by_its_hash_and_only_digests_are_compared(tmp_path, capsys, monkeypatch):
    """Timing safety: the presented key is hashed and looked up by digest; the one comparison is between two
    digests in constant time, so how much of a guess matches a real key changes nothing that runs."""
    keys_file = tmp_path / "keys.toml"
    real = keys(capsys, keys_file, "add", "hank")
    for i in range(999):
        keys_file.write_text(keys_file.read_text() + f'[keys.k{i}]\nsha256 = "{key_digest(str(i)).hex()}"\n')
    table = ClientKeys(keys_file, None)
    assert len(table.by_digest) == 1000 and real not in repr(table.by_digest)
    compared = []
    monkeypatch.setattr(client_auth.hmac, "compare_digest", lambda a, b: compared.append((a, b)) or a == b)
    for guess in (real[:-1] + ("A" if real[-1] != "A" else "B"), "x" * len(real), real + "x", ""):
        assert table.authenticate([f"Bearer {guess}"]) is None
    assert compared == []  # a near miss and a far miss do the same work: one hash, one dict lookup
    assert table.authenticate([f"Bearer {real}"]).name == "hank"
    assert compared == [(key_digest(real), key_digest(real))]
    assert table.authenticate([f"Bearer {real}", f"Bearer {real}"]) is None  # repeated header
    assert table.authenticate([f"Basic {real}"]) is None
    assert read_keys_file(keys_file)["hank"].digest == key_digest(real)


async def test_sighup_reloads_the_keys_of_a_running_verifier_process(tiny_folder, tmp_path, capsys):
    """The file is edited in place with its size and time kept, which the change poll cannot see: only
    SIGHUP (what `systemctl reload` sends) makes the verifier read it."""
    keys_file = tmp_path / "keys.toml"
    ivan = keys(capsys, keys_file, "add", "ivan")
    daemon = DaemonProcess(tiny_folder, tmp_path, args=("--keys-file", str(keys_file)))
    await daemon.astart()
    try:
        session = await Client.open(daemon.url, FINGERPRINT, api_key=ivan)
        before = os.stat(keys_file)
        text = keys_file.read_text()
        digest = key_digest(ivan).hex()
        with open(keys_file, "r+", encoding="utf-8") as fh:  # same size, same inode: a changed hash
            fh.write(text.replace(digest, digest[::-1]))
        os.utime(keys_file, ns=(before.st_atime_ns, before.st_mtime_ns))
        await asyncio.sleep(2.5)  # more than two polls
        still = await Client.open(daemon.url, FINGERPRINT, api_key=ivan)
        await still.close()
        daemon.signal(signal.SIGHUP)
        error = await session.message(timeout=5.0)
        assert error.code == "key_revoked"
        assert await refused(daemon.url, ivan) == 401
        assert daemon.proc.poll() is None  # reloaded, not restarted
    finally:
        daemon.stop()
