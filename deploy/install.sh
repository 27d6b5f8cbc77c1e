#!/usr/bin/env bash
# The one way cf_ray gets installed: `make install` (CPU + test tools, in .venv), deploy/Dockerfile (GPU image) and
# tests/test_deploy.py (a fresh venv; a GPU dry run) all run this script.
#
#   deploy/install.sh [--cpu | --gpu] [--python PY | --venv DIR [--system-site-packages]] [--editable] [--test]
#                     [--dry-run]
#
#   --cpu      cf_ray[cpu]: faiss-cpu (default)
#   --gpu      cf_ray[gpu]: faiss-gpu, with deploy/constraints-gpu.txt (torch on the same CUDA 12 runtime as faiss-gpu,
#              Ray kept at the pinned version)
#   --python   the interpreter to install into (default: $PYTHON or python3)
#   --venv     create this virtual environment if missing and install into it
#   --editable pip install -e (a development checkout)
#   --test     add the test extra (pytest, moto, ruff)
#   --dry-run  resolve with pip against the package index and check the resolution (one faiss build, one CUDA major,
#              the pinned Ray), install nothing. Slow where the index serves no separate wheel metadata (PEP 658):
#              pip then downloads every wheel, ~3 GB for --gpu
#   --report F with --dry-run: keep pip's JSON report of the resolution in F
# After a real install, deploy/check_install.py imports everything and, where a GPU is visible, runs faiss and torch
# on it. Exits non-zero on any problem.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
flavour=cpu
py=${PYTHON:-python3}
venv=""
venv_args=()
editable=0
test_extra=0
dry_run=0
keep_report=""

while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) flavour=cpu ;;
    --gpu) flavour=gpu ;;
    --python) py=$2; shift ;;
    --venv) venv=$2; shift ;;
    --system-site-packages) venv_args+=(--system-site-packages) ;;
    --editable) editable=1 ;;
    --test) test_extra=1 ;;
    --dry-run) dry_run=1 ;;
    --report) keep_report=$2; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [ -n "$venv" ]; then
  if [ ! -x "$venv/bin/python" ]; then
    "$py" -m venv "${venv_args[@]}" "$venv"
  fi
  py="$venv/bin/python"
fi
command -v "$py" >/dev/null || { echo "install.sh: no Python interpreter '$py' (use --python)" >&2; exit 2; }

extras=$flavour
[ "$test_extra" = 1 ] && extras="$extras,test"
args=(-m pip install --quiet --disable-pip-version-check)
[ "$flavour" = gpu ] && args+=(--constraint "$ROOT/deploy/constraints-gpu.txt")
ray_pin=$(sed -n 's/^ray==\([0-9.]*\).*/\1/p' "$ROOT/deploy/constraints-gpu.txt")

if [ "$dry_run" = 1 ]; then
  report=$(mktemp "${TMPDIR:-/tmp}/cf_ray_install.XXXXXX.json")
  trap 'rm -f "$report"' EXIT
  "$py" "${args[@]}" --dry-run --ignore-installed --report "$report" "$ROOT[$extras]"
  check=(--flavour "$flavour" --report "$report")
  [ "$flavour" = gpu ] && check+=(--ray-version "$ray_pin")
  [ -n "$keep_report" ] && cp "$report" "$keep_report"
  "$py" "$ROOT/deploy/check_install.py" "${check[@]}"
  exit 0
fi

if [ "$editable" = 1 ]; then
  "$py" "${args[@]}" -e "$ROOT[$extras]"
else
  "$py" "${args[@]}" "$ROOT[$extras]"
fi
check=(--flavour "$flavour")
[ "$flavour" = gpu ] && check+=(--ray-version "$ray_pin")
"$py" "$ROOT/deploy/check_install.py" "${check[@]}"
