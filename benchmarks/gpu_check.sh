#!/usr/bin/env bash
# gpu_check.sh: verify vsam_ext on a GPU machine with one command.
#
#   bash benchmarks/gpu_check.sh                 # build, whole test suite on CUDA, benchmarks, summary
#   bash benchmarks/gpu_check.sh --quick         # tiny everything (on a CPU machine: the CPU smoke mode)
#   bash benchmarks/gpu_check.sh --summary-only runs/gpu-check-20261201-001000
#
# Needs a CUDA build of torch and triton already installed (their versions are kept), a compiler
# and nvcc for the extension; pytest (pytest-xdist if you want parallel tests), hypothesis, numpy;
# matplotlib for the PNGs (optional). Phases, in order:
#
#   build   python setup.py build_ext --inplace, TORCH_CUDA_ARCH_LIST defaulting to the local
#           GPU's compute capability (~1 min); then vsam_ext.available_backends() must list
#           'cuda' and 'triton', else the script stops here, loudly (exit 3).
#   tests   python -m pytest python_tests -q -n JOBS (pytest-xdist; serial without it) on the GPU,
#           junit XML and log saved; a failure is recorded, the benchmarks still run.
#   bench   bench_kernels (64M parameters x 1 and 1024 layers), bench_step (all model shapes,
#           GPT 1.3B included), bench_train --fixed-batch (ResNet-18, batch 128, 200 steps, 2
#           runs per method): about 6 minutes together on an H200.
#   summary benchmarks/gpu_summary.py: tests passed/failed/skipped, % of copy bandwidth per op and
#           backend, step-time ratios against torch's foreach/fused steps and the authors' loop,
#           vSAM's overhead against its ideal. Also written to OUT/summary.md and summary.json.
#
# Everything goes to OUT (default runs/gpu-check-<UTC date-time>/; runs/ is git-ignored):
# meta.txt, env.txt, phases.tsv, build.log, backends.txt, tests.log, tests.xml, tests.rc,
# bench/<script>_cuda.{md,csv,png}, bench/<script>.log, summary.md, summary.json.
# The bench/*.md files are the sections to paste into benchmarks/RESULTS.md.
#
# Exit status: 0 when every phase passed; 1 when a test failed or a phase failed or timed out;
# 2 on a usage error; 3 when the build or the backend check failed (nothing else ran).
#
# Options:
#   --quick            tiny sizes everywhere (a smoke run, not a measurement): a few test files,
#                      16M-parameter kernels, ResNet-18 shapes, 10 training steps. Without a GPU
#                      it runs on the CPU (no build, no cuda/triton check; the C++ cpu backend if
#                      built), to exercise the script and the summary.
#   --allow-cpu        without a GPU, run the CPU versions instead of failing (implied by --quick)
#   --out DIR          output folder
#   --jobs N           pytest-xdist workers (default: min(8, CPU count); 1 with --quick)
#   --tests "ARGS"     pytest targets/options instead of python_tests (e.g. "python_tests/test_cuda.py")
#   --kernels "ARGS" / --step "ARGS" / --train "ARGS"
#                      arguments for that benchmark instead of the defaults above (--device and
#                      --out are added)
#   --skip-build, --skip-tests, --skip-bench
#                      leave a phase out (e.g. to split the run: one call for build + tests, one for
#                      --skip-build --skip-tests with the same --out)
#   --summary-only DIR just print (and rewrite) the summary of an existing output folder
#   --issue15          the focused check of issue 15 instead of the full run (~6 min on an H200,
#                      ~10 with --baseline): build; tests of the changed kernels
#                      (test_segment_launches.py, test_cuda.py, test_triton_lists.py, and
#                      test_triton_ptx.py: the 128-bit loads with this machine's Triton); bench_kernels
#                      segment_sumsq, perturb+keep and sgd+restore at 64M x 1, 161, 1024 tensors
#                      (cuda, triton, foreach); bench_step sgd, sam, vsam_sampling at ResNet-50 and
#                      GPT-2 (cuda, triton, their in_place forms, foreach); the probe (host time,
#                      stream time and the kernels' own device time per step at ResNet-50, and the
#                      slowest kernels with their GB/s: is a step host-bound or which kernel is
#                      slow); then the verdict against the targets (segment_sumsq >= 90 % of copy
#                      on both GPU backends at every tensor count; triton vsam_sampling at
#                      ResNet-50 >= 90 %). Writes OUT/issue15.md. Item 4: test_graphs.py and
#                      test_device_scalars_kernels.py, and bench_train --fixed-batch at batch 32 and
#                      128 with sam/vsam eager and replayed from CUDA graphs (OUT/bench/graphs_b*/).
#   --baseline REV     with --issue15: also build REV (git archive into OUT/baseline/src; e.g. the
#                      commit before the issue-15 changes, c52413f^) and run the same benchmarks
#                      and probe with it on the same machine; the verdict shows both
#   --test-timeout S   limit of the test phase in seconds (default 3600); --bench-timeout S: of each
#                      benchmark (default 1200); a phase past its limit is killed and marked rc 124
#   -h, --help         this text
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "gpu_check: ERROR: $1" >&2; exit "${2:-1}"; }

