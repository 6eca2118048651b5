#!/usr/bin/env bash
# Builds the pod sandbox ("pause") image's only file: a static program that waits until told to
# stop. containerd runs one per pod to hold its namespaces. Usage: build-pause.sh OUT_DIR
set -euo pipefail
out=$1
work="$out/src"
mkdir -p "$work" "$out/bin"
cd "$work"
printf 'module localbuild/pause\ngo 1.24.0\n' > go.mod
cat > main.go <<'GO'
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	<-stop
}
GO
CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$out/bin/pause" .
