"""The verifier as a Ray Serve application (daemon/ray_serve.py) on a local two-replica cluster.

One cluster per ingress (2 CPUs, half a CPU per replica, tests/ray_cluster.py): Serve's own HTTP proxy
and HAProxy with direct ingress (the documented one). Two replicas of a tiny target, every client
through the cluster's ingress: the bearer key is checked with a real HTTP 401, /healthz answers like the
daemon's, eight concurrent greedy sessions land on both replicas and equal transformers' greedy
decoding, and killing a replica mid-answer leaves every answer identical to its uninterrupted twin
(its clients reconnect through the ingress to the other replica and resume). The replicas read one keys
file (a path present on every node) beside SPECD_API_KEY: two named keys are served, and a key revoked in
the file is refused and its session closed without redeploying.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("ray.serve", reason="the cluster extra (ray[serve]) is not installed")

import ray
import torch
import websockets
from ray import serve
from transformers import AutoTokenizer

from specd.daemon.client_keys import add_record, new_key, render_keys_file, write_private
from specd.daemon.keys_cli import keys_main
from specd.daemon.ray_serve import APP_NAME, DEPLOYMENT_NAME, build_app
from specd.desktop.client.answer import Settings
from specd.desktop.client.connection import Endpoint
from specd.desktop.client.edge_client import EdgeClient
from specd.desktop.drafters.torch_drafter import TorchDrafter
from specd.shared import messages as m
from specd.shared.config import LimitsConfig
from specd.shared.errors import ERROR_RULES, CloseCode, ErrorCode
from specd.shared.fingerprint import tokenizer_fingerprint
from specd.shared.sampling import SamplingParams
from tests.daemon_support import Client, greedy_reference
from tests.ray_cluster import INGRESSES, free_port, haproxy_missing, local_cluster
from tests.tiny_models import save_tiny_model, tiny_llama

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]
torch.set_num_threads(1)
KEY = "ray-cluster-test-key"
SESSIONS = 8
PROMPTS = [[1, 33 + i % 4, 34, 35] for i in range(SESSIONS)]
GREEDY = Settings(sampling=SamplingParams(temperature=0.0), max_new_tokens=120, seed=0, gamma_max=4)


@dataclass
class Cluster:
    port: int
    target: Path
    draft: Path
    keys_file: Path
    named_keys: dict[str, str]

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"


@pytest.fixture(scope="module", params=INGRESSES)
def cluster(request, tmp_path_factory) -> Cluster:
    ingress = request.param
    if ingress == "haproxy" and (reason := haproxy_missing()):
        pytest.skip(f"the HAProxy ingress cannot run here: {reason}")
    target = save_tiny_model(tmp_path_factory.mktemp("target"), seed=1)
    draft = save_tiny_model(tmp_path_factory.mktemp("draft"), seed=2)
    keys_file = tmp_path_factory.mktemp("keys") / "keys.toml"
    named_keys = {name: new_key() for name in ("alice", "bob")}
    records = {}
    for name, key in named_keys.items():
        records = add_record(records, name, key)
    write_private(keys_file, render_keys_file(records))
    env = {"SPECD_API_KEY": KEY, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with local_cluster(ingress, free_port(), env) as local:
        serve.run(build_app({
            "overrides": {"models": {"target": str(target)},
                          "server": {"device": "cpu", "keys_file": str(keys_file)},
                          "limits": {"max_sessions": SESSIONS}},
            "threads": 1,
            "deployment": {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.5}},
        }), name=APP_NAME, route_prefix="/")
        local.wait_for_replicas(2)
        yield Cluster(port=local.port, target=target, draft=draft, keys_file=keys_file, named_keys=named_keys)


@pytest.fixture(scope="module")
def expected() -> list[list[int]]:
    model = tiny_llama(1)
    return [greedy_reference(model, prompt, GREEDY.max_new_tokens, [2]) for prompt in PROMPTS]


def make_client(cluster: Cluster, *, draft: bool, key: str = KEY) -> EdgeClient:
    tokenizer = AutoTokenizer.from_pretrained(str(cluster.target))
    drafter = TorchDrafter(cluster.draft, "cpu") if draft else None
    # No local fallback: every token of a greedy answer comes from (or is checked by) a replica.
    return EdgeClient(Endpoint(url=cluster.url, api_key=key, open_timeout=10), tokenizer=tokenizer,
                      fingerprint=tokenizer_fingerprint(tokenizer), drafter=drafter, on_disconnect="wait",
                      reconnect_max_s=30.0)


def replica_of(client: EdgeClient) -> str:
    assert client.welcome is not None
    server = client.welcome.server
    assert "ray replica " in server, server
    return server.rsplit("ray replica ", 1)[1].rstrip(")")


def get(cluster: Cluster, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{cluster.port}{path}", timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_healthz_answers_like_the_daemon(cluster):
    status, body = get(cluster, "/healthz")
    health = json.loads(body)
    assert status == 200 and health["ready"] is True
    assert health["model"] == "target" or health["model"].endswith(cluster.target.name)
    assert health["device"] == "cpu" and {"sessions", "uptime"} <= set(health)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}],
                         ids=["missing", "wrong", "not-bearer"])
async def test_a_wrong_or_missing_key_gets_401_through_the_proxy(cluster, headers):
    with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
        async with websockets.connect(cluster.url, additional_headers=headers, open_timeout=10):
            pass
    response = refused.value.response
    assert response.status_code == 401
    assert b"API key" in response.body


async def test_two_named_keys_are_served_and_a_revoked_one_is_closed_and_refused(cluster):
    fingerprint = tokenizer_fingerprint(AutoTokenizer.from_pretrained(str(cluster.target)))
    greedy = m.Sampling(temperature=0.0)
    sessions = {name: await Client.open(cluster.url, fingerprint, api_key=key)
                for name, key in cluster.named_keys.items()}
    try:
        for client in sessions.values():
            await client.start([1, 5, 6], max_new_tokens=4, sampling=greedy, mode="cloud")
            assert len(await client.stream_all()) == 4
        assert keys_main(["revoke", "bob", "--keys-file", str(cluster.keys_file)]) == 0
        error = await sessions["bob"].message(timeout=10.0)  # its replica saw the file change
        assert error.code == "key_revoked" and error.fatal
        # Each replica reads the file on its own (within a second): until the other one has, it may still serve.
        for _attempt in range(20):
            try:
                late = await Client.open(cluster.url, fingerprint, api_key=cluster.named_keys["bob"])
            except websockets.exceptions.InvalidStatus as refused:
                assert refused.response.status_code == 401
                break
            await late.close()
            await asyncio.sleep(0.25)
        else:
            raise AssertionError("the revoked key is still served 5 s after the file changed")
        await sessions["alice"].start([1, 7, 8], max_new_tokens=4, sampling=greedy, mode="cloud")
        assert len(await sessions["alice"].stream_all()) == 4
    finally:
        await asyncio.gather(*(client.close() for client in sessions.values()), return_exceptions=True)


async def test_errors_close_with_the_codes_of_the_protocol(cluster):
    auth = {"Authorization": f"Bearer {KEY}"}
    async with websockets.connect(cluster.url, additional_headers=auth, open_timeout=10) as ws:
        await ws.send(m.encode(m.Hello(protocol=m.PROTOCOL_VERSION, tokenizer="0" * 64, client="test")))
        error = m.decode_server(await ws.recv())
        assert isinstance(error, m.Error) and error.code == "tokenizer_mismatch" and error.fatal
        with pytest.raises(websockets.exceptions.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
    assert ws.close_code == int(ERROR_RULES[ErrorCode.TOKENIZER_MISMATCH].close)
    async with websockets.connect(cluster.url, additional_headers=auth, open_timeout=10, max_size=None) as ws:
        await ws.send(b"\x00" * (LimitsConfig().max_frame_bytes + 1))
        with pytest.raises(websockets.exceptions.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
    assert ws.close_code == CloseCode.MESSAGE_TOO_BIG


async def test_eight_sessions_spread_over_both_replicas_and_equal_greedy_decoding(cluster, expected):
    clients = [make_client(cluster, draft=i % 2 == 0) for i in range(SESSIONS)]
    try:
        # All connected before any answers, so all eight are open at once and Serve places each.
        await asyncio.gather(*(client.connect() for client in clients))
        replicas = [replica_of(client) for client in clients]
        answers = await asyncio.gather(*(client.generate(list(prompt), GREEDY)
                                         for client, prompt in zip(clients, PROMPTS, strict=True)))
    finally:
        await asyncio.gather(*(client.close() for client in clients))
    assert len(set(replicas)) == 2, replicas
    for answer, reference in zip(answers, expected, strict=True):
        assert answer.token_ids == reference
    assert any(answer.stats.rounds for answer in answers)  # the drafting half ran verification rounds


def kill_replica(replica_id: str) -> None:
    names = [actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
             if actor["name"].startswith("SERVE_REPLICA::") and actor["name"].endswith(f"#{replica_id}")
             and f"#{DEPLOYMENT_NAME}#" in actor["name"]]
    assert len(names) == 1, names
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)


async def test_killing_a_replica_mid_answer_loses_and_repeats_nothing(cluster, expected):
    clients = [make_client(cluster, draft=False) for _ in range(SESSIONS)]
    killed: list[str] = []

    def watch(client: EdgeClient):
        def on_piece(_piece) -> None:
            run = client._run
            if not killed and run is not None and len(run.committed) - run.prompt_len >= 20:
                killed.append(replica_of(client))
                kill_replica(killed[0])
        return on_piece

    try:
        await asyncio.gather(*(client.connect() for client in clients))
        before = [replica_of(client) for client in clients]
        answers = await asyncio.gather(*(client.generate(list(prompt), GREEDY, watch(client))
                                         for client, prompt in zip(clients, PROMPTS, strict=True)))
    finally:
        await asyncio.gather(*(client.close() for client in clients))
    assert killed, "no answer reached 20 tokens"
    hit = [i for i, replica in enumerate(before) if replica == killed[0]]
    assert hit, before
    for i, (answer, reference) in enumerate(zip(answers, expected, strict=True)):
        assert answer.token_ids == reference, (i, answer.finish_reason, answer.stats.reconnects)
        assert [t for piece in answer.pieces for t in piece.token_ids] == answer.token_ids
    assert all(answers[i].stats.reconnects >= 1 for i in hit)
