"""The GPU check's report (bench/gpu_check.sh): the machine's facts, then docs/BENCHMARKS_GPU.md
from the runs' files.

`python -m bench.gpu_report env --work DIR --device cuda` records the machine (nvidia-smi,
torch, CUDA, the packages in use) in DIR/env.json and checks that layertap imports; it exits 1
when it does not, or when --device is CUDA and torch sees none.

`python -m bench.gpu_report render --work DIR --out FILE` reads what gpu_check.sh left in DIR
(env.json, problems.txt, pytest.xml / pytest.log / pytest.rc, variants.tsv with one JSON per
benchmark run from `bench/compare.py --json`) and writes FILE: the hand-written part of
--template up to its figures marker, then the run (machine, date, the target, tests, one table
per model, the commands, the problems), and DIR/gpu_figures.json with every figure. It exits 1
when anything went wrong (a failed test, a run that failed or was skipped for time, errors or no
responses in a point, a problem the script met); a missed target is a result, not an error.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

MARKER = "<!-- figures: written by bench/gpu_check.sh; everything below is replaced -->"
TARGET_RATIO = 3.0  # issue 18: layertap >= 3x the naive server at 64 in flight
TEMPLATE = Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS_GPU.md"


# ------------------------------------------------------------------------------------ env
def _version(module: str) -> str:
    try:
        mod = __import__(module, fromlist=["__version__"])
        return str(getattr(mod, "__version__", "?"))
    except Exception as exc:  # recorded, never fatal here
        return f"not importable ({type(exc).__name__}: {exc})"


def _nvidia_smi() -> str:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return "no nvidia-smi"
    query = "--query-gpu=name,driver_version,memory.total"
    try:
        out = subprocess.run(
            [exe, query, "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"nvidia-smi failed: {exc}"
    return out.stdout.strip() or out.stderr.strip() or f"nvidia-smi exited {out.returncode}"


def collect_env(device: str) -> tuple[dict[str, Any], list[str]]:
    """The machine's facts and the import problems (an empty list: all is well)."""
    problems: list[str] = []
    for module in ("layertap.server.app", "layertap.client", "layertap.v1.layertap_pb2_grpc"):
        try:
            __import__(module)
        except Exception as exc:
            problems.append(f"import {module}: {type(exc).__name__}: {exc}")
    import torch

    from bench.machine import machine_line

    server = sys.modules.get("layertap.server")
    cuda = torch.cuda.is_available()
    if device.startswith("cuda") and not cuda:
        problems.append("device cuda asked, but torch.cuda.is_available() is False")
    env = {
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
        "python": f"{platform.python_version()} ({sys.executable})",
        "machine": machine_line(device),
        "nvidia_smi": _nvidia_smi(),
        "torch": torch.__version__,
        "torch_cuda": str(torch.version.cuda),
        "cuda_available": cuda,
        "gpu": torch.cuda.get_device_name() if cuda else "none",
        "layertap_from": str(Path(server.__file__ or "?").parent) if server else "not imported",
        "versions": {
            m: _version(m)
            for m in ("torchvision", "grpc", "google.protobuf", "numpy", "PIL", "pytest")
        },
        "problems": problems,
    }
    return env, problems


# ---------------------------------------------------------------------------------- tests
def read_tests(work: Path) -> dict[str, Any]:
    """pytest's outcome from its JUnit XML (and exit code): counts and one row per test."""
    rc = (work / "pytest.rc").read_text().strip() if (work / "pytest.rc").is_file() else "not run"
    rows: list[tuple[str, str, float, str]] = []
    xml = work / "pytest.xml"
    if xml.is_file():
        for case in ET.parse(xml).getroot().iter("testcase"):
            outcome, why = "passed", ""
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    outcome = {"failure": "failed"}.get(child.tag, child.tag)
                    why = (
                        (child.get("message") or "").splitlines()[0][:160]
                        if child.get("message")
                        else ""
                    )
            rows.append((case.get("name", "?"), outcome, float(case.get("time", 0)), why))
    counts: dict[str, int] = {}
    for _, outcome, _, _ in rows:
        counts[outcome] = counts.get(outcome, 0) + 1
    return {"rc": rc, "counts": counts, "tests": rows}


