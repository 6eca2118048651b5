#!/usr/bin/env bash
# Ensures this checkout's Python virtual environment, cached outside the checkout and keyed by
# the dependency list in pyproject.toml, the Python version and the checkout's path (the project
# is installed editable, so two checkouts must not share one). Prints the venv path on stdout;
# progress goes to stderr.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${KRO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kafka-retry-operator}
py=${PYTHON:-python3}
key=$( { "$py" --version; echo "$root"; sed -n '/^dependencies/,/^\[tool/p' "$root/pyproject.toml"; } | sha256sum | cut -c1-12)
venv="$cache/venv-$key"
mkdir -p "$cache"
exec 9>"$cache/venv.lock"
flock 9  # concurrent callers wait for one creator
if [ ! -f "$venv/.complete" ]; then
  echo "[venv] creating $venv" >&2
  rm -rf "$venv"
  "$py" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip setuptools wheel >&2
  "$venv/bin/pip" install -q -e "${root}[dev]" >&2
  touch "$venv/.complete"
fi
[ -f "$venv/.checkout" ] || echo "$root" >"$venv/.checkout"
# Prune what no checkout can use any more: venvs of checkouts that are gone (CI clones) and
# this checkout's venvs of earlier dependency lists. Venvs that do not say whose they are stay.
for other in "$cache"/venv-*; do
  if [ "$other" = "$venv" ] || [ ! -f "$other/.checkout" ]; then
    continue
  fi
  owner=$(cat "$other/.checkout")
  if [ "$owner" = "$root" ] || [ ! -f "$owner/pyproject.toml" ]; then
    echo "[venv] removing $other (of $owner: gone, or its dependencies changed)" >&2
    rm -rf "$other"
  fi
done
echo "$venv"
