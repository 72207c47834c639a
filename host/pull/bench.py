"""``doorstep-host bench-rollout``: a pull rollout to N update agents on loopback, measured.

N real update agents (``device/update``'s :class:`~device.update.agent.UpdateAgent`, each with
its own MQTT connection, its own store, the real downloader and the real install with the
signature checked) run in a few worker processes, many per process, against a real Mosquitto
and a real nginx on loopback; there is **no camera and no detector**: an agent's "apply" step
accepts the switch at once. The host side is the real ``rollout`` (canary, then the rest at
once, ``--rate`` unlimited). It prints, per N: time to converge (rollout start to every agent
serving), messages, bytes the origin served, the host's
CPU (the rollout process only), and the workers' CPU. Messages: *published* is counted at
the clients (one desired message per agent, and the agents' reports); *delivered* is
Mosquitto's ``$SYS/broker/publish/messages/sent`` (its fan-out to subscribers).

Every agent downloads and installs the whole bundle into its own store on this machine's
disk: at 1000 agents and the 3.4 MB default model that is 3.4 GB downloaded and 3.4 GB
unpacked (deleted afterwards).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
PER_WORKER = 250


@dataclass
class BenchRow:
    devices: int
    converge_s: float
    serving: int
    published: int
    broker_sent: int
    origin_mb: float
    host_cpu_s: float
    workers_cpu_s: float

    @property
    def host_cpu_ms_per_device(self) -> float:
        return self.host_cpu_s * 1000 / self.devices

    @property
    def converge_ms_per_device(self) -> float:
        return self.converge_s * 1000 / self.devices


# ---------------------------------------------------------------------------- worker process


def _worker(args: argparse.Namespace) -> int:
    """Run agents ``args.first`` .. ``args.first + args.count - 1`` until SIGTERM."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from device.config import UpdateConfig
    from device.install import Store, trusted_keys
    from device.update.agent import UpdateAgent
    from device.update.messages import UpdateReport

    cfg = UpdateConfig(allowed_url_prefixes=[args.origin], retry_min_s=1, timeout_s=60)
    keys = trusted_keys([Path(args.key)])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    agents, clients = [], []
    ready = threading.Semaphore(0)
    reports = [0]
    lock = threading.Lock()

    def make(device_id: str) -> None:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id)
        base = f"{args.prefix}/{device_id}"

        def report(r: UpdateReport) -> None:
            with lock:
                reports[0] += 1
            client.publish(f"{base}/update", r.model_dump_json(), qos=1, retain=True)

        agent = UpdateAgent(
            cfg,
            Store(Path(args.state) / device_id),
            keys,
            device_id,
            lambda deadline: (True, None),  # no detector here: the switch is accepted at once
            report,
        )

        def on_connect(c: Any, u: Any, f: Any, reason: Any, p: Any = None) -> None:
            c.subscribe(f"{base}/desired", qos=1)

        client.on_connect = on_connect
        client.on_subscribe = lambda *a: ready.release()

        def on_message(c: Any, u: Any, msg: Any) -> None:
            agent.offer(bytes(msg.payload))

        client.on_message = on_message
        client.connect(HOST, args.port, keepalive=60)
        client.loop_start()
        agent.start()
        agents.append(agent)
        clients.append(client)

    for i in range(args.first, args.first + args.count):
        make(f"bench-{i:05d}")
    for _ in range(args.count):
        if not ready.acquire(timeout=120):
            print(json.dumps({"error": "agents did not subscribe within 120 s"}), flush=True)
            return 1
    print("ready", flush=True)
    stop.wait()
    for agent in agents:
        agent.stop(timeout=1)
    for client in clients:
        client.disconnect()
        client.loop_stop()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"reports": reports[0], "cpu_s": usage.ru_utime + usage.ru_stime}), flush=True)
    return 0


# ---------------------------------------------------------------------------- the bench