QUICK=0 ALLOW_CPU=0 OUT="" JOBS="" TESTS_ARGS="" KERNELS_ARGS="" STEP_ARGS="" TRAIN_ARGS=""
SKIP_BUILD=0 SKIP_TESTS=0 SKIP_BENCH=0 SUMMARY_ONLY="" TEST_TIMEOUT=3600 BENCH_TIMEOUT=1200
ISSUE15=0 BASELINE=""
ORIG_ARGS=("$@")
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --allow-cpu) ALLOW_CPU=1 ;;
    --out) OUT="${2:?--out needs a folder}"; shift ;;
    --jobs|-n) JOBS="${2:?--jobs needs a number}"; shift ;;
    --tests) TESTS_ARGS="${2?--tests needs arguments}"; shift ;;
    --kernels) KERNELS_ARGS="${2?}"; shift ;;
    --step) STEP_ARGS="${2?}"; shift ;;
    --train) TRAIN_ARGS="${2?}"; shift ;;
    --skip-build) SKIP_BUILD=1 ;;
    --skip-tests) SKIP_TESTS=1 ;;
    --skip-bench) SKIP_BENCH=1 ;;
    --summary-only) SUMMARY_ONLY="${2:?--summary-only needs a folder}"; shift ;;
    --test-timeout) TEST_TIMEOUT="${2:?}"; shift ;;
    --bench-timeout) BENCH_TIMEOUT="${2:?}"; shift ;;
    --issue15) ISSUE15=1 ;;
    --baseline) BASELINE="${2:?--baseline needs a git revision}"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check: unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

# The interpreter: $PYTHON, else the first of python, python3, ./.venv/bin/python that imports torch.
if [ -n "${PYTHON:-}" ]; then
  PY="$PYTHON"
else
  PY=""
  for cand in python python3 "$REPO/.venv/bin/python"; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch" >/dev/null 2>&1; then PY="$cand"; break; fi
  done
  [ -n "$PY" ] || die "no python that imports torch among python, python3, .venv/bin/python; set PYTHON=/path/to/python" 2
fi
command -v "$PY" >/dev/null 2>&1 || die "no python interpreter ($PY); set PYTHON=/path/to/python" 2
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac   # absolute: phases cd elsewhere

if [ -n "$SUMMARY_ONLY" ]; then
  exec "$PY" benchmarks/gpu_summary.py "$SUMMARY_ONLY"
