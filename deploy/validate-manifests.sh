#!/usr/bin/env bash
# Renders every kustomize overlay and validates every object offline against the Kubernetes
# JSON schemas, then proves the validator rejects a broken manifest. Needs kubectl (for
# kustomize) and Node.js with npm; installs the validator's npm packages from package-lock.json.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
(cd "$here/validate" && npm ci --no-audit --no-fund --silent)
for overlay in "$here"/k8s/overlays/*/; do
  name="$(basename "$overlay")"
  kubectl kustomize "$overlay" > "$out/$name.yaml"
  echo "rendered overlay $name: $(grep -c '^kind:' "$out/$name.yaml") objects"
done
node "$here/validate/validate.mjs" "$out"/*.yaml "$here"/k8s/examples/*.yaml
if node "$here/validate/validate.mjs" "$here/validate/testdata/broken.yaml" 2>/dev/null; then
  echo "validator accepted a broken manifest" >&2
  exit 1
fi
echo "broken manifest rejected, as it should be"
