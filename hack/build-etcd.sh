#!/usr/bin/env bash
# Builds etcd from the Go module proxy into the cache: a tiny main calling etcdmain.Main.
# Usage: build-etcd.sh OUT_DIR ETCD_VERSION
set -euo pipefail
out=$1 ver=$2
work="$out/src"
mkdir -p "$work" "$out/bin"
cd "$work"
cat > go.mod <<GOMOD
module localbuild/etcd
go 1.24.0
require go.etcd.io/etcd/server/v3 $ver
GOMOD
cat > main.go <<'GO'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
GOFLAGS=-mod=mod go mod tidy
CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$out/bin/etcd" .