fi
[ -z "$BASELINE" ] || [ "$ISSUE15" = 1 ] || die "--baseline goes with --issue15" 2
[ "$ISSUE15" = 0 ] || [ "$QUICK" = 0 ] || die "--issue15 and --quick exclude each other" 2
if [ -n "$BASELINE" ]; then
  git rev-parse --verify --quiet "$BASELINE^{commit}" >/dev/null || die "--baseline $BASELINE: not a git revision here" 2
fi

OUT="${OUT:-runs/gpu-check-$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT/bench"
OUT="$(cd "$OUT" && pwd)"
PHASES="$OUT/phases.tsv"
: > "$PHASES"
START=$SECONDS

log() { echo "[gpu_check $(date -u +%H:%M:%S) +$((SECONDS - START))s] $*" | tee -a "$OUT/gpu_check.log" >&2; }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4:-}" >> "$PHASES"; }
meta() { printf '%s=%s\n' "$1" "$2" >> "$OUT/meta.txt"; }

# run_phase NAME LIMIT_S LOGFILE CMD...: runs CMD with its output on the terminal and in LOGFILE,
# records its exit status and duration in phases.tsv, never stops the script. Sets PHASE_RC.
run_phase() {
  local name="$1" limit="$2" logf="$3"; shift 3
  local t0=$SECONDS
  log "$name: $*"
  set +e
  if command -v timeout >/dev/null 2>&1; then
    timeout --kill-after=30 "$limit" "$@" 2>&1 | tee "$logf"
  else
    "$@" 2>&1 | tee "$logf"
  fi
  PHASE_RC=${PIPESTATUS[0]}
  set -e
  local note=""
  [ "$PHASE_RC" = 124 ] && note="killed after ${limit} s"
  record "$name" "$PHASE_RC" "$((SECONDS - t0))" "$note"
  log "$name: exit $PHASE_RC after $((SECONDS - t0)) s${note:+ ($note)}"
}

summary() {
  local rc=0
  log "summary"
  "$PY" benchmarks/gpu_summary.py "$OUT" || rc=$?
  echo
  echo "outputs: $OUT"
  return "$rc"
}

# -- environment --------------------------------------------------------------------------------
rm -f "$OUT/meta.txt"
meta command "bash benchmarks/gpu_check.sh$([ ${#ORIG_ARGS[@]} -gt 0 ] && printf ' %q' "${ORIG_ARGS[@]}")"
meta date "$(date -u '+%Y-%m-%d %H:%M UTC')"
DIRTY="$(git status --porcelain --untracked-files=no 2>/dev/null || true)"
meta git "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)${DIRTY:++dirty}"
ENV_PY='
import sys, torch
print("python", sys.version.split()[0])
print("torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton; print("triton", triton.__version__)
except Exception as exc:
    print("triton not importable:", exc)
ok = torch.cuda.is_available()
print("cuda_available", ok)
if ok:
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, "%.0f GiB" % (p.total_memory / 2**30), "sm_%d%d" % (p.major, p.minor),
          "count", torch.cuda.device_count())
'
"$PY" -c "$ENV_PY" > "$OUT/env.txt" 2>&1 || die "python cannot import torch ($PY): see $OUT/env.txt" 2
{ command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
  command -v nvcc >/dev/null 2>&1 && nvcc --version | tail -n 2 || echo "nvcc not on PATH"
} >> "$OUT/env.txt" 2>&1
cat "$OUT/env.txt" >&2
if grep -q "^cuda_available True" "$OUT/env.txt"; then
  MODE=gpu DEV=cuda
  unset TRITON_INTERPRET                   # the Triton kernels must run compiled, on CUDA tensors
  meta device "$(grep '^gpu ' "$OUT/env.txt" | head -n 1 | cut -d' ' -f2-)"
elif [ "$QUICK" = 1 ] || [ "$ALLOW_CPU" = 1 ]; then
  MODE=cpu-smoke DEV=cpu
  meta device "CPU: $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//') ($(nproc 2>/dev/null || echo '?') logical CPUs)"
  log "NO GPU: torch.cuda.is_available() is False. Running the CPU smoke mode: no CUDA build, no"
  log "cuda/triton check, benchmarks on the CPU. Nothing here verifies the GPU backends."
