#!/usr/bin/env bash
# Installs every Debian package that building, running and testing modelstate needs.
# Idempotent: safe to run again; apt-get skips what is already installed.
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
  libgtest-dev libgmock-dev libbenchmark-dev
  # Test oracles: real PyTorch 1.13 and numpy, run with Debian's own interpreter.
  python3 python3-numpy python3-torch
  # Benchmark contenders: nginx serving the same weights, fetched with libcurl.
  nginx-light libcurl4-openssl-dev
  # Used by the TLS tests to mint throwaway certificates.
  openssl
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  $SUDO apt-get update
  $SUDO apt-get install -y --no-install-recommends "${missing[@]}"
fi
