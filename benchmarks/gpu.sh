#!/usr/bin/env bash
# The GPU benchmark in one go, in under 8 minutes: run from the repository root on a CUDA machine.
#
#   bash benchmarks/gpu.sh [ISIC2017_FOLDER]          # OUT defaults to ./gpu-out
#
# 1. Python: .venv if it exists (installs nothing); else the machine's own python3 when it already
#    has a CUDA torch and alseg's imports (the lent H200's image: it has no package registry, so
#    nothing could be installed there anyway; alseg is put on PYTHONPATH, nothing is written);
#    else a new .venv with a CUDA torch (machines with a registry only).
# 2. benchmarks/gpu_speed.py --device cuda --json     -> $OUT/gpu-speed.json
#    (generated data: training image-steps/s bf16 and fp32, MC passes/s, peak memory, TFLOP/s)
# 3. with ISIC2017_FOLDER (official layout, ~32 MB): alseg run --preset paper-isic on it
#    -> $OUT/paper-isic.json (the rounds; empty if the run was stopped), $OUT/paper-isic.time
#    (/usr/bin/time -v, plus the script's own wall time and exit status) and
#    $OUT/paper-isic-status.json (`alseg status`: the rounds finished, also after a timeout).
# Progress of every step goes to $OUT/gpu.log.
#
# Budget (each step under `timeout`, clipped so that the whole ends by DEADLINE_S = 470 s):
#   setup       <= 240 s  (~10 s when .venv or python3 already has CUDA torch: the H200 case)
#   gpu_speed   <= 150 s  (expected well under a minute: 2 x 2 epochs of 512 images + 5,120 MC passes at 256 px)
#   paper-isic  <= 330 s  (what is left, minus 35 s for the status; one H100 took ~250 s for the 10 rounds)
#   status      <=  20 s
#
# Writes nothing outside $OUT and .venv: bulky and scratch files (the paper-isic run directory, the
# decoded-pixel cache, matplotlib/CUDA/Triton caches, temporary files) go to $OUT/scratch/..., three
# folders down, so that the device tool (at most 8 files back, no more than 2 folders down) brings
# back only the ~5 result files. RUN_DIR=... moves the run directory.
#
# On the lent H200 (no network): the ISIC copy must travel with the working tree; .cache/ is
# git-ignored, so e.g. here `mkdir -p .cache && cp -r ../shared/data/isic .cache/isic`, then
#   run(command="bash benchmarks/gpu.sh .cache/isic", carry=[".cache/isic"], timeout_s=540)
# and `rm -rf .cache/isic` afterwards (a transient copy for the device only; never committed).
# Not yet run on a GPU: written and smoke-tested on CPU (gpu_speed.py at tiny sizes; bash -n).
set -euo pipefail

DEADLINE_S=470
START_DIR=$PWD
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-./gpu-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
DATA=${1:-}
if [[ -n $DATA ]]; then
  [[ -d $DATA ]] || { echo "gpu.sh: no such folder: $DATA" >&2; exit 2; }
  DATA=$(cd "$START_DIR" && cd "$DATA" && pwd)
fi
cd "$REPO"

SCR=$OUT/scratch/cache            # everything below here is >= 3 folders down from $OUT
RUN_DIR=${RUN_DIR:-$OUT/scratch/runs/paper-isic}
mkdir -p "$SCR/tmp" "$SCR/mpl" "$SCR/xdg" "$SCR/nv" "$SCR/triton" "$SCR/inductor" "$SCR/alseg"
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
  TMPDIR=$SCR/tmp MPLCONFIGDIR=$SCR/mpl XDG_CACHE_HOME=$SCR/xdg CUDA_CACHE_PATH=$SCR/nv \
  TRITON_CACHE_DIR=$SCR/triton TORCHINDUCTOR_CACHE_DIR=$SCR/inductor ALSEG_CACHE_DIR=$SCR/alseg
LOG=$OUT/gpu.log
: >"$LOG"

log() { echo "[gpu.sh $(date +%T) +${SECONDS}s] $*" | tee -a "$LOG" >&2; }

# Seconds a step may take: at most $1, and no later than DEADLINE_S minus $2 (reserved for the
# steps after it) minus 10 (timeout's grace before SIGKILL); never 0, which `timeout` reads as no limit.
budget() {
  local b=$(( DEADLINE_S - SECONDS - $2 - 10 ))
  (( b > $1 )) && b=$1
  (( b < 1 )) && b=1
  echo "$b"
}

cuda_python() {  # does "$@" have a torch that sees a CUDA GPU?
  "$@" -c 'import sys, torch; sys.exit(0 if torch.version.cuda and torch.cuda.is_available() else 1)' >/dev/null 2>&1
}

install_venv() {  # into .venv, from the repository root; run under timeout as `bash -c install_venv`
  set -euo pipefail
  .venv/bin/python -m pip install --quiet "torch>=2.3,<2.15"
  # alseg's requirements from pyproject.toml, then the checkout on the path through a .pth file:
  # what `pip install -e .` does, without writing alseg.egg-info into the checkout.
  local deps site
  mapfile -t deps < <(.venv/bin/python - <<'EOF'
import pathlib, re
text = pathlib.Path("pyproject.toml").read_text()
try:
    import tomllib
    deps = tomllib.loads(text)["project"]["dependencies"]
except ModuleNotFoundError:  # Python 3.10
    deps = re.findall(r'"([^"]+)"', re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1))
print("\n".join(deps))
EOF
  )
  .venv/bin/python -m pip install --quiet "${deps[@]}"
  site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$PWD" >"$site/alseg-checkout.pth"
}

