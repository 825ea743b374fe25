"""Cold start of `layertap serve`: process start to every model ready, with compile = "auto" off,
on with an empty compile cache, and on with the cache the previous start left (issue 18:
reported, and with a warm cache at most 2x the eager start).

Run: `.venv/bin/python -m bench.cold_start [--config FILE] [--out FILE]`. Without --config the
embedded default config is served (what `make serve` runs: mobilenet_v2, resnet50, vgg16).
Each case is one fresh process; the compile cache is a temporary directory (`compile_cache_dir`)
that only the "cold" case starts empty. Also reported: the seconds each model spent compiling
at load (`layertap_compile_seconds_total`) and how long after ready the background compiles of
the remaining batch sizes took (`layertap_compiles_pending` back to 0).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

from bench.machine import loadavg, machine_line
from bench.metrics import metric, scrape
from bench.processes import Proc, free_port, wait_until

CASES = (
    ("eager (compile_budget_s = 0)", {"LAYERTAP_COMPILE_BUDGET_S": "0"}),
    ('compile = "auto", empty cache', {"LAYERTAP_COMPILE_BUDGET_S": "300"}),  # cache starts empty
    ('compile = "auto", warm cache', {"LAYERTAP_COMPILE_BUDGET_S": "300"}),  # what that left
)


def start(config: str | None, env: dict[str, str], logdir: Path) -> dict[str, float]:
    """One `layertap serve`: seconds to every model ready, then to no compile pending."""
    from layertap.client import FeatureClient

    port, metrics_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "layertap.client", "serve", "--port", str(port)]
    cmd += ["--metrics-port", str(metrics_port), "--device", "cpu"]
    if config:
        cmd += ["--config", config]
    started = time.monotonic()
    proc = Proc(f"cold-{port}", cmd, logdir, env)
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    try:
        with FeatureClient(f"127.0.0.1:{port}", timeout=5, retries=0) as client:

            def ready() -> bool:
                models = client.list_models()
                return bool(models) and all(m.ready for m in models)

            wait_until(ready, proc, 1800, "layertap")
            out = {"ready_s": time.monotonic() - started}
            names = [m.name for m in client.list_models()]
        wait_until(lambda: metric(scrape(url), "layertap_compiles_pending") == 0, proc, 1800, "")
        out["compiled_s"] = time.monotonic() - started
        samples = scrape(url)
        for name in names:
            out[name] = metric(samples, "layertap_compile_seconds_total", model=name)
        return out
    finally:
        proc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="TOML config (default: the embedded default)")
    parser.add_argument("--out", help="append the Markdown table here (default: print it)")
    args = parser.parse_args()
    load_start = loadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "inductor"
        for label, env in CASES:
            env = {"LAYERTAP_COMPILE_CACHE_DIR": str(cache), **env}
            result = start(args.config, env, Path(tmp))
            rows.append((label, result))
            print(f"{label}: {result}", file=sys.stderr, flush=True)
    eager = rows[0][1]["ready_s"]
    models = [k for k in rows[0][1] if not k.endswith("_s")]
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    flags = f" --config {args.config}" if args.config else ""
    lines = [
        f"Cold start, `python -m bench.cold_start{flags}`"
        f" ({now}; {machine_line('cpu')}; load average {load_start} at the start, {loadavg()} at "
        "the end):",
        "",
        "| case | to ready s | × eager | to no compile pending s | compile s at load ("
        + ", ".join(models)
        + ") |",
        "|---|---|---|---|---|",
    ]
    for label, r in rows:
        per_model = ", ".join(f"{r[m]:.1f}" for m in models)
        lines.append(
            f"| {label} | {r['ready_s']:.1f} | {r['ready_s'] / eager:.2f}× "
            f"| {r['compiled_s']:.1f} | {per_model} |"
        )
    text = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text)
    print(text)


if __name__ == "__main__":
    main()