else
  die "no CUDA GPU visible (torch.cuda.is_available() is False; see $OUT/env.txt). This script checks
the GPU backends; for a CPU smoke run of the script itself use --quick (or --allow-cpu)." 2
fi
meta mode "$MODE"
meta torch "$(grep '^torch ' "$OUT/env.txt" | cut -d' ' -f2-)"
meta triton "$(grep '^triton' "$OUT/env.txt" | cut -d' ' -f2-)"

NPROC="$(nproc 2>/dev/null || echo 4)"
if [ -z "$JOBS" ]; then
  if [ "$QUICK" = 1 ]; then JOBS=1; else JOBS=$(( NPROC < 8 ? NPROC : 8 )); fi
fi

if [ "$ISSUE15" = 1 ]; then
  log "plan ($MODE, --issue15): build, four test files, segment_sumsq and the vSAM sampling step's kernels and steps, the probe${BASELINE:+, all of it again for $BASELINE}"
elif [ "$QUICK" = 1 ]; then
  log "plan ($MODE, --quick): $([ "$MODE" = gpu ] && echo "build, ")two test files, tiny benchmarks: a smoke run of a few minutes, not a measurement"
else
  log "plan ($MODE): build ~1 min, the whole test suite with $JOBS workers (10-30 min), benchmarks ~6 min on an H200"
fi
log "outputs: $OUT"

# -- build -------------------------------------------------------------------------------------------
if [ "$MODE" = gpu ] && [ "$SKIP_BUILD" = 0 ]; then
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    TORCH_CUDA_ARCH_LIST="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
  fi
  export TORCH_CUDA_ARCH_LIST
  log "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
  run_phase build 1800 "$OUT/build.log" "$PY" setup.py build_ext --inplace
  if [ "$PHASE_RC" != 0 ]; then
    summary || true
    die "the build failed (exit $PHASE_RC): see $OUT/build.log" 3
  fi
elif [ "$MODE" = gpu ]; then
  record build skip 0 "--skip-build"
else
  record build skip 0 "no GPU: no CUDA build; the CPU build is pip install -e ."
fi

# --issue15: the probe (argv: source root, device, output JSON). Per optimizer step at ResNet-50
# shapes (ResNet-18 on a CPU): the host's time to issue it (no sync), the stream's time for
# steps back to back (CUDA events), and the kernels' own device time (torch.profiler, CUDA
# activity): host >= stream means host-bound; stream >> kernels means gaps between kernels;
# the kernels' time against the step's bytes is their efficiency. Then the kernels of each
# vsam_sampling row with their time per step. A missing profiler is reported, not fatal.
PROBE_PY="$(cat <<'EOF'
import json, math, os, sys, time
root, dev, out = sys.argv[1], sys.argv[2], sys.argv[3]
sys.path[:0] = [root, os.path.join(root, 'benchmarks')]
import torch
import vsam_ext
import bench_step as B
import model_shapes

device = torch.device(dev)
cuda = device.type == 'cuda'
print('probe: vsam_ext from', os.path.dirname(vsam_ext.__file__))
try:
    import vsam_ext._C as _ext
    print('probe: vsam_ext._C from', _ext.__file__)
except ImportError as exc:
    print('probe: no vsam_ext._C:', exc)
have = vsam_ext.available_backends()
backends = [b for b in (('cuda', 'triton') if cuda else ('cpu',)) if b in have]
backends += [b + '/in_place' for b in list(backends)]
model = 'resnet50' if cuda else 'resnet18'
shapes = model_shapes.param_shapes(model)
nparam = sum(math.prod(x) for x in shapes)
sync = torch.cuda.synchronize if cuda else (lambda: None)


