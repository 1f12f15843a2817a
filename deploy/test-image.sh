#!/usr/bin/env bash
# Proves the image built by build-image.sh: starts modelstated inside it (buildah run, chroot
# isolation, sharing the host's network), checks health and pulls the demo model from outside
# with the host's modelstatectl, then stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE="${IMAGE:-modelstate:dev}"
CTL="${CTL:-build/client/modelstatectl}"
[ -x "$CTL" ] || cmake --build build --target modelstatectl
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port="$(free_port)"; health="$(free_port)"
container="$(buildah from "$IMAGE")"
log="$(mktemp)"
cleanup() {
  [ -n "${pid:-}" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  buildah rm "$container" >/dev/null 2>&1 || true
  rm -f "$log" /tmp/modelstate-image-demo.safetensors
}
trap cleanup EXIT
echo "image: $IMAGE"
echo "user and entrypoint: $(buildah inspect --type image \
  --format '{{.OCIv1.Config.User}} {{.OCIv1.Config.Entrypoint}}' "$IMAGE")"
buildah run --isolation chroot "$container" -- /usr/local/bin/modelstated \
  --listen="127.0.0.1:$port" --health_listen="127.0.0.1:$health" --demo_model=demo \
  --data_dir=/var/lib/modelstate >"$log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do
  "$CTL" --server="127.0.0.1:$health" --timeout=1s health >/dev/null 2>&1 && break
  sleep 0.2
done
echo "health (port $health): $("$CTL" --server="127.0.0.1:$health" health)"
echo "user inside: $(buildah run --isolation chroot "$container" -- id -u)"
"$CTL" --server="127.0.0.1:$port" models
"$CTL" --server="127.0.0.1:$port" fetch demo /tmp/modelstate-image-demo.safetensors
# SIGTERM to the daemon itself (chroot isolation shares the host's process table): it drains
# and exits 0, and buildah run returns with it.
daemon_pid="$(pgrep -f -- "--listen=127.0.0.1:$port" | grep -vx "$pid" | tail -1)"
kill -TERM "$daemon_pid"
wait "$pid"
echo "buildah run exited with $?"
pid=""
echo "daemon log:"
cat "$log"
echo "test-image: OK"
