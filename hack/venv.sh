#!/usr/bin/env bash
# Ensures the Python virtual environment (cached outside the checkout, keyed by the
# dependency list in pyproject.toml and the Python version) and installs this checkout
# into it in editable mode. Prints the venv path on stdout; progress goes to stderr.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${KRO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kafka-retry-operator}
py=${PYTHON:-python3}
key=$( { "$py" --version; sed -n '/^dependencies/,/^\[tool/p' "$root/pyproject.toml"; } | sha256sum | cut -c1-12)
venv="$cache/venv-$key"
if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.complete" ]; then
  echo "[venv] creating $venv" >&2
  rm -rf "$venv"
  "$py" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip setuptools wheel >&2
  "$venv/bin/pip" install -q -e "$root[dev]" >&2
  touch "$venv/.complete"
fi
# Point the editable install at this checkout (CI clones elsewhere on the same machine).
if ! "$venv/bin/python" -c "import kafka_retry, sys; sys.exit(0 if kafka_retry.__file__.startswith('$root/') else 1)" 2>/dev/null; then
  "$venv/bin/pip" install -q --no-deps --no-build-isolation -e "$root" >&2
fi
echo "$venv"