def stream_ms(fn, n):
    sync()
    if cuda:
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(n):
            fn()
        e1.record()
        torch.cuda.synchronize()
        return e0.elapsed_time(e1) / n
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e3


src = torch.randn((64 << 20) if cuda else (4 << 20), device=device)
dst = torch.empty_like(src)
for _ in range(3):
    dst.copy_(src)
copy_gbps = 2 * src.numel() * 4 / stream_ms(lambda: dst.copy_(src), 20) / 1e6
del src, dst
print(f'probe: copy bandwidth {copy_gbps:.0f} GB/s; {model}: {nparam / 1e6:.1f} M parameters, {len(shapes)} tensors')
if not cuda:
    print('probe: on a CPU the host and the stream are one clock: host- or device-bound means nothing here')
rows = []
for backend in backends:
    for step, bpp in (('sgd', 20), ('sam', 44), ('vsam_sampling', 56)):
        try:
            fn = B.build_ours(step, backend, shapes, device)
        except Exception as exc:  # noqa: BLE001
            print(f'probe: {backend} {step}: not built ({exc})')
            continue
        for _ in range(5):
            fn()
        sync()
        n = 20
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        host = (time.perf_counter() - t0) / n * 1e3
        stream = stream_ms(fn, n)
        busy, kernels = None, []
        if cuda:
            try:
                from torch.profiler import profile, ProfilerActivity
                sync()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(n):
                        fn()
                    sync()
                total = 0.0
                for ev in prof.key_averages():
                    t = getattr(ev, 'self_device_time_total', None)
                    if t is None:
                        t = getattr(ev, 'self_cuda_time_total', 0.0)
                    if t:
                        total += t
                        kernels.append((t / n / 1e3, ev.count / n, ev.key))
                busy = total / n / 1e3
                kernels.sort(reverse=True)
            except Exception as exc:  # noqa: BLE001
                print(f'probe: profiler unavailable: {exc}')
        nbytes = bpp * nparam
        row = dict(backend=backend, step=step, host_ms=host, stream_ms=stream, kernels_ms=busy,
                   pct_copy_stream=100 * nbytes / stream / 1e6 / copy_gbps,
                   pct_copy_kernels=None if not busy else 100 * nbytes / busy / 1e6 / copy_gbps,
                   bound='host' if host >= 0.9 * stream else 'device',
                   kernels=[dict(ms=k[0], calls=k[1], name=k[2][:100]) for k in kernels[:12]])
        rows.append(row)
        ks = '-' if row['pct_copy_kernels'] is None else f'{busy:.3f} ms ({row["pct_copy_kernels"]:.0f}%)'
        print(f'probe: {backend:16s} {step:14s} host {host:7.3f} ms  stream {stream:7.3f} ms '
              f'({row["pct_copy_stream"]:3.0f}% of copy)  kernels {ks}  {row["bound"]}-bound')
        del fn
        if cuda:
            torch.cuda.empty_cache()
for r in rows:
    if r['step'] == 'vsam_sampling' and r['kernels']:
        print(f'probe: {r["backend"]} vsam_sampling, device time per step by kernel:')
        for k in r['kernels']:
            print(f'probe:     {k["ms"]:7.3f} ms  x{k["calls"]:.0f}  {k["name"]}')
with open(out, 'w') as f:
    json.dump(dict(copy_gbps=copy_gbps, model=model, params=nparam, rows=rows), f, indent=1)
EOF
)"

# --issue15: the verdict (argv: OUT) from the bench CSVs of the run and of the baseline.
VERDICT_PY="$(cat <<'EOF'
import csv, glob, os, sys
out = sys.argv[1]


def rows(folder, name):
    f = sorted(glob.glob(os.path.join(folder, name + '_*.csv')))
    return list(csv.DictReader(open(f[0]))) if f else []


def num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