# ------------------------------------------------------------------------------ benchmark
def read_variants(work: Path) -> list[dict[str, Any]]:
    """variants.tsv (label, exit code or `skipped: why`, seconds, JSON file, command) and each
    run's JSON where it was written."""
    out = []
    tsv = work / "variants.tsv"
    for line in tsv.read_text().splitlines() if tsv.is_file() else []:
        label, rc, seconds, json_name, command = line.split("\t", 4)
        path = work / json_name
        data = json.loads(path.read_text()) if path.is_file() else None
        out.append({"label": label, "rc": rc, "seconds": seconds, "command": command,
                    "data": data})  # fmt: skip
    return out


def _f(value: Any, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _rows(variants: list[dict[str, Any]], model: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(system, variant, point) for one model: in-process and naive from the runs that measured
    them, layertap from every run, in run order."""
    rows = []
    for v in variants:
        data = v["data"]
        if not data:
            continue
        for p in data["inprocess"].get(model, []):
            rows.append(("in-process", p["config"], p))
        if model in data["batch1"]:
            rows.append(("in-process, batch-1 latency", data["batch1"][model]["config"],
                         data["batch1"][model]))  # fmt: skip
        for p in data["points"]:
            if p["model"] == model:
                rows.append((p["system"], v["label"] if p["system"] == "layertap" else p["config"],
                             p))  # fmt: skip
    return rows


def _point(
    variants: list[dict[str, Any]], system: str, model: str, c: int, label: str = ""
) -> dict[str, Any] | None:
    for v in variants:
        if v["data"] and (not label or v["label"] == label):
            for p in v["data"]["points"]:
                if (p["system"], p["model"], p["concurrency"]) == (system, model, c):
                    return p
    return None


def targets(variants: list[dict[str, Any]], models: list[str], c: int) -> list[dict[str, Any]]:
    """Per model: layertap's first run (the defaults) against the naive server at c in flight;
    the best layertap run for information."""
    first = variants[0]["label"] if variants else ""
    out = []
    for m in models:
        lt, naive = _point(variants, "layertap", m, c, first), _point(variants, "naive gRPC", m, c)
        ratio = lt["images_per_s"] / naive["images_per_s"] if lt and naive and naive[
            "images_per_s"] else None  # fmt: skip
        best = max(
            (p for v in variants if v["data"] for p in v["data"]["points"]
             if (p["system"], p["model"], p["concurrency"]) == ("layertap", m, c)),
            key=lambda p: p["images_per_s"], default=None,
        )  # fmt: skip
        best_label = next((v["label"] for v in variants if v["data"] and best in
                           v["data"]["points"]), "")  # fmt: skip
        out.append({
            "model": m, "concurrency": c, "variant": first,
            "layertap": lt and lt["images_per_s"], "naive": naive and naive["images_per_s"],
            "ratio": ratio, "required": TARGET_RATIO,
            "verdict": "NOT MEASURED" if ratio is None else
            ("PASS" if ratio >= TARGET_RATIO else "FAIL"),
            "best_variant": best_label, "best": best and best["images_per_s"],
        })  # fmt: skip
    return out


def render(work: Path, template: Path, dry_run: bool) -> tuple[str, dict[str, Any], list[str]]:
    env = json.loads((work / "env.json").read_text()) if (work / "env.json").is_file() else {}
    tests = read_tests(work)
    variants = read_variants(work)
    measured = [v for v in variants if v["data"]]
    models = list(dict.fromkeys(m["arch"] for v in measured for m in v["data"]["models"]))
    concurrency = sorted({c for v in measured for c in v["data"]["timing"]["concurrency"]})
    verdicts = targets(variants, models, max(concurrency)) if concurrency else []
    problems = list(env.get("problems", ["env.json missing: the environment step did not run"]))
    if (work / "problems.txt").is_file():  # what gpu_check.sh itself met
        problems += (work / "problems.txt").read_text().splitlines()
    if tests["rc"] != "0" or tests["counts"].get("failed") or tests["counts"].get("error"):
        problems.append(f"pytest -m gpu: exit code {tests['rc']}, {tests['counts']}")
    if not dry_run and tests["counts"].get("skipped"):  # on the device every test must run
        problems.append(f"pytest -m gpu: {tests['counts']['skipped']} test(s) skipped")
    if not variants:
        problems.append("no benchmark run")
    for v in variants:
        if v["rc"] != "0" or not v["data"]:
            problems.append(f"benchmark run '{v['label']}': {v['rc']}"
                            + ("" if v["data"] else ", no figures"))  # fmt: skip
        for p in v["data"]["points"] if v["data"] else []:
            where = f"{v['label']}: {p['system']} {p['model']} c={p['concurrency']}"
            if p["errors"]:
                problems.append(f"{where}: {p['errors']} errors")
            if not p["completed"]:
                problems.append(f"{where}: no response inside the measured window")
    head = template.read_text() if template.is_file() else ""
    head = head[: head.index(MARKER)] if MARKER in head else head
    lines = [head.rstrip("\n"), "", MARKER, ""]
    add = lines.append
    kind = "Dry run on the CPU (`--dry-run`): proves the script, the figures mean nothing" \
        if dry_run else "Device run"  # fmt: skip
    add(f"## Run of {env.get('date_utc', '?')} UTC")
    add("")
    add(f"- **Kind**: {kind}.")
    add(f"- **GPU** (nvidia-smi: name, driver, memory): "
        f"{env.get('nvidia_smi', '?')}.")  # fmt: skip
    add(f"- **Machine**: {env.get('machine', '?')}.")
    vers = env.get("versions", {})
    add(
        f"- **Software**: torch {env.get('torch', '?')} (CUDA {env.get('torch_cuda', '?')}), "
        + ", ".join(f"{k} {v}" for k, v in vers.items())
        + f"; Python {env.get('python', '?')}; "
        f"layertap imported from `{env.get('layertap_from', '?')}`."
    )
    if measured:
        t = measured[0]["data"]["timing"]
        add(
            f"- **Points**: {t['warmup']:g} s warm-up then {t['seconds']:g} s measured, closed "
            f"loop, one JPEG per request (bench/compare.py's workload); in-process batch sweep "
            f"{', '.join(map(str, t['batch_sizes']))} at {t['seconds'] / 2:g} s each."
        )
    add("")
    c_top = f"{max(concurrency)} in flight" if concurrency else "the most in flight"
    add(f"### Target: layertap ≥ {TARGET_RATIO:g}× the naive server at {c_top}")
    add("")
    if not verdicts:
        add("Not measured: no benchmark run finished.")
        add("")
    add(
        "| model | layertap run | layertap images/s | naive images/s | ratio | required "
        "| result | best layertap run (images/s) |"
    )
    add("|---|---|---|---|---|---|---|---|")
    for t in verdicts:
        add(
            f"| {t['model']} | {t['variant']} | {_f(t['layertap'])} | {_f(t['naive'])} "
            f"| {_f(t['ratio'], 2)}× | ≥ {TARGET_RATIO:g}× | **{t['verdict']}** "
            f"| {t['best_variant']} ({_f(t['best'])}) |"
        )
    add("")
    add(
        "The target is judged on layertap's first run (its defaults: float32, and nvJPEG "
        "decoding wherever it serves on CUDA), the same precision as the naive server."
    )
    add("")
    add("### Tests: `pytest -m gpu tests/test_gpu.py`")
    add("")
    counts = ", ".join(f"{n} {k}" for k, n in sorted(tests["counts"].items())) or "no results"
    add(f"Exit code {tests['rc']}: {counts}.")
    add("")
    if tests["tests"]:
        add("| test | outcome | seconds | message |")
        add("|---|---|---|---|")
        for name, outcome, secs, why in tests["tests"]:
            add(f"| `{name}` | {outcome} | {secs:.1f} | {why.replace('|', '/')} |")
        add("")
    for m in models:
        lines += _model_section(variants, m, concurrency)
    add("### Commands")
    add("")
    add("```bash")
    for v in variants:
        add(f"# {v['label']}: exit {v['rc']}, {v['seconds']} s")
        add(v["command"])
    add("```")
    add("")
    add("### Problems")
    add("")
    lines += [f"- {p}" for p in problems] or ["None: every step ran, no request failed."]
    add("")
    figures = {"env": env, "tests": tests, "targets": verdicts, "problems": problems,
               "runs": [{k: v[k] for k in ("label", "rc", "seconds", "command", "data")}
                        for v in variants]}  # fmt: skip
    return "\n".join(lines), figures, problems


def _model_section(variants: list[dict[str, Any]], model: str, conc: list[int]) -> list[str]:
    rows = _rows(variants, model)
    lines = [f"### {model}: images/s at each number in flight", ""]
    lines.append("| system | run | " + " | ".join(f"c={c}" for c in conc) + " |")
    lines.append("|---|---|" + "---|" * len(conc))
    seen: dict[tuple[str, str], dict[int, Any]] = {}
    for system, label, p in rows:
        if system in ("layertap", "naive gRPC"):
            seen.setdefault((system, label), {})[p["concurrency"]] = p["images_per_s"]
    for (system, label), by_c in seen.items():
        lines.append(f"| {system} | {label} | "
                     + " | ".join(_f(by_c.get(c)) for c in conc) + " |")  # fmt: skip
    lines += ["", f"All points ({model}):", ""]
    lines.append("| system | run / config | in flight | images/s | p50 ms | p99 ms | errors "
                 "| server CPU ms/img | mean batch | compute ms/batch |")  # fmt: skip
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for system, label, p in rows:
        e = p.get("extra") or {}
        c = p["concurrency"] if system != "in-process" else "–"
        lines.append(
            f"| {system} | {label} | {c} | {_f(p['images_per_s'])} | {_f(p['p50_ms'])} "
            f"| {_f(p['p99_ms'])} | {p['errors']} | {_f(p['server_cpu_ms'])} "
            f"| {_f(e.get('mean_batch'), 2)} | {_f(e.get('compute_ms'))} |"
        )
    lines.append("")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("env", help="record the machine in WORK/env.json; check the imports")
    e.add_argument("--work", required=True, type=Path)
    e.add_argument("--device", default="cuda")
    r = sub.add_parser("render", help="write the report from WORK")
    r.add_argument("--work", required=True, type=Path)
    r.add_argument("--out", required=True, type=Path)
    r.add_argument("--template", type=Path, default=TEMPLATE)
    r.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    if args.cmd == "env":
        env, problems = collect_env(args.device)
        (args.work / "env.json").write_text(json.dumps(env, indent=1))
        print(json.dumps(env, indent=1))
        return 1 if problems else 0
    text, figures, problems = render(args.work, args.template, args.dry_run)
    args.out.write_text(text)
    (args.work / "gpu_figures.json").write_text(json.dumps(figures, indent=1))
    print(f"wrote {args.out} and {args.work / 'gpu_figures.json'}; "
          f"{len(problems)} problem(s)")  # fmt: skip
    for t in figures["targets"]:
        print(
            f"TARGET {t['verdict']}: {t['model']}: layertap {_f(t['layertap'])} vs naive "
            f"{_f(t['naive'])} images/s at c={t['concurrency']} ({_f(t['ratio'], 2)}x)"
        )
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
