#!/usr/bin/env bash
# Checks deploy/entrypoint.sh's role choice with a stand-in daemon that prints its arguments:
# ordinal 0 runs as the primary with the arguments unchanged, other ordinals add the follower
# flag file, and bad input fails with exit 2.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
printf '#!/bin/sh\necho "$@"\n' > "$work/fake-daemon"
chmod +x "$work/fake-daemon"
echo "--follow=dns:///modelstate-primary:50551" > "$work/follower.flags"

failures=0
expect() {  # expect NAME WANT_STATUS WANT_OUTPUT ENV...
  local name="$1" want_status="$2" want="$3"
  shift 3
  local got status=0
  got="$(env -i PATH=/usr/bin:/bin MODELSTATED="$work/fake-daemon" \
    MODELSTATE_FOLLOWER_FLAGS="$work/follower.flags" "$@" \
    sh "$here/entrypoint.sh" --flagfile=/etc/modelstate/modelstated.flags 2>/dev/null)" ||
    status=$?
  if [[ "$status" != "$want_status" || "$got" != "$want" ]]; then
    echo "FAIL $name: status $status (want $want_status), output '$got' (want '$want')"
    failures=$((failures + 1))
  else
    echo "ok   $name"
  fi
}
base="--flagfile=/etc/modelstate/modelstated.flags"
follow="$base --flagfile=$work/follower.flags"
expect "ordinal 0 is the primary" 0 "$base" POD_NAME=modelstate-0
expect "ordinal 1 follows" 0 "$follow" POD_NAME=modelstate-1
expect "ordinal 12 follows" 0 "$follow" POD_NAME=modelstate-12
expect "hostname when no POD_NAME" 0 "$follow" HOSTNAME=modelstate-2
expect "POD_NAME wins over HOSTNAME" 0 "$base" POD_NAME=modelstate-0 HOSTNAME=modelstate-3
expect "another primary ordinal" 0 "$base" POD_NAME=modelstate-2 MODELSTATE_PRIMARY_ORDINAL=2
expect "not a StatefulSet pod" 0 "$base" POD_NAME=modelstate-node-x7k2p
expect "an all-digit container id" 0 "$base" HOSTNAME=123456789012
expect "explicit follower role" 0 "$follow" POD_NAME=modelstate-node-x7k2p MODELSTATE_ROLE=follower
expect "explicit primary role" 0 "$base" POD_NAME=modelstate-4 MODELSTATE_ROLE=primary
expect "bad role" 2 "" POD_NAME=modelstate-1 MODELSTATE_ROLE=leader
expect "follower without flags" 2 "" POD_NAME=modelstate-1 \
  MODELSTATE_FOLLOWER_FLAGS="$work/absent.flags"
[[ "$failures" == 0 ]] || exit 1
echo "entrypoint: all cases pass"
