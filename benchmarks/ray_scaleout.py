"""Scale-out benchmark: the verifier as a Ray Serve application, one and two replicas, against the daemon.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ray_scaleout.py --sessions 8 --duration 15 \\
        --report benchmarks/ray-scaleout.md

The embedded target (SmolLM2-135M-Instruct, fp32), one CPU core and one torch thread per replica, replayed
drafts (benchmarks/replay_sessions.py: every session measures the same window after every warm-up).
Each of Serve's ingresses (``--ingress``, default both: Serve's Python proxy and HAProxy with direct
ingress, tests/ray_cluster.py) gets its own local cluster in the same run. Figures per ingress:

- aggregate verified tokens/s, 1 replica and 2 replicas (ratio), each deployed afresh, at three loads:
  ``--sessions`` concurrent sessions (the headline), the same through replicas that run one session per
  forward (``[server] batching = false``: scale-out without the batched engine's effect), and
  ``--saturated-sessions`` (a load past which one replica's batched throughput no longer grows); with
  each, the replicas' forward times (p50, from the verdicts) and the scaling those forward times allow
  if every forward holds every session of its replica: what batching leaves for a second replica;
- per-round latency (send to verdict, one session, p50) through the ingress against the standalone
  ``specd-verifier``, running beside the cluster and measured in turns with it (three windows each, so
  both see the same load from the machine's other users): the ingress's added latency per round, split
  into the verifier's own time (queue + forward, from the verdict) and the rest (transport, proxy,
  session driver); for HAProxy also straight to the replica's own port, which isolates HAProxy's hop;
- CPU seconds per second during each window: clients, replicas, proxy, Ray's daemons, other users.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.*, benchmarks.*, run from a checkout

from benchmarks.replay_sessions import GAMMA, KEY, Measured, measure, merged
from tests.ray_cluster import INGRESSES, free_port, haproxy_missing, local_cluster

MODEL = "smollm2-135m-instruct"
LATENCY_TURNS = 3  # latency windows per target, alternating daemon / ingress (/ replica port)
SLOT_TOKENS = 1024  # [limits] max_total_tokens: a replayed session needs ~100 positions; keeps 32 slots small


@dataclass(frozen=True)
class Load:
    """One load measured on 1 and then 2 replicas; its results are ``<key>replicas_1`` and ``_2``."""

    key: str
    sessions: int
    batching: bool = True

    def label(self) -> str:
        return f"{self.sessions} sessions" + ("" if self.batching else ", one session per forward")


def prompt_for(index: int, tokenizer) -> list[int]:
    question = [{"role": "user", "content": f"Write a short story about the number {index}."}]
    text = tokenizer.apply_chat_template(question, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def paired_latency(targets: dict[str, str], fingerprint: str, prompt: list[int], duration_s: float) -> dict:
    """One session on each target in turns (LATENCY_TURNS windows each), so that all see the same machine load."""
    parts: dict[str, list[Measured]] = {key: [] for key in targets}
    for _turn in range(LATENCY_TURNS):
        for key, url in targets.items():
            parts[key].append(asyncio.run(measure(url, fingerprint, [prompt], duration_s / LATENCY_TURNS)))
    return {key: merged(runs).__dict__ for key, runs in parts.items()}


def deploy(cluster, folder: Path, load: Load, replicas: int) -> None:
    """The application afresh (the previous one deleted): every replica count starts from an empty router."""
    from ray import serve

    from specd.daemon.ray_serve import APP_NAME, build_app

    serve.delete(APP_NAME)
    limits = {"max_sessions": load.sessions, "max_total_tokens": SLOT_TOKENS, "max_input_tokens": SLOT_TOKENS // 2}
    serve.run(build_app({"overrides": {"models": {"target": str(folder)},
                                       "server": {"device": "cpu", "batching": load.batching}, "limits": limits},
                         "threads": 1,
                         "deployment": {"num_replicas": replicas, "ray_actor_options": {"num_cpus": 1}}}),
              name=APP_NAME, route_prefix="/")
    cluster.wait_for_replicas(replicas)


def run_ingress(ingress: str, folder: Path, fingerprint: str, prompts: list[list[int]], loads: list[Load],
                duration_s: float, daemon_url: str) -> dict:
    out: dict = {}
    env = {"SPECD_API_KEY": KEY, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with local_cluster(ingress, free_port(), env) as cluster:
        for load in loads:
            for replicas in (1, 2):
                deploy(cluster, folder, load, replicas)
                if load is loads[0] and replicas == 1:
                    targets = {"daemon": daemon_url, "latency": cluster.url}
                    if ingress == "haproxy":  # straight to the replica's own port: HAProxy's hop alone
                        targets["latency_replica_port"] = f"ws://127.0.0.1:{cluster.replica_ports()[0]}"
                    print(f"{ingress}, 1 replica: 1 session, in turns on {', '.join(targets)} (latency)", flush=True)
                    out |= paired_latency(targets, fingerprint, prompts[0], duration_s)
                print(f"{ingress}, {replicas} replica(s): {load.label()}", flush=True)
                got = asyncio.run(measure(cluster.url, fingerprint, prompts[:load.sessions], duration_s))
                out[f"{load.key}replicas_{replicas}"] = got.__dict__
    return out


def run(loads: list[Load], duration_s: float, ingresses: list[str]) -> dict:
    from transformers import AutoTokenizer

    from specd.shared.fingerprint import tokenizer_fingerprint
    from specd.shared.models import ensure_hf_folder
    from tests.daemon_process import DaemonProcess

    folder = ensure_hf_folder(MODEL, progress=lambda msg: print(msg, flush=True))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    fingerprint = tokenizer_fingerprint(tokenizer)
    sessions = max(load.sessions for load in loads)
    prompts = [prompt_for(i, tokenizer) for i in range(sessions)]
    results: dict = {"sessions": loads[0].sessions, "duration_s": duration_s, "gamma": GAMMA, "model": MODEL,
                     "loads": [load.__dict__ for load in loads], "load_average_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="specd-ray-bench-") as tmp:
        daemon = DaemonProcess(folder, Path(tmp), args=("--max-sessions", str(sessions)))
        daemon.start(timeout=300)  # idle between its latency windows, which alternate with each ingress's
        try:
            for ingress in ingresses:
                results[ingress] = run_ingress(ingress, folder, fingerprint, prompts, loads, duration_s, daemon.url)
        finally:
            daemon.stop()
    results["load_average_after"] = os.getloadavg()
    return results


def latency_figures(got: Measured, prefix: str = "") -> dict:
    """p50s of one session's rounds: the whole round, the verifier's forward, the rest (outside the verifier)."""
    return {f"{prefix}round_p50_ms": round(got.p50(got.latencies_ms), 2),
            f"{prefix}forward_p50_ms": round(got.p50(got.forward_ms), 2),
            f"{prefix}outside_verifier_p50_ms": round(got.p50(got.outside_ms), 2)}


def scaling_figures(got: dict[str, Measured], load: Load) -> dict:
    """1 against 2 replicas at one load, with what the replicas' forward times allow."""
    one, two = got[f"{load.key}replicas_1"], got[f"{load.key}replicas_2"]
    forward_1, forward_2 = one.p50(one.forward_ms), two.p50(two.forward_ms)
    # Sessions per forward: all of a replica's (batched) or one; throughput ∝ replicas × that ÷ forward time.
    per_forward = (load.sessions, load.sessions / 2) if load.batching else (1, 1)
    bound = (2 * per_forward[1] / forward_2) / (per_forward[0] / forward_1)
    key = load.key
    return {f"{key}tokens_per_s_1_replica": round(one.tokens_per_s, 1),
            f"{key}tokens_per_s_2_replicas": round(two.tokens_per_s, 1),
            f"{key}scaling": round(two.tokens_per_s / one.tokens_per_s, 3),
            f"{key}sessions_per_replica_2": sorted(two.replicas.values()),
            # the CPU the replicas got in all (cores): what the machine's other users left them
            f"{key}replica_cores_1": one.cpu_s_per_s.get("replicas", 0.0),
            f"{key}replica_cores_2": two.cpu_s_per_s.get("replicas", 0.0),
            f"{key}forward_p50_ms_1_replica": round(forward_1, 1),
            f"{key}forward_p50_ms_2_replicas": round(forward_2, 1),
            f"{key}scaling_forwards_allow": round(bound, 3)}


