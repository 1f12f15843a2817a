#!/bin/sh
# The image's entrypoint: picks a StatefulSet pod's role from its ordinal, so every pod runs the
# same spec with no per-pod configuration. The pod whose ordinal is MODELSTATE_PRIMARY_ORDINAL
# (0 by default) is the primary, the only writer; every other ordinal is a follower of it: it
# also reads the flag file MODELSTATE_FOLLOWER_FLAGS, which holds --follow=<primary's Service>
# and the credentials for it. Outside a StatefulSet (no ordinal in the name), or with
# MODELSTATE_ROLE=primary|follower set, the role is taken as given. All arguments pass through.
set -eu

daemon="${MODELSTATED:-/usr/local/bin/modelstated}"
follower_flags="${MODELSTATE_FOLLOWER_FLAGS:-/etc/modelstate/follower.flags}"
pod="${POD_NAME:-${HOSTNAME:-}}"
ordinal="${pod##*-}"

role="${MODELSTATE_ROLE:-}"
if [ -z "$role" ]; then
  case "$pod:$ordinal" in
    *-*:*[0-9]) ;;
    *) ordinal="" ;;  # no NAME-ORDINAL form (a container id, say)
  esac
  case "$ordinal" in
    '' | *[!0-9]*) role=primary ;;  # not a StatefulSet pod: a standalone daemon
    *)
      if [ "$ordinal" -eq "${MODELSTATE_PRIMARY_ORDINAL:-0}" ]; then
        role=primary
      else
        role=follower
      fi
      ;;
  esac
fi

case "$role" in
  primary)
    echo "modelstate-entrypoint: pod ${pod:-?} is the primary" >&2
    exec "$daemon" "$@"
    ;;
  follower)
    if [ ! -r "$follower_flags" ]; then
      echo "modelstate-entrypoint: pod ${pod:-?} is a follower but $follower_flags is missing" >&2
      exit 2
    fi
    echo "modelstate-entrypoint: pod ${pod:-?} follows (flags from $follower_flags)" >&2
    exec "$daemon" "$@" "--flagfile=$follower_flags"
    ;;
  *)
    echo "modelstate-entrypoint: MODELSTATE_ROLE must be primary or follower, not '$role'" >&2
    exit 2
    ;;
esac
