#!/usr/bin/env bash
# Every GPU check in one short lease (issue 18): on a bare CUDA machine with this repository
# copied over (and .whl/ from bench/gpu_wheels.sh carried with it), in about 6-7 minutes:
#   1. installs the wheels of .whl/ into a target folder (no network, no pip resolver), makes
#      layertap importable from this checkout (a folder of links on PYTHONPATH: no pip install
#      of the project, whose torch pin is not the machine's), places mobilenet_v2's weights;
#   2. runs `pytest -m gpu tests/test_gpu.py` under a time limit;
#   3. benchmarks layertap vs the naive server vs in-process on mobilenet_v2 and resnet50 at
#      1/16/64 in flight, then layertap with nvJPEG off, with float16 autocast, and both
#      (bench/compare.py --device cuda, one run each, --json figures);
#   4. writes docs/BENCHMARKS_GPU.md (bench/gpu_report.py: machine, date, commands, tables, the
#      target layertap >= 3x naive at 64 in flight per model) and the figures as JSON;
#   5. copies what it wrote into $OUT when that is set (flat, at most 8 files).
# Usage: bash bench/gpu_check.sh            the device run (python3 = the machine's torch venv)
#        bash bench/gpu_check.sh --dry-run  the same steps on this CPU with .venv: device cpu,
#                                           one model, c=1,2, short points; report in a temp dir
# Environment: GPU_CHECK_WORK (work folder), GPU_CHECK_BUDGET_S (seconds from the start by which
# every benchmark run must end: a later run starts only with MIN_RUN_S left, and is stopped at
# the budget; default 440, dry run 900), GPU_CHECK_LAYERTAP_ARGS (extra `layertap serve` flags for
# every layertap run, after the script's own: e.g. "--decode-threads=8", or
# "--compile-budget-s=60" for compile = "auto", off here), PYTHON (the interpreter).
# Exit code: 0 when every step ran without an error (a missed target is a result, not an error).
# A step past its limit gets SIGINT (so bench/compare.py stops its servers), SIGKILL 20 s later.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
DRY=0
for arg in "$@"; do
    case $arg in
        --dry-run) DRY=1 ;;
        *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
    esac
done
[[ ${GPU_CHECK_DRY_RUN:-0} == 1 ]] && DRY=1

if ((DRY)); then
    PY=${PYTHON:-$ROOT/.venv/bin/python}
    DEVICE=cpu
    MODELS=mobilenet_v2:features.18
    CONCURRENCY=1,2
    BATCH_SIZES=1,2
    WARMUP=0.5
    SECONDS_PER_POINT=1.5  # long enough for a few responses on a busy 2-core machine
    PYTEST_LIMIT=120
    MIN_RUN_S=15
    BUDGET=${GPU_CHECK_BUDGET_S:-900}
    WORK=${GPU_CHECK_WORK:-$(mktemp -d /tmp/gpu-check-dry.XXXXXX)}
    REPORT=$WORK/BENCHMARKS_GPU.md
    # labels | layertap flags | [[models]] keys (CPU: bfloat16 autocast; gpu_decode is a no-op)
    VARIANTS=(
        "fp32, defaults||"
        "bf16 autocast, gpu_decode off|--layertap-arg=--gpu-decode=off|autocast=\"bfloat16\""
    )
else
    PY=${PYTHON:-python3}
    if [[ -z ${PYTHON:-} ]] && ! python3 -c 'import torch' 2>/dev/null \
        && [[ -x /opt/torch/.venv/bin/python3 ]]; then
        PY=/opt/torch/.venv/bin/python3  # the machine's torch venv, when not first on PATH
    fi
    DEVICE=cuda
    MODELS=mobilenet_v2:features.18,resnet50:layer4
    CONCURRENCY=1,16,64
    BATCH_SIZES=1,16,64
    WARMUP=1
    SECONDS_PER_POINT=3
    PYTEST_LIMIT=150
    MIN_RUN_S=60  # a layertap-only run of both models: about 60 s on an H100 (estimated)
    BUDGET=${GPU_CHECK_BUDGET_S:-440}  # + the report: the whole under 8 minutes
    WORK=${GPU_CHECK_WORK:-/tmp/gpu-check}
    REPORT=$ROOT/docs/BENCHMARKS_GPU.md
    VARIANTS=(
        "fp32, nvJPEG (defaults)||"
        "fp32, CPU decode|--layertap-arg=--gpu-decode=off|"
        "fp16 autocast, nvJPEG||autocast=\"float16\""
        "fp16 autocast, CPU decode|--layertap-arg=--gpu-decode=off|autocast=\"float16\""
    )