def summary(results: dict) -> dict:
    loads = [Load(**load) for load in results.get("loads", [{"key": "", "sessions": results["sessions"]}])]
    figures: dict = {}
    for ingress in INGRESSES:
        if ingress not in results:
            continue
        got = {key: Measured(**value) for key, value in results[ingress].items()}
        latency, daemon = latency_figures(got["latency"]), latency_figures(got["daemon"], "daemon_")
        row: dict = {}
        for load in loads:
            row |= scaling_figures(got, load)
        row |= {**daemon, **latency,
                "added_p50_ms": round(latency["round_p50_ms"] - daemon["daemon_round_p50_ms"], 2),
                "outside_verifier_added_p50_ms": round(latency["outside_verifier_p50_ms"]
                                                       - daemon["daemon_outside_verifier_p50_ms"], 2)}
        if "latency_replica_port" in got:
            row |= latency_figures(got["latency_replica_port"], "replica_port_")
        figures[ingress] = row
    return figures


def report_lines(command: str, machine: str, figures: dict, results: dict) -> list[str]:
    ingresses = [name for name in INGRESSES if name in figures]
    keys = list(dict.fromkeys(key for name in ingresses for key in figures[name]))
    lines = ["# Ray Serve scale-out", "", f"Command: `{command}`", "", f"Machine: {machine}.", "",
             "| figure | " + " | ".join(ingresses) + " |", "|---|" + "---|" * len(ingresses)]
    lines += [f"| {key} | " + " | ".join(str(figures[name].get(key, "")) for name in ingresses) + " |" for key in keys]
    lines += ["", "CPU seconds per second during each window (2 cores = 2.0; `clients` includes the Ray driver):", ""]
    for name in ingresses:
        for phase, value in results[name].items():
            lines.append(f"- {name} / {phase}: load {value['load_average']:.2f}, rounds {value['rounds']}, "
                         f"discarded {value['discarded']}: "
                         + ", ".join(f"{kind} {cpu}" for kind, cpu in value["cpu_s_per_s"].items()))
    lines.append("")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=8, help="the headline load (default 8)")
    parser.add_argument("--saturated-sessions", type=int, default=32,
                        help="a load that saturates one replica's batched forwards (default 32; 0: skip)")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per measurement window")
    parser.add_argument("--ingress", choices=INGRESSES, action="append",
                        help="Serve's ingress to measure (repeatable; default: both)")
    parser.add_argument("--report", type=Path, help="write the figures here (.md; a .json beside it)")
    args = parser.parse_args(argv)
    ingresses = args.ingress or list(INGRESSES)
    if "haproxy" in ingresses and (reason := haproxy_missing()):
        parser.error(f"--ingress haproxy: {reason}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    loads = [Load("", args.sessions), Load("unbatched_", args.sessions, batching=False)]
    if args.saturated_sessions:
        loads.append(Load("saturated_", args.saturated_sessions))
    results = run(loads, args.duration, ingresses)
    figures = summary(results)
    print(json.dumps(figures, indent=2))
    before, after = results["load_average_before"], results["load_average_after"]
    machine = (f"{platform.machine()}, {os.cpu_count()} cores; load average (1, 5, 15 min) before the run "
               f"{before[0]:.2f} {before[1]:.2f} {before[2]:.2f}, after {after[0]:.2f} {after[1]:.2f} {after[2]:.2f} "
               "(the benchmark itself keeps about 1-2 busy); other users' CPU per window below")
    if args.report:
        args.report.with_suffix(".json").write_text(json.dumps({"summary": figures, "raw": results, "machine": machine},
                                                               indent=1) + "\n")
        command = " ".join(["OMP_NUM_THREADS=" + os.environ["OMP_NUM_THREADS"], ".venv/bin/python", *sys.argv])
        args.report.write_text("\n".join(report_lines(command, machine, figures, results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
