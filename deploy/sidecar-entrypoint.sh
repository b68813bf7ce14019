#!/bin/sh
# Entrypoint of the `sidecar` service in docker-compose.yml.
#
#  1. Create the emulated platform key in the state volume, once (`sealedsum platform
#     init`); on later starts the existing key is kept.
#  2. Compute the enclave measurement for the installed code and the base config's
#     policy (`sealedsum measure`).
#  3. Write a client config to the shared volume: the base config plus a [trust] table
#     holding the platform public key and that measurement. The producer and consumer
#     services wait for this file and run with it.
#  4. exec `sealedsum sidecar`, so that the sidecar itself receives SIGTERM on `docker stop`.
#
# TRUST ON FIRST USE, FOR A DEMO DEPLOYMENT ONLY. The clients here take the platform key
# and the measurement from a file that the machine they are checking wrote, so the
# attestation they perform proves nothing against whoever controls that machine or the
# shared volume. Real clients pin the platform key out of band (obtained once, from the
# hardware vendor or from the operator over a trusted channel) and compute or review the
# allowed measurements themselves (`sealedsum measure` on a reviewed checkout of the same
# code, the same Python and library versions, and the same policy); they never take
# either from the sidecar's host.
#
# Every path can be overridden from the environment (the unit tests do).
set -eu

CONFIG="${SEALEDSUM_BASE_CONFIG:-/etc/sealedsum/sealedsum.toml}"
STATE="${SEALEDSUM_STATE:-/state}"
CLIENT_CONFIG="${SEALEDSUM_CLIENT_CONFIG:-/shared/client.toml}"

log() { printf 'sidecar-entrypoint: %s\n' "$*" >&2; }

if [ ! -r "$CONFIG" ]; then
  log "base config $CONFIG is missing or unreadable"
  exit 2
fi
if grep -q '^[[:space:]]*\[trust\]' "$CONFIG"; then
  log "base config $CONFIG already has a [trust] table; remove it (this script adds one)"
  exit 2
fi

# A client config left over from an earlier run may name an old measurement: remove it
# first, so that clients starting now wait for the new one.
rm -f "$CLIENT_CONFIG"

if [ ! -f "$STATE/platform.key" ]; then
  log "no platform key in $STATE: creating one (emulated TEE root of trust)"
  sealedsum platform init --state "$STATE" >/dev/null
fi
platform_key="$(sealedsum platform show --state "$STATE")"
measurement="$(sealedsum measure --config "$CONFIG")"
log "platform key $platform_key"
log "measurement  $measurement"

# Write to a temporary file in the same directory, check it, then rename it into place,
# so that a client never reads a half-written config.
mkdir -p "$(dirname "$CLIENT_CONFIG")"
tmp="$(mktemp "$CLIENT_CONFIG.XXXXXX")"
trap 'rm -f "$tmp"' EXIT
{
  cat "$CONFIG"
  printf '\n'
  printf '# Added by sidecar-entrypoint.sh: trust on first use, for a demo deployment only.\n'
  printf '# Real clients pin the platform key out of band and never take it from the sidecar.\n'
  printf '[trust]\n'
  printf 'platform_key = "%s"\n' "$platform_key"
  printf 'measurements = ["%s"]\n' "$measurement"
} >"$tmp"
# The client config must load, and must name the measurement computed above.
check="$(sealedsum measure --config "$tmp")"
if [ "$check" != "$measurement" ]; then
  log "the client config's measurement $check differs from $measurement"
  exit 1
fi
chmod 0644 "$tmp"   # it holds only public values
mv -f "$tmp" "$CLIENT_CONFIG"
trap - EXIT
log "wrote $CLIENT_CONFIG"

exec sealedsum sidecar --config "$CONFIG" --state "$STATE" "$@"
