#!/usr/bin/env bash
# The GPU acceptance matrix in one command (the work is in scripts/gpu_check.py; --help lists the options).
#   bash scripts/gpu_check.sh            the acceptance schedule, one table at the end
#   bash scripts/gpu_check.sh --quick    a shorter schedule
#   bash scripts/gpu_check.sh --dry-run  print the commands only
# Exit codes: 0 all rows ok, 1 a row failed, 2 bad arguments, 77 no CUDA device (nothing checked).
# Uses the python on PATH (the README's install: an activated environment), or $PYTHON.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec "${PYTHON:-python}" "$root/scripts/gpu_check.py" "$@"
