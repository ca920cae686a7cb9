#!/bin/bash
# Envoy with a graceful stop where nothing runs a preStop (docker compose): runs `envoy ARGS...`;
# on SIGTERM or SIGINT it first drains the front door with drain.sh (streams in flight finish),
# then stops Envoy. Exits with Envoy's status (0 after a drained stop).
# Kubernetes does not need it: the Envoy container's preStop runs drain.sh itself.
set -u
here=$(dirname "$0")
stopping=0
trap 'stopping=1' TERM INT

envoy "$@" &
pid=$!
while true; do
  wait "$pid"
  status=$?
  if (( stopping )); then
    break
  fi
  if ! kill -0 "$pid" 2>/dev/null; then
    exit "$status"  # Envoy ended on its own
  fi
done
trap '' TERM INT
bash "$here/drain.sh"
kill -TERM "$pid" 2>/dev/null
wait "$pid"
exit 0
