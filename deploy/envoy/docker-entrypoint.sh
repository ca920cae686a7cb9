#!/bin/sh
# Container entrypoint for the official envoyproxy/envoy image (it has sh and awk):
# renders the template deploy/envoy/envoy.yaml from the environment, then execs envoy.
#
#   ENVOY_TEMPLATE    the template (default /etc/envoy/envoy.yaml, i.e. deploy/envoy mounted at /etc/envoy)
#   ENVOY_CONFIG_OUT  where the rendered config goes (default /tmp/envoy.yaml; with a read-only
#                     root filesystem mount an emptyDir/tmpfs at /tmp)
#   ENVOY_*           the template's variables (see the "# @var" lines at its top)
#   arguments         passed to envoy after `-c ENVOY_CONFIG_OUT`, e.g. --log-level info
#
# Use it as the container's entrypoint: compose `entrypoint: ["/bin/sh", "/etc/envoy/docker-entrypoint.sh"]`
# (which also drops the image's CMD), Kubernetes `command: [...]` with envoy flags in `args`.
#
# Same rules as deploy/envoy/render.py (a test checks both give identical output):
# declared variables only; comment lines copied unchanged; "# @if NAME" ... "# @endif"
# blocks kept only when NAME is on/true/yes/1. Values are taken literally (no eval).
set -eu

template="${ENVOY_TEMPLATE:-/etc/envoy/envoy.yaml}"
out="${ENVOY_CONFIG_OUT:-/tmp/envoy.yaml}"

awk '
function fail(message) { print "docker-entrypoint.sh: " message | "cat 1>&2"; failed = 1; exit 2 }
function is_on(v) { v = tolower(v); gsub(/^[ \t]+|[ \t]+$/, "", v); return v == "on" || v == "true" || v == "yes" || v == "1" }
/^# @var [A-Za-z_][A-Za-z0-9_]*=[^ ]* \| / {
  spec = substr($0, 8)
  eq = index(spec, "=")
  name = substr(spec, 1, eq - 1)
  rest = substr(spec, eq + 1)
  default_value = substr(rest, 1, index(rest, " ") - 1)
  declared[name] = 1
  value[name] = (name in ENVIRON) ? ENVIRON[name] : default_value
  if (value[name] ~ /[\r\n]/) fail(name " must be a single line")
  print
  next
}
/^# @if [A-Za-z_][A-Za-z0-9_]*[ \t]*$/ {
  if (!($3 in declared)) fail("line " NR ": @if on undeclared variable " $3)
  skipping = !is_on(value[$3])
  print
  next
}
/^# @endif[ \t]*$/ { skipping = 0; print; next }
skipping { next }
/^[ \t]*#/ { print; next }
{
  line = $0
  result = ""
  while (match(line, /\$\{[A-Za-z_][A-Za-z0-9_]*\}/)) {
    name = substr(line, RSTART + 2, RLENGTH - 3)
    if (!(name in declared)) fail("line " NR ": undeclared variable " name)
    result = result substr(line, 1, RSTART - 1) value[name]
    line = substr(line, RSTART + RLENGTH)
  }
  print result line
}
END { if (failed) exit 2 }
' "$template" >"$out"

exec envoy -c "$out" "$@"
