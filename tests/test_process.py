"""server/process.py: the process settings `layertap serve` applies (run in a fresh interpreter:
both are process-wide and would leak into the test process)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from layertap.server.app import main


def run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_keep_freed_memory_sets_glibc_thresholds() -> None:
    # glibc on this platform (the project's Linux images): mallopt takes both thresholds
    assert (
        run("from layertap.server.process import keep_freed_memory; print(keep_freed_memory())")
        == "True"
    )


def test_single_threaded_main_leaves_the_workers_their_threads() -> None:
    out = run(
        "import torch, threading\n"
        "from layertap.server.process import single_threaded_main\n"
        "single_threaded_main()\n"
        "seen = []\n"
        "def worker():\n"
        "    torch.set_num_threads(2)\n"
        "    seen.append(torch.get_num_threads())\n"
        "t = threading.Thread(target=worker); t.start(); t.join()\n"
        "print(torch.get_num_threads(), seen[0])\n"
    )
    assert out == "1 2"


@pytest.mark.parametrize("flag", ["true", "false"])
def test_serve_applies_them_before_serving(monkeypatch: pytest.MonkeyPatch, flag: str) -> None:
    """`layertap serve` calls both before asyncio.run; keep_freed_memory only when enabled."""
    calls: list[str] = []
    import layertap.server.app as app

    monkeypatch.setattr(app.process, "single_threaded_main", lambda: calls.append("threads"))
    monkeypatch.setattr(app.process, "keep_freed_memory", lambda: calls.append("malloc") or True)
    monkeypatch.setattr(app.asyncio, "run", lambda coro: (coro.close(), calls.append("serve")))
    assert main(["--port", "0", "--keep-freed-memory", flag]) == 0
    want = ["threads", "malloc", "serve"] if flag == "true" else ["threads", "serve"]
    assert calls == want


def test_pinned_counts_survive_other_threads_setting_theirs() -> None:
    """Without pinning, a thread's first op would re-read whatever count another thread set
    last (ATen's lazy per-thread initialisation)."""
    out = run(
        "import torch, threading\n"
        "from layertap.server.process import pin_torch_threads\n"
        "pin_torch_threads(1)\n"
        "def other():\n"
        "    torch.set_num_threads(2)\n"
        "t = threading.Thread(target=other); t.start(); t.join()\n"
        "torch.ones(1 << 20).add_(1)\n"
        "print(torch.get_num_threads())\n"
    )
    assert out == "1"
