#!/usr/bin/env bash
# The kind path, for people with Docker: a local cluster running the real image and chart.
#
#   1. create a kind cluster (reused if it exists),
#   2. build the image and load it into the cluster's nodes,
#   3. install a single-node Kafka (hack/kind/kafka.yaml, KRaft, official apache/kafka image),
#   4. install the chart from charts/kafka-retry-operator with that image,
#   5. apply examples/retrypipeline-http.yaml, pointed at the in-cluster Kafka, and wait
#      until the pipeline is Ready.
#
# Needs docker, kind, kubectl and helm on PATH. Settings (environment variables):
#   KIND_CLUSTER  cluster name                      (default: kafka-retry)
#   IMAGE         image name:tag to build and load  (default: kafka-retry-operator:dev)
#   NAMESPACE     namespace of the operator         (default: kafka-retry-system)
#   DEMO_NAMESPACE namespace of the example pipeline (default: shop)
#   EXAMPLE       pipeline manifest to apply        (default: examples/retrypipeline-http.yaml)
#   HELM          helm binary                       (default: helm)
# Tear down with: kind delete cluster --name kafka-retry
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cluster=${KIND_CLUSTER:-kafka-retry}
image=${IMAGE:-kafka-retry-operator:dev}
namespace=${NAMESPACE:-kafka-retry-system}
demo_namespace=${DEMO_NAMESPACE:-shop}
example=${EXAMPLE:-$root/examples/retrypipeline-http.yaml}
helm=${HELM:-helm}
bootstrap=kafka.kafka.svc.cluster.local:9092
context=kind-$cluster

say() { printf '\n[kind-up] %s\n' "$*" >&2; }
die() { printf '[kind-up] ERROR: %s\n' "$*" >&2; exit 1; }

for tool in docker kind kubectl "$helm"; do
  command -v "$tool" >/dev/null || die "$tool not found on PATH"
done
[ -f "$example" ] || die "example pipeline $example not found"

say "kind cluster $cluster"
if ! kind get clusters | grep -qx "$cluster"; then
  kind create cluster --name "$cluster" --wait 120s
fi
kubectl() { command kubectl --context "$context" "$@"; }

say "build and load image $image"
docker build --tag "$image" "$root"
kind load docker-image "$image" --name "$cluster"

say "single-node Kafka at $bootstrap"
kubectl apply -f "$root/hack/kind/kafka.yaml"
kubectl -n kafka rollout status deployment/kafka --timeout=300s

say "chart into namespace $namespace"
"$helm" upgrade --install kafka-retry-operator "$root/charts/kafka-retry-operator" \
  --kube-context "$context" --namespace "$namespace" --create-namespace \
  --set image.repository="${image%:*}" --set image.tag="${image##*:}" \
  --set image.pullPolicy=Never \
  --wait --timeout 5m

say "example pipeline $(basename "$example") in namespace $demo_namespace, Kafka at $bootstrap"
# The demo Kafka is PLAINTEXT: point the example at it and drop its credentials Secret.
manifest=$(mktemp)
trap 'rm -f "$manifest"' EXIT
kubectl patch --local --type merge --output yaml --filename "$example" \
  --patch "{\"spec\": {\"kafka\": {\"bootstrapServers\": \"$bootstrap\", \"secretRef\": null}}}" \
  >"$manifest"
# The service's live topic exists before its pipeline (the operator creates only retry/DLQ topics).
source_topic=$(kubectl patch --local --type merge --filename "$manifest" --patch '{}' \
  --output 'jsonpath={.spec.source.topic}')
kubectl -n kafka exec deployment/kafka -- /opt/kafka/bin/kafka-topics.sh \
  --bootstrap-server localhost:9092 --create --if-not-exists --topic "$source_topic" --partitions 3
kubectl create namespace "$demo_namespace" --dry-run=client --output yaml | kubectl apply -f -
kubectl apply --namespace "$demo_namespace" -f "$manifest"
if ! kubectl wait --namespace "$demo_namespace" --for=condition=Ready --timeout=300s -f "$manifest"; then
  kubectl describe --namespace "$demo_namespace" -f "$manifest" >&2
  kubectl -n "$namespace" logs deployment/kafka-retry-operator --tail=50 >&2
  die "the example pipeline did not become Ready"
fi

say "done"
kubectl get retrypipelines --all-namespaces
cat >&2 <<EOF

Next:
  kubectl --context $context get retrypipelines,deployments -A
  kubectl --context $context -n $namespace logs deployment/kafka-retry-operator
  kind delete cluster --name $cluster     # when finished
EOF