runs = [('now', os.path.join(out, 'bench')), ('baseline', os.path.join(out, 'baseline', 'bench'))]
runs = [(label, d) for label, d in runs if os.path.isdir(d)]
table = {}
for label, d in runs:
    for r in rows(d, 'bench_kernels'):
        if r['op'] in ('segment_sumsq', 'perturb+keep', 'sgd+restore') and (num(r['params']) or 0) >= 50e6:
            table.setdefault((r['op'], r['impl'], 'x' + r['layers'] + ' tensors'), {})[label] = num(r['pct_copy'])
    for r in rows(d, 'bench_step'):
        if r['step'] in ('sgd', 'sam', 'vsam_sampling'):
            table.setdefault((r['step'], r['impl'], r['model']), {})[label] = num(r['pct_copy'])
labels = [label for label, _ in runs]
print('## Issue 15: % of the copy bandwidth; targets >= 90 %')
print()
print('| op / step | impl | at | ' + ' | '.join(labels) + ' | target | met |')
print('| --- | --- | --- | ' + ' | '.join('---:' for _ in labels) + ' | --- | --- |')
missed = 0
for (op, impl, at), v in sorted(table.items()):
    target = None
    if op == 'segment_sumsq' and impl in ('vsam_ext[cuda]', 'vsam_ext[triton]'):
        target = 90
    if op == 'vsam_sampling' and impl == 'vsam_ext[triton]' and at == 'resnet50':
        target = 90
    now = v.get('now')
    met = '' if target is None else ('yes' if now is not None and now >= target else 'NO')
    missed += met == 'NO'
    cells = ['-' if v.get(label) is None else f'{v[label]:.0f}%' for label in labels]
    print(f'| {op} | {impl} | {at} | ' + ' | '.join(cells) + f' | {">= %d%%" % target if target else "-"} | {met} |')
print()
print(f'targets missed: {missed}' if table else 'no benchmark output to judge')
sys.exit(1 if missed or not table else 0)
EOF
)"

BACKENDS_PY='
import sys, vsam_ext
from vsam_ext.ops import _LOAD_ERRORS
have = vsam_ext.available_backends()
print(" ".join(have))
need = [b for b in ("cuda", "triton") if b not in have] if sys.argv[1] == "gpu" else []
for b in need:
    print("MISSING backend %s: %s" % (b, _LOAD_ERRORS.get(b, "not built / not usable")), file=sys.stderr)
sys.exit(1 if need else 0)
'
set +e
BACKENDS="$("$PY" -c "$BACKENDS_PY" "$MODE" 2> "$OUT/backends.err")"
BRC=$?
set -e
echo "$BACKENDS" > "$OUT/backends.txt"
cat "$OUT/backends.err" >> "$OUT/backends.txt"
meta backends "$BACKENDS"
log "vsam_ext.available_backends(): ${BACKENDS:-<import failed>}"
if [ "$BRC" != 0 ]; then
  cat "$OUT/backends.err" >&2
  record backends "$BRC" 0 "cuda and triton must both be available on a GPU"
  summary || true
  die "vsam_ext lacks the cuda and/or triton backend on this GPU machine (see above and $OUT/backends.txt).
Check $OUT/build.log (was torch built with CUDA? is nvcc on PATH?) and that triton imports." 3
fi
record backends 0 0 "$BACKENDS"

