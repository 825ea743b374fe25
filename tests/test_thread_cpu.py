"""`layertap_thread_cpu_seconds_total{role}`: the server's CPU time by thread role, read from
/proc at each scrape (server/thread_roles.py), so a benchmark can say where each image's CPU
goes without a profiler."""

from __future__ import annotations

import threading
import time

from conftest import photo, start_server

from layertap.client import FeatureClient
from layertap.server import thread_roles
from layertap.server.settings import ModelConfig, Settings


def test_a_registered_thread_is_counted_under_its_role() -> None:
    before = thread_roles.cpu_seconds_by_role().get("test spinner", 0.0)
    assert before == 0.0
    done = threading.Event()

    def spin() -> None:
        thread_roles.register("test spinner")
        end = time.thread_time() + 0.3
        while time.thread_time() < end:
            pass
        done.wait(10)  # alive while measured: a thread's time leaves with it

    thread = threading.Thread(target=spin)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while thread_roles.cpu_seconds_by_role().get("test spinner", 0.0) < 0.25:
            assert time.monotonic() < deadline, thread_roles.cpu_seconds_by_role()
            time.sleep(0.05)
        assert thread_roles.cpu_seconds_by_role()["test spinner"] < 5  # not the whole process
    finally:
        done.set()
        thread.join()


def test_the_server_reports_its_stages_threads() -> None:
    tiny = ModelConfig(name="tiny", factory="factories:tiny_net", allow_random=True)
    running = start_server(Settings(port=0, models=(tiny,)))
    try:
        assert running.server.metrics is not None
        registry = running.server.metrics.registry

        def roles() -> dict[str, float]:
            return {
                s.labels["role"]: s.value
                for family in registry.collect()
                if family.name == "layertap_thread_cpu_seconds"
                for s in family.samples
            }

        start = roles()
        with FeatureClient(running.target) as client:
            for _ in range(20):
                client.extract([photo("astronaut"), photo("coffee")], model="tiny", nodes="head")
        end = roles()
    finally:
        running.stop()
    for role in ("event loop", "decode", "worker"):
        assert end.get(role, 0) > start.get(role, 0), (role, start, end)
