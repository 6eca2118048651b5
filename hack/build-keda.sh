#!/usr/bin/env bash
# Builds KEDA's operator from the Go module proxy into the cache, for the test that runs the
# real KEDA against the ScaledObjects we generate. KEDA's go.mod has replace directives, which
# `go install module@version` refuses, so this builds inside a copy of the module's source.
# Usage: build-keda.sh OUT_DIR KEDA_VERSION
set -euo pipefail
out=$1 ver=$2
# KEDA's ~1.4 GB of dependencies stay in the project's cache, beside its other builds.
export GOMODCACHE
GOMODCACHE="$(dirname "$out")/go/mod"
dir=$(go mod download -json "github.com/kedacore/keda/v2@$ver" |
  sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
cp -r "$dir" "$out/src"
chmod -R u+w "$out/src"
mkdir -p "$out/bin"
cd "$out/src"
CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$out/bin/keda-operator" ./cmd/operator
