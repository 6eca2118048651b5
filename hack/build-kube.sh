#!/usr/bin/env bash
# Builds Kubernetes commands from the Go module proxy into the cache: by default kube-apiserver
# and kube-controller-manager; the local node (hack/node.py) asks for kubelet, kube-scheduler
# and kube-proxy. Usage: build-kube.sh OUT_DIR KUBE_VERSION [COMMAND...]
set -euo pipefail
out=$1 ver=$2
shift 2
commands=("$@")
[ ${#commands[@]} -gt 0 ] || commands=(kube-apiserver kube-controller-manager)
minor=${ver#v1.}; minor=${minor%%.*}; staging_ver="v0.${ver#v1.}"
work="$out/src"
mkdir -p "$work" "$out/bin"
cd "$work"
go mod download -json "k8s.io/kubernetes@$ver" >/dev/null
kdir=$(go env GOMODCACHE)/k8s.io/kubernetes@$ver
{
  echo "module localbuild/kube"
  echo "go 1.24.0"
  echo "require k8s.io/kubernetes $ver"
  echo "replace ("
  # Every staging module kubernetes replaces with ./staging/... gets its published v0.N.x.
  sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/src/.*#\1#p' "$kdir/go.mod" |
    while read -r m; do echo "  $m => $m $staging_ver"; done
  echo ")"
} > go.mod
{
  printf '//go:build tools\n\npackage tools\n\nimport (\n'
  for c in "${commands[@]}"; do printf '\t_ "k8s.io/kubernetes/cmd/%s"\n' "$c"; done
  printf ')\n'
} > tools.go
GOFLAGS=-mod=mod go mod tidy
# Stamp the version as kubernetes' own build does, so clients (kubectl, helm) see v1.N.x.
vpkg=k8s.io/component-base/version
ldflags="-s -w -X $vpkg.gitVersion=$ver -X $vpkg.gitMajor=1 -X $vpkg.gitMinor=$minor"
ldflags="$ldflags -X $vpkg.gitTreeState=clean -X $vpkg.buildDate=1970-01-01T00:00:00Z"
CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$out/bin/" \
  "${commands[@]/#/k8s.io/kubernetes/cmd/}"