failed=0
log "repo $REPO, OUT $OUT, data ${DATA:-none}"
{ timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true; } >>"$LOG" 2>&1

# ---- 1. setup (budget <= 240 s; ~10 s when nothing is installed) ----------------------------
b=$(budget 240 200)
if [[ -x .venv/bin/python ]] && cuda_python timeout "$b" .venv/bin/python; then
  PY=(.venv/bin/python)
  log "using .venv (installing nothing)"
elif cuda_python timeout "$b" python3; then
  # The lent machine's image: python3 holds a CUDA torch and alseg's other imports (numpy, pillow,
  # tifffile, typer, rich, pyyaml, matplotlib, scipy). alseg itself runs from the checkout.
  PY=(python3)
  export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
  [[ -x .venv/bin/python ]] && log "note: .venv has no CUDA torch (the Makefile's CPU pin?); using python3"
  log "using $(command -v python3) with PYTHONPATH=$REPO (installing nothing)"
elif [[ -x .venv/bin/python ]]; then
  log "error: .venv exists but its torch sees no CUDA GPU, and python3 has none either; not installing over it"
  exit 2
else
  log "creating .venv and installing a CUDA torch and alseg's requirements (needs a package registry)"
  python3 -m venv .venv
  # torch must be a CUDA build here: the plain PyPI wheel for Linux x86-64 is one (it bundles the
  # CUDA libraries). NOT the Makefile's `torch==2.13.0` step, which is the CPU wheel on the dev
  # machines; if pip is configured for the CPU index (download.pytorch.org/whl/cpu), set
  # PIP_INDEX_URL=https://pypi.org/simple first. The range is pyproject.toml's.
  export -f install_venv
  timeout -k 10 "$(budget 240 200)" bash -c install_venv >>"$LOG" 2>&1 \
    || { log "error: installing failed or timed out (see $LOG)"; exit 2; }
  PY=(.venv/bin/python)
  cuda_python "${PY[@]}" || { log "error: the installed torch sees no CUDA GPU (CPU wheel, or no driver)"; exit 2; }
fi
"${PY[@]}" -c 'import torch, alseg.cli, alseg.train; print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name(0))' >>"$LOG" 2>&1 || { log "error: alseg does not import (see $LOG)"; exit 2; }

# ---- 2. gpu_speed.py (budget <= 150 s) -----------------------------------------------------
b=$(budget 150 $([[ -n $DATA ]] && echo 60 || echo 0))
if (( b < 30 )); then
  log "skipping gpu_speed.py: only ${b}s left"
  failed=1
else
  log "gpu_speed.py --device cuda --json (timeout ${b}s)"
  rc=0
  timeout -k 10 "$b" "${PY[@]}" benchmarks/gpu_speed.py --device cuda --json >"$OUT/gpu-speed.json" 2>>"$LOG" || rc=$?
  log "gpu_speed.py exit $rc"
  (( rc == 0 )) || failed=1
fi

# ---- 3. paper-isic on ISIC 2017 (budget <= 330 s, then <= 20 s for its status) -------------
if [[ -n $DATA ]]; then
  b=$(budget 330 35)
  if (( b < 60 )); then
    log "skipping paper-isic: only ${b}s left"
    failed=1
  else
    log "alseg run --preset paper-isic --data $DATA --out $RUN_DIR (timeout ${b}s)"
    mkdir -p "$(dirname "$RUN_DIR")"
    time_cmd=()
    [[ -x /usr/bin/time ]] && time_cmd=(/usr/bin/time -v -o "$OUT/paper-isic.time")
    t0=$SECONDS
    rc=0
    ${time_cmd[@]+"${time_cmd[@]}"} timeout -k 10 "$b" "${PY[@]}" -m alseg run --preset paper-isic --data "$DATA" --device cuda \
      --cache-dir "$SCR/alseg" --out "$RUN_DIR" --json >"$OUT/paper-isic.json" 2>>"$LOG" || rc=$?
    echo "gpu.sh: wall_s=$(( SECONDS - t0 )) exit=$rc timeout_s=$b (exit 124: stopped by the timeout; the run dir is resumable)" \
      >>"$OUT/paper-isic.time"
    log "alseg run exit $rc after $(( SECONDS - t0 ))s"
    (( rc == 0 )) || failed=1
    b=$(budget 20 0)
    if [[ -f $RUN_DIR/run.db ]] && (( b >= 5 )); then
      timeout -k 5 "$b" "${PY[@]}" -m alseg status "$RUN_DIR" --json \
        >"$OUT/paper-isic-status.json" 2>>"$LOG" || log "alseg status failed"
    fi
  fi
fi

log "done in ${SECONDS}s (failed=$failed)"
[[ -f $OUT/gpu-speed.json ]] && cat "$OUT/gpu-speed.json"
[[ -f $OUT/paper-isic.time ]] && tail -n 3 "$OUT/paper-isic.time"
exit "$failed"