def _sys_counters(port: int) -> dict[str, int]:
    """Mosquitto's ``$SYS/broker/publish/messages/{received,sent}`` (updated every second)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    got: dict[str, int] = {}
    done = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-sys-{time.time_ns()}")

    def on_message(c: Any, u: Any, msg: Any) -> None:
        got[msg.topic.rsplit("/", 1)[-1]] = int(msg.payload)
        if "received" in got and "sent" in got:
            done.set()

    client.on_connect = lambda c, *a: c.subscribe("$SYS/broker/publish/messages/+")
    client.on_message = on_message
    client.connect(HOST, port)
    client.loop_start()
    done.wait(5)
    client.disconnect()
    client.loop_stop()
    return got


def bench_one(n: int, workers: int, work: Path, progress: bool = True) -> BenchRow:
    from device.alerts.mqtt import BrokerSettings
    from device.bundle.signing import generate_keypair, sign_bundle
    from device.bundle.store import load_bundle, write_bundle
    from device.models import default_bundle
    from host.broker import EmbeddedBroker
    from host.fleet.inventory import Device, RolloutPolicy
    from host.pull.origin import Nginx
    from host.pull.publish import publish
    from host.pull.rollout import FleetView, run_rollout

    root = work / f"n{n}"
    root.mkdir()
    generate_keypair(root / "k.key", root / "k.pub")
    src = load_bundle(default_bundle())
    bundle = root / "bundle"
    write_bundle(bundle, src.manifest.model_copy(update={"version": "9.0.0"}),
                 {name: src.file(name) for name in src.manifest.files})  # fmt: skip
    sign_bundle(bundle, root / "k.key")
    (root / "origin").mkdir()
    nginx = Nginx(root / "origin", root / "nginx")
    nginx.start()
    # $SYS counters every second; room for every agent's queued messages
    broker = EmbeddedBroker(
        "mosquitto", extra_config="sys_interval 1\nmax_queued_messages 100000\nlog_dest none\n"
    ).start()
    port = broker.port
    procs: list[subprocess.Popen[str]] = []
    try:
        descriptor = publish(bundle, root / "origin", nginx.base_url)
        # paho waits on its sockets with select(), which cannot watch a descriptor past 1023:
        # at 3 descriptors per client, a process holds at most PER_WORKER agents.
        workers = max(workers, -(-n // PER_WORKER))
        share = [n // workers + (1 if i < n % workers else 0) for i in range(workers)]
        first = 0
        for count in share:
            if not count:
                continue
            argv = [
                sys.executable, "-m", "host.pull.bench", "--worker", "--first", str(first),
                "--count", str(count), "--port", str(port), "--prefix", "doorstep",
                "--state", str(root / "agents"), "--key", str(root / "k.pub"),
                "--origin", nginx.base_url,
            ]  # fmt: skip
            procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, text=True))
            first += count
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()  # the worker says "ready" once its agents subscribed
            if line.strip() != "ready":
                raise RuntimeError(f"an agent worker failed to start: {line.strip()}")
        if progress:
            print(f"  {n} agents connected; rolling out", file=sys.stderr, flush=True)
        devices = [Device(name=f"bench-{i:05d}", host=HOST, device_id=f"bench-{i:05d}")
                   for i in range(n)]  # fmt: skip
        before = _sys_counters(port)
        usage0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.monotonic()
        view = FleetView(BrokerSettings(url=f"mqtt://{HOST}:{port}"), "doorstep",
                         [d.device_id for d in devices])  # fmt: skip
        view.start()
        try:
            result = run_rollout(
                view,
                devices,
                descriptor,
                "bench",
                RolloutPolicy(canary=1, batch="100%", health_deadline=300),
                journal=root / "journal.json",
                say=lambda s: None,
            )
        finally:
            view.stop()
        converge = time.monotonic() - t0
        usage1 = resource.getrusage(resource.RUSAGE_SELF)
        time.sleep(1.5)  # $SYS is refreshed every second
        after = _sys_counters(port)
        worker_cpu, reports = 0.0, 0
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            out, _ = p.communicate(timeout=120)
            last = out.strip().splitlines()[-1] if out.strip() else "{}"
            stats = json.loads(last)
            worker_cpu += float(stats.get("cpu_s", 0.0))
            reports += int(stats.get("reports", 0))
        return BenchRow(
            devices=n,
            converge_s=round(converge, 2),
            serving=len(result.serving),
            published=len(devices) + reports,  # counted at the clients: desired + reports
            broker_sent=after.get("sent", 0) - before.get("sent", 0),
            origin_mb=round(nginx.served_bytes() / 1e6, 1),
            host_cpu_s=round(
                (usage1.ru_utime + usage1.ru_stime) - (usage0.ru_utime + usage0.ru_stime), 3
            ),
            workers_cpu_s=round(worker_cpu, 1),
        )
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate(timeout=30)
        broker.stop()
        nginx.stop()
        shutil.rmtree(root, ignore_errors=True)


def format_rows(rows: list[BenchRow]) -> str:
    lines = [
        "pull rollout of the shipped bundle to N update agents on loopback (real Mosquitto, real "
        "nginx, the real device/update agent and store code; no camera, no detector: an agent "
        f"accepts the switch at once), {os.cpu_count()} CPU(s) shared by everything",
        "",
        "| agents | converge | per agent | serving | messages published / delivered | "
        "origin served | "
        "host CPU | host CPU per agent | agents' CPU |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r.devices} | {r.converge_s:.1f} s | {r.converge_ms_per_device:.1f} ms | "
            f"{r.serving} | {r.published} / {r.broker_sent} | {r.origin_mb:.1f} MB | "
            f"{r.host_cpu_s:.2f} s | {r.host_cpu_ms_per_device:.2f} ms | {r.workers_cpu_s:.1f} s |"
        )
    return "\n".join(lines)


def bench_rollout(counts: list[int], workers: int, progress: bool = True) -> list[BenchRow]:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # a connection per agent
    rows = []
    with tempfile.TemporaryDirectory(prefix="doorstep-bench-rollout-") as tmp:
        for n in counts:
            if progress:
                print(f"{n} agents ...", file=sys.stderr, flush=True)
            rows.append(bench_one(n, workers, Path(tmp), progress))
    return rows


def to_json(rows: list[BenchRow]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m host.pull.bench")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--first", type=int, default=0)
    p.add_argument("--count", type=int, default=0)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--prefix", default="doorstep")
    p.add_argument("--state", default="")
    p.add_argument("--key", default="")
    p.add_argument("--origin", default="")
    args = p.parse_args(argv)
    if not args.worker:
        p.error("this module is run by doorstep-host bench-rollout")
    return _worker(args)


if __name__ == "__main__":
    sys.exit(main())
