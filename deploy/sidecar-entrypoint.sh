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

# Steps 1-3 are `sealedsum platform client-config` (sealedsum/testbed.py): it refuses a
# base config that has a [trust] table already, and writes the client config atomically.
sealedsum platform client-config --config "$CONFIG" --state "$STATE" --out "$CLIENT_CONFIG"

exec sealedsum sidecar --config "$CONFIG" --state "$STATE" "$@"
