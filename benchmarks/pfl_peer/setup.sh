#!/usr/bin/env bash
# Create the environment of the pfl peer (Apple's pfl) for the privacy-utility benchmark.
#
#   benchmarks/pfl_peer/setup.sh [VENV_DIR]      (default: .venv-pfl in the repository root)
#
# pfl gets its own environment so that its dependencies (dp-accounting, prv-accountant, ...)
# never touch pollinate's. torch is installed first, pinned to the same CPU wheel as
# pollinate's, so that pfl's torch range is already satisfied and pip never pulls a CUDA build.
# Idempotent: a marker file records the requirements; a complete environment is left alone.
# Set PYTHON to choose the interpreter (default python3.11).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENV="${1:-$ROOT/.venv-pfl}"
PYTHON="${PYTHON:-python3.11}"
REQUIREMENTS="$HERE/requirements.txt"
STAMP="$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)"
MARKER="$VENV/.pollinate-pfl"

if [[ -f "$MARKER" && "$(cat "$MARKER")" == "$STAMP" && -x "$VENV/bin/python" ]]; then
    echo "pfl-peer setup: $VENV is complete; nothing to do"
    exit 0
fi

start=$(date +%s)
if [[ ! -x "$VENV/bin/python" ]]; then
    echo "pfl-peer setup: creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
else
    echo "pfl-peer setup: reusing the incomplete environment $VENV"
fi
rm -f "$MARKER"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

TORCH_PIN="$(grep -E '^torch==' "$REQUIREMENTS")"
echo "pfl-peer setup: installing $TORCH_PIN (CPU)"
"${PIP[@]}" "$TORCH_PIN"

echo "pfl-peer setup: installing $REQUIREMENTS"
"${PIP[@]}" -r "$REQUIREMENTS"

echo "pfl-peer setup: checking the imports"
check_log="$VENV/.import-check.log"
if ! "$VENV/bin/python" -I - >"$check_log" 2>&1 <<'PYEOF'
import pfl.version, torch
from pfl.model.pytorch import PyTorchModel  # noqa: F401
from pfl.privacy import CentrallyAppliedPrivacyMechanism, GaussianMechanism  # noqa: F401
assert not torch.version.cuda, f"a CUDA torch was installed ({torch.__version__})"
print(f"pfl-peer setup: torch {torch.__version__}, pfl {pfl.version.__version__}")
PYEOF
then
    cat "$check_log" >&2
    echo "pfl-peer setup: the new environment does not import; see above" >&2
    exit 1
fi
grep '^pfl-peer setup:' "$check_log"

echo "$STAMP" > "$MARKER"
size=$(du -sh "$VENV" | cut -f1)
echo "pfl-peer setup: done in $(( $(date +%s) - start )) s; $VENV is $size"
