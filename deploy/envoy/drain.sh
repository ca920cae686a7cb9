#!/bin/bash
# Drain Envoy's front door gracefully, then return: Kubernetes runs this as the Envoy container's
# preStop (SIGTERM follows when it returns), compose through serve.sh on `docker compose stop`.
# SIGTERM alone stops Envoy at once, cutting every stream in flight.
#
# 1. POST /drain_listeners?graceful&inboundonly on the admin: the front_door listeners (marked
#    traffic_direction INBOUND in the template) answer HTTP/1.1 with `connection: close` and send
#    HTTP/2 GOAWAY (Envoy runs with --drain-strategy immediate), streams in flight go on; new
#    connections are still accepted until Envoy's --drain-time-s, then refused. The metrics
#    listener (readiness probe, scrapes) is not drained.
# 2. DRAIN_MIN_S: time for the endpoint removal to reach every client and load balancer.
# 3. Then wait until no request is active on the front door, at most DRAIN_MAX_S more.
#
# Only bash (its /dev/tcp) and sleep: the official Envoy image has no curl or wget.
# Settings (environment): ENVOY_ADMIN_PORT (9901, the template's default), DRAIN_MIN_S (5), DRAIN_MAX_S (25).
set -u
admin_port=${ENVOY_ADMIN_PORT:-9901}
min_s=${DRAIN_MIN_S:-5}
max_s=${DRAIN_MAX_S:-25}

# admin METHOD PATH: the admin's answer (status line, headers, body) on stdout.
admin() {
  local reply
  exec 3<>"/dev/tcp/127.0.0.1/$admin_port" || return 1
  printf '%s %s HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n' "$1" "$2" >&3
  reply=$(cat <&3 2>/dev/null || true)
  exec 3<&-
  printf '%s\n' "$reply"
}

# The number of requests in flight on the front door (empty when the admin does not answer).
active_requests() {
  local line
  while IFS= read -r line; do
    line=${line%$'\r'}
    if [[ $line =~ ^http\.front_door\.downstream_rq_active:\ ([0-9]+)$ ]]; then
      echo "${BASH_REMATCH[1]}"
      return
    fi
  done < <(admin GET '/stats?filter=^http\.front_door\.downstream_rq_active$')
}

started=$SECONDS
reply=$(admin POST '/drain_listeners?graceful&inboundonly')
if [[ $reply != "HTTP/1.1 200"* ]]; then
  echo "drain.sh: the admin on 127.0.0.1:$admin_port did not drain the listeners: ${reply:-no answer}" >&2
  exit 1
fi
echo "drain.sh: draining the front door (admin 127.0.0.1:$admin_port)"
sleep "$min_s"
while (( SECONDS - started < min_s + max_s )); do
  active=$(active_requests)
  if [[ -z $active || $active == 0 ]]; then
    echo "drain.sh: nothing in flight after $((SECONDS - started)) s"
    exit 0
  fi
  sleep 0.5
done
echo "drain.sh: ${active:-?} requests still in flight after $((SECONDS - started)) s; stopping anyway"
exit 0
