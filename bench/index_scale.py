"""A bulk `layertap extract` at scale against bench/fake_server.py (no model, so the client side
is what is measured): peak RSS of the CLI process and bytes it wrote against the output's final
size, for each collection size; then a run killed (SIGKILL) at a random point and resumed,
compared row by row with an uninterrupted run.

    .venv/bin/python bench/index_scale.py --items 10000,1000000 --kill-items 200000

The collection is a Parquet list (`id`, `path`) of N items over 1,000 distinct small files, so
a million items need no million files; the output is a sharded directory (Parquet,
`--dim`-float32 vectors). Prints a Markdown table (docs/BENCHMARKS.md, "Indexing at scale").
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.machine import machine_line

DISTINCT = 1000
# The CLI in this process's interpreter, reporting its own peak RSS and bytes written at exit
# (VmHWM and /proc/self/io, read in the process itself, so nothing is missed at the end;
# VmHWM, unlike ru_maxrss, starts afresh at exec instead of inheriting the parent's).
RUN = """
import atexit, json, sys
def report():
    io = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
    stats = {"max_rss_kib": int(status["VmHWM"].split()[0]),
             "write_bytes": int(io["write_bytes"]), "wchar": int(io["wchar"])}
    open(sys.argv[1], "w").write(json.dumps(stats))
atexit.register(report)
from layertap.client.cli import main
sys.exit(main(sys.argv[2:]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_list(work: Path, n: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = work / "files"
    if not files.exists():
        files.mkdir()
        for i in range(DISTINCT):
            (files / f"{i:04d}.jpg").write_bytes(f"fake image {i} ".encode() * 4)
    listing = work / f"items-{n}.parquet"
    ids = [f"{i:08d}" for i in range(n)]
    paths = [str(files / f"{i % DISTINCT:04d}.jpg") for i in range(n)]
    pq.write_table(pa.table({"id": ids, "path": paths}), listing)
    return listing


SHARD_ROWS = ["--shard-rows", "0"]  # set from --shard-rows in main()


def cli_args(listing: Path, out: Path, target: str) -> list[str]:
    return [
        "extract", str(listing), "-o", str(out), "--target", target, "--model", "fake",
        "-n", "feat", "--pool", "gem", "--no-progress", *SHARD_ROWS,
    ]  # fmt: skip


def run_cli(listing: Path, out: Path, target: str, stats: Path) -> dict[str, Any]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", RUN, str(stats), *cli_args(listing, out, target)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"the CLI failed ({done.returncode}): {done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(stats.read_text())
    result["seconds"] = time.perf_counter() - started
    result["final_bytes"] = sum(f.stat().st_size for f in out.iterdir())
    return result


def rows(out: Path) -> tuple[list[str], Any]:
    import numpy as np
    import pyarrow.parquet as pq

    table = pq.read_table(out)
    ids = table.column("id").to_pylist()
    vectors = np.stack(table.column("feat").to_numpy(zero_copy_only=False))
    order = np.argsort(np.asarray(ids))
    return [ids[i] for i in order], vectors[order]


def killed_and_resumed(work: Path, n: int, target: str, whole: Path, seconds: float) -> str:
    """Kill a run of `n` items at a random point of its expected time, resume it, compare."""
    import numpy as np

    listing = make_list(work, n)
    out = work / f"killed-{n}"
    when = random.uniform(0.2, 0.8) * seconds
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN, str(work / "k.json"), *cli_args(listing, out, target)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(when)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    manifest = json.loads((out / "_manifest.json").read_text())
    kept = sum(s["rows"] for s in manifest["shards"])
    run_cli(listing, out, target, work / "r.json")
    ids_a, vec_a = rows(whole)
    ids_b, vec_b = rows(out)
    same = ids_a == ids_b and len(set(ids_b)) == n and np.array_equal(vec_a, vec_b)
    return (
        f"killed after {when:.1f} s with {kept:,} rows in finished shards; resumed: "
        f"{len(ids_b):,} rows, {'equal to' if same else 'DIFFERENT from'} the uninterrupted run"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", default="10000,1000000")
    parser.add_argument("--kill-items", type=int, default=200000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument(
        "--shard-rows", type=int, default=0, help="rows per shard (0: the CLI's default)"
    )
    args = parser.parse_args()
    SHARD_ROWS[1] = str(args.shard_rows)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.fake_server", "--port", str(port), "--dim", str(args.dim)],
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.DEVNULL,
    )
    target = f"127.0.0.1:{port}"
    time.sleep(2)
    lines = [
        f"Machine: {machine_line('cpu')}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"fake server, {args.dim}-d float32, Parquet shards of "
        f"{args.shard_rows or 'the default number of'} rows.",
        "",
        "| items | seconds | items/s | CLI peak RSS | written to disk | final size "
        "| written / final |",
        "|---|---|---|---|---|---|---|",
    ]
    try:
        with tempfile.TemporaryDirectory(prefix="layertap-scale-") as tmp:
            work = Path(tmp)
            timings: dict[int, float] = {}
            for n in (int(x) for x in args.items.split(",")):
                out = work / f"out-{n}"
                r = run_cli(make_list(work, n), out, target, work / f"s-{n}.json")
                timings[n] = r["seconds"]
                lines.append(
                    f"| {n:,} | {r['seconds']:.0f} | {n / r['seconds']:,.0f} | "
                    f"{r['max_rss_kib'] / 1024:.0f} MiB | {r['write_bytes'] / 2**20:,.1f} MiB | "
                    f"{r['final_bytes'] / 2**20:,.1f} MiB | "
                    f"{r['write_bytes'] / r['final_bytes']:.2f} |"
                )
                print(lines[-1], flush=True)
            n = args.kill_items
            whole = work / f"out-{n}"
            if not whole.exists():
                timings[n] = run_cli(make_list(work, n), whole, target, work / "w.json")["seconds"]
            lines += ["", killed_and_resumed(work, n, target, whole, timings[n])]
    finally:
        server.terminate()
        server.wait(10)
    print("\n".join(lines))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