# -- tests -------------------------------------------------------------------------------------------
if [ "$SKIP_TESTS" = 0 ]; then
  if [ -n "$TESTS_ARGS" ]; then
    read -r -a TARGETS <<< "$TESTS_ARGS"
  elif [ "$ISSUE15" = 1 ]; then
    TARGETS=(python_tests/test_segment_launches.py python_tests/test_cuda.py python_tests/test_triton_lists.py
             python_tests/test_triton_ptx.py python_tests/test_graphs.py python_tests/test_device_scalars_kernels.py)
  elif [ "$QUICK" = 1 ]; then
    TARGETS=(python_tests/test_cuda.py python_tests/test_controller.py)
  else
    TARGETS=(python_tests)
  fi
  XDIST=()
  if [ "$JOBS" -gt 1 ] && "$PY" -c "import xdist" 2>/dev/null; then
    XDIST=(-n "$JOBS")
  elif [ "$JOBS" -gt 1 ]; then
    log "pytest-xdist is not installed: the tests run serially (pip install pytest-xdist for -n $JOBS)"
  fi
  run_phase tests "$TEST_TIMEOUT" "$OUT/tests.log" "$PY" -m pytest "${TARGETS[@]}" -q -rfE \
    ${XDIST[@]+"${XDIST[@]}"} --junitxml="$OUT/tests.xml" -p no:cacheprovider
  echo "$PHASE_RC" > "$OUT/tests.rc"
else
  record tests skip 0 "--skip-tests"
fi