fi
mkdir -p "$WORK"
rm -f "$WORK"/variants.tsv "$WORK"/run-*.json "$WORK"/pytest.* "$WORK"/env.json \
    "$WORK"/problems.txt
LOG=$WORK/gpu_check.log
: >"$LOG"
say() { echo "[gpu_check $(date +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$LOG" >&2; }
problem() { say "PROBLEM: $*"; echo "$*" >>"$WORK/problems.txt"; }  # listed in the report
say "root $ROOT, work $WORK, device $DEVICE, dry run $DRY, python $PY"

# --- 1. install ---------------------------------------------------------------------------
SITE=$WORK/site
rm -rf "$SITE"
mkdir -p "$SITE/layertap"
shopt -s nullglob
WHEELS=("$ROOT"/.whl/*.whl)
if ((DRY)); then
    say "dry run: the venv has every package; .whl/ holds ${#WHEELS[@]} wheels"
    if ((${#WHEELS[@]})); then  # installable for the device's Python 3.12? (not imported here)
        if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --target "$WORK/wheels-for-3.12" --python-version 3.12 --implementation cp \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
            --only-binary=:all: "${WHEELS[@]}" >>"$LOG" 2>&1; then
            say "the wheels install for cp312 x86-64 ($(du -sh "$WORK/wheels-for-3.12" | cut -f1))"
        else
            problem "the wheels of .whl/ do not install for cp312 x86-64 (see gpu_check.log)"
        fi
        rm -rf "$WORK/wheels-for-3.12"
    fi
elif ((${#WHEELS[@]} == 0)); then
    say "no wheels in .whl/ (prepare them with bash bench/gpu_wheels.sh): using what is installed"
elif "$PY" -m pip --version >/dev/null 2>&1; then
    say "installing ${#WHEELS[@]} wheels into $SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "${WHEELS[@]}" >>"$LOG" 2>&1 || problem "pip install of .whl/ failed"
else  # a wheel is a zip: without pip, unpacking it into the target folder is an install
    say "no pip: unpacking ${#WHEELS[@]} wheels into $SITE"
    for w in "${WHEELS[@]}"; do
        "$PY" -m zipfile -e "$w" "$SITE" >>"$LOG" 2>&1 || problem "unpacking $w failed"
    done
fi
# layertap's import names (pyproject's package-dir) as links to this checkout's folders
ln -sfn "$ROOT/server" "$SITE/layertap/server"
ln -sfn "$ROOT/client" "$SITE/layertap/client"
ln -sfn "$ROOT/common" "$SITE/layertap/common"
ln -sfn "$ROOT/proto/layertap/v1" "$SITE/layertap/v1"
export PYTHONPATH=$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}
export TORCH_HOME=$WORK/torch_home  # mobilenet_v2's weights go here, nothing is downloaded
export PYTHONDONTWRITEBYTECODE=1
"$PY" scripts/prepare_weights.py >>"$LOG" 2>&1 \
    || problem "mobilenet_v2's weights not placed (scripts/prepare_weights.py): random init"
if "$PY" -m bench.gpu_report env --work "$WORK" --device "$DEVICE" >>"$LOG" 2>&1; then
    ENV_OK=1
    say "environment: $("$PY" -c 'import json,sys; e=json.load(open(sys.argv[1])); print(e["gpu"], "| torch", e["torch"], "| grpc", e["versions"]["grpc"], "| protobuf", e["versions"]["google.protobuf"])' "$WORK/env.json")"
else
    ENV_OK=0
    say "environment check failed: the benchmark is skipped (see $LOG and env.json)"
fi

# --- 2. tests -----------------------------------------------------------------------------
say "pytest -m gpu (limit ${PYTEST_LIMIT}s)"
timeout -s INT -k 20 "$PYTEST_LIMIT" "$PY" -m pytest -m gpu tests/test_gpu.py -q -rA \
    -p no:cacheprovider --junitxml="$WORK/pytest.xml" >"$WORK/pytest.log" 2>&1
echo $? >"$WORK/pytest.rc"
say "pytest exit $(cat "$WORK/pytest.rc"): $(tail -n 1 "$WORK/pytest.log")"

# --- 3. benchmark -------------------------------------------------------------------------
# bench/compare.py's servers run in sessions of their own; a run stopped at its limit may leave
# some behind. Each run's processes carry GPU_CHECK_RUN in their environment: those, and only
# those, are stopped by their ids after the run.
reap() {
    local marker=$1 pids=() f pid
    for f in /proc/[0-9]*/environ; do
        pid=${f#/proc/}
        pid=${pid%/environ}
        [[ $pid == "$$" ]] && continue
        grep -qzx "GPU_CHECK_RUN=$marker" "$f" 2>/dev/null && pids+=("$pid")
    done
    ((${#pids[@]})) || return 0
    say "stopping ${#pids[@]} process(es) the run left: ${pids[*]}"
    kill -TERM "${pids[@]}" 2>/dev/null
    for _ in {1..20}; do  # up to 10 s to stop, then SIGKILL
        kill -0 "${pids[@]}" 2>/dev/null || return 0
        sleep 0.5
    done
    kill -KILL "${pids[@]}" 2>/dev/null
    return 0
}
n=0
for variant in "${VARIANTS[@]}"; do
    IFS='|' read -r label flags keys <<<"$variant"
    n=$((n + 1))
    systems=layertap
    ((n == 1)) && systems=inprocess,layertap,naive
    # eager layertap (compile_budget_s 0): compile = "auto" would compile each model at load,
    # then every batch size in the background, which bench/compare.py waits for: minutes on a
    # cold machine. In-process: the plain loop and the server's own (folded) forward.
    cmd=("$PY" -m bench.compare --device "$DEVICE" --models "$MODELS" --systems "$systems"
        --concurrency "$CONCURRENCY" --batch-sizes "$BATCH_SIZES" --warmup "$WARMUP"
        --seconds "$SECONDS_PER_POINT" --skip-memory --skip-mixed
        --inprocess-variants "eager,folded" --layertap-arg=--compile-budget-s=0
        --out "$WORK/run-$n.md" --json "$WORK/run-$n.json")
    [[ -n $flags ]] && cmd+=("$flags")
    [[ -n $keys ]] && cmd+=(--layertap-model-key "$keys")
    for extra in ${GPU_CHECK_LAYERTAP_ARGS:-}; do cmd+=("--layertap-arg=$extra"); done
    shown="python3 -m bench.compare $(printf '%q ' "${cmd[@]:3}")"
    left=$((BUDGET - SECONDS))
    if ((ENV_OK == 0)); then
        printf '%s\tskipped: the environment check failed\t0\trun-%s.json\t%s\n' \
            "$label" "$n" "$shown" >>"$WORK/variants.tsv"
        continue
    fi
    if ((left < MIN_RUN_S)); then
        say "run $n ($label) skipped: ${left}s of the ${BUDGET}s budget left"
        printf '%s\tskipped: time budget (%ss left)\t0\trun-%s.json\t%s\n' \
            "$label" "$left" "$n" "$shown" >>"$WORK/variants.tsv"
        continue
    fi
    say "run $n ($label): $shown(limit ${left}s)"
    t0=$SECONDS
    GPU_CHECK_RUN="$WORK/run-$n" timeout -s INT -k 20 "$left" "${cmd[@]}" >>"$WORK/bench.log" 2>&1
    rc=$?
    reap "$WORK/run-$n"
    printf '%s\t%s\t%s\trun-%s.json\t%s\n' "$label" "$rc" "$((SECONDS - t0))" "$n" "$shown" \
        >>"$WORK/variants.tsv"
    say "run $n exit $rc after $((SECONDS - t0))s"
done

# --- 4. report ----------------------------------------------------------------------------
dry_flag=()
((DRY)) && dry_flag=(--dry-run)
"$PY" -m bench.gpu_report render --work "$WORK" --out "$REPORT" "${dry_flag[@]}" >>"$LOG" 2>&1
status=$?
grep -E '^(TARGET|wrote)' "$LOG" | tail -n 5 >&2
say "report $REPORT, exit $status, total ${SECONDS}s"

# --- 5. $OUT (flat: the remote runner returns at most 8 files) ----------------------------
if [[ -n ${OUT:-} ]]; then
    mkdir -p "$OUT"
    for f in "$REPORT" "$WORK/gpu_figures.json" "$WORK/pytest.log" "$WORK/bench.log" \
        "$WORK/gpu_check.log" "$WORK/env.json"; do
        [[ -f $f ]] && cp "$f" "$OUT/"
    done
fi
exit "$status"
