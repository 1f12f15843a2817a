#!/usr/bin/env bash
# Renders every kustomize overlay and validates every object offline against the Kubernetes
# JSON schemas and every follower's flags against modelstated's start-up rule, then proves the
# validator rejects a broken manifest and a follower without a policy of its own. Needs kubectl
# (for kustomize v5) and Node.js with npm, which tools/install-deps.sh installs; installs the
# validator's npm packages from package-lock.json. Exits 77 (ctest: skipped), saying why, when a
# tool is missing.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

skip() {
  echo "SKIPPED: $1; tools/install-deps.sh installs it" >&2
  exit 77
}
command -v node >/dev/null 2>&1 || skip "node (Node.js) is not installed"
command -v npm >/dev/null 2>&1 || skip "npm is not installed"
command -v kubectl >/dev/null 2>&1 || skip "kubectl is not installed"
[[ "$(kubectl version --client 2>/dev/null || true)" == *"Kustomize Version: v5."* ]] ||
  skip "$(command -v kubectl) has no kustomize v5 (kubectl 1.27 or newer needed)"

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
(cd "$here/validate" && npm ci --no-audit --no-fund --loglevel=error)
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
if node "$here/validate/validate.mjs" "$here/validate/testdata/follower-without-policy.yaml" 2>/dev/null; then
  echo "validator accepted a follower with upstream credentials and no --auth_policy" >&2
  exit 1
fi
echo "follower without a policy of its own rejected, as it should be"