# -- benchmarks ----------------------------------------------------------------------------------------
if [ "$SKIP_BENCH" = 0 ]; then
  if [ "$ISSUE15" = 1 ]; then
    K_DEF="--ops segment_sumsq,perturb+keep,sgd+restore --sizes 64M --layers 1,161,1024 --impls cuda,triton,foreach"
    S_DEF="--models resnet50,gpt2 --steps sgd,sam,vsam_sampling --impls cuda,triton,cuda/in_place,triton/in_place,foreach"
    [ "$MODE" = gpu ] || { K_DEF="--quick --ops segment_sumsq --sizes 1M --layers 1,161 --impls cpu,foreach --threads 1"
                           S_DEF="--quick --models resnet18 --steps vsam_sampling --impls cpu,foreach --threads 1"; }
    T_DEF=""
  elif [ "$MODE" = gpu ] && [ "$QUICK" = 0 ]; then
    K_DEF="--sizes 64M --layers 1,1024"
    S_DEF=""
    T_DEF="--fixed-batch --models resnet18 --batch 128 --steps 200 --warmup 20 --repeats 2"
  elif [ "$MODE" = gpu ]; then
    K_DEF="--quick --sizes 16M --layers 1,128"
    S_DEF="--quick --models resnet18"
    T_DEF="--quick --fixed-batch --models resnet18 --batch 32 --steps 10 --warmup 2"
  elif [ "$QUICK" = 1 ]; then
    K_DEF="--quick --sizes 256K --layers 1,16 --threads 1"
    S_DEF="--quick --models resnet18 --threads 1"
    T_DEF="--quick --fixed-batch --methods sgd-foreach,sgd-fused,sam-torch,sam-authors,sam,vsam --threads 1"
  else
    K_DEF="--sizes 16M --layers 1,128"
    S_DEF="--models resnet18,resnet50"
    T_DEF="--fixed-batch --models resnet18 --batch 32 --steps 30 --warmup 3"
  fi
  read -r -a K <<< "${KERNELS_ARGS:-$K_DEF}"
  read -r -a S <<< "${STEP_ARGS:-$S_DEF}"
  read -r -a T <<< "${TRAIN_ARGS:-$T_DEF}"
  export MPLBACKEND=Agg
  run_phase bench_kernels "$BENCH_TIMEOUT" "$OUT/bench/bench_kernels.log" \
    "$PY" benchmarks/bench_kernels.py --device "$DEV" ${K[@]+"${K[@]}"} --out "$OUT/bench"
  run_phase bench_step "$BENCH_TIMEOUT" "$OUT/bench/bench_step.log" \
    "$PY" benchmarks/bench_step.py --device "$DEV" ${S[@]+"${S[@]}"} --out "$OUT/bench"
  if [ "$ISSUE15" = 1 ]; then
    # item 4: the step replayed from CUDA graphs (GraphedStep) against the eager step, batch 32 and 128
    for B in 32 128; do
      mkdir -p "$OUT/bench/graphs_b$B"
      run_phase "bench_train_graphs_b$B" "$BENCH_TIMEOUT" "$OUT/bench/graphs_b$B/bench_train.log" \
        "$PY" benchmarks/bench_train.py --device "$DEV" --fixed-batch --models resnet18 --batch "$B" \
        --methods sgd-fused,sam-torch,sam,sam-graphed,vsam,vsam-graphed --steps 200 --warmup 20 --repeats 2 \
        --out "$OUT/bench/graphs_b$B"
    done
    printf '%s\n' "$PROBE_PY" > "$OUT/issue15_probe.py"
    run_phase probe "$BENCH_TIMEOUT" "$OUT/bench/probe.log" "$PY" "$OUT/issue15_probe.py" "$REPO" "$DEV" \
      "$OUT/bench/probe.json"
    if [ -n "$BASELINE" ]; then
      BASE_SRC="$OUT/baseline/src"
      rm -rf "$OUT/baseline"
      mkdir -p "$BASE_SRC" "$OUT/baseline/bench"
      git archive "$BASELINE" | tar -x -C "$BASE_SRC"
      meta baseline "$(git rev-parse --short "$BASELINE")"
      run_phase baseline_build 1800 "$OUT/baseline/build.log" bash -c 'cd "$1" && "$2" setup.py build_ext --inplace' \
        _ "$BASE_SRC" "$PY"
      # the baseline's benchmarks must load the baseline's extension, not this checkout's (an
      # editable install of this checkout can resolve vsam_ext._C here)
      WHERE_C="$(cd "$BASE_SRC" && PYTHONPATH="$BASE_SRC" "$PY" -c 'import vsam_ext._C as c; print(c.__file__)' 2>&1 || true)"
      case "$WHERE_C" in
        "$BASE_SRC"/*) record baseline_extension 0 0 "$WHERE_C" ;;
        *) record baseline_extension 1 0 "vsam_ext._C of the baseline resolves to $WHERE_C"
           log "baseline: vsam_ext._C is not the baseline's ($WHERE_C): its numbers would not be the baseline's" ;;
      esac
      run_phase baseline_bench_kernels "$BENCH_TIMEOUT" "$OUT/baseline/bench/bench_kernels.log" \
        "$PY" "$BASE_SRC/benchmarks/bench_kernels.py" --device "$DEV" ${K[@]+"${K[@]}"} --out "$OUT/baseline/bench"
      run_phase baseline_bench_step "$BENCH_TIMEOUT" "$OUT/baseline/bench/bench_step.log" \
        "$PY" "$BASE_SRC/benchmarks/bench_step.py" --device "$DEV" ${S[@]+"${S[@]}"} --out "$OUT/baseline/bench"
      run_phase baseline_probe "$BENCH_TIMEOUT" "$OUT/baseline/bench/probe.log" \
        "$PY" "$OUT/issue15_probe.py" "$BASE_SRC" "$DEV" "$OUT/baseline/bench/probe.json"
    fi
  else
    run_phase bench_train "$BENCH_TIMEOUT" "$OUT/bench/bench_train.log" \
      "$PY" benchmarks/bench_train.py --device "$DEV" ${T[@]+"${T[@]}"} --out "$OUT/bench"
  fi
else
  record bench skip 0 "--skip-bench"
fi

# -- summary ---------------------------------------------------------------------------------------------
echo
RC=0
summary || RC=$?
if [ "$ISSUE15" = 1 ]; then
  echo
  printf '%s\n' "$VERDICT_PY" > "$OUT/issue15_verdict.py"
  "$PY" "$OUT/issue15_verdict.py" "$OUT" | tee "$OUT/issue15.md" || RC=1
fi
if awk -F'\t' '$2 != "0" && $2 != "skip" { bad = 1 } END { exit !bad }' "$PHASES"; then
  RC=1
fi
log "done in $((SECONDS - START)) s, exit $RC"
exit "$RC"
