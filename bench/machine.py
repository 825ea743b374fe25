"""What the benchmark reports about the machine and its processes: hardware line, load average,
a process tree's CPU time and a process's memory."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
from pathlib import Path

import psutil


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mem_total_gib() -> float:
    return psutil.virtual_memory().total / 1024**3


def machine_line(device: str) -> str:
    """Hardware and software versions, one line: client and servers share this machine."""
    import torch
    import torchvision

    gpu = ""
    if device.startswith("cuda") and torch.cuda.is_available():
        gpu = f", GPU {torch.cuda.get_device_name()}"
    return (
        f"{cpu_model()}, {os.cpu_count()} cores, {mem_total_gib():.0f} GiB RAM{gpu}; "
        f"{platform.system()} {platform.machine()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}, torchvision {torchvision.__version__}"
    )


def rss_bytes(pid: int) -> dict[str, int]:
    """Resident memory now (VmRSS, from psutil) and its high-water mark (VmHWM, which psutil
    does not expose: read from /proc/<pid>/status)."""
    out = {"VmRSS": psutil.Process(pid).memory_info().rss}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            out["VmHWM"] = int(line.split(":", 1)[1].split()[0]) * 1024
    return out


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its live children: servers that fork workers
    (LitServe) spend most of their CPU outside the parent."""
    total = 0.0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return float("nan")
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def cuda_memory_by_pid(pid: int) -> int | None:
    """GPU memory nvidia-smi reports for one process, in bytes (None without nvidia-smi)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        text = subprocess.run(
            [exe, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid):
            return int(float(parts[1])) * 1024 * 1024
    return None
