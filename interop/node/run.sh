#!/usr/bin/env bash
# Runs interop/node/close.js (amqplib) against a running broker.
# Usage: interop/node/run.sh HOST PORT burst|publish
# Installs Node.js (Debian) and amqplib (npm, into a cache beside the target dir) when
# missing.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
AMQPLIB_VERSION=0.10.9
CACHE=${HOLDFAST_NODE_CACHE:-${TMPDIR:-/tmp}/holdfast-node-amqplib-$AMQPLIB_VERSION}
export DEBIAN_FRONTEND=noninteractive

# Several tests may start at once: install under one lock.
exec 9>"${TMPDIR:-/tmp}/holdfast-node.lock"
flock 9
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    echo "run.sh: installing Node.js" >&2
    apt-get -o DPkg::Lock::Timeout=300 update -qq
    apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
if [ ! -f "$CACHE/node_modules/amqplib/package.json" ]; then
    echo "run.sh: installing amqplib $AMQPLIB_VERSION into $CACHE" >&2
    mkdir -p "$CACHE"
    npm install --prefix "$CACHE" --no-audit --no-fund --silent "amqplib@$AMQPLIB_VERSION" >&2
fi
flock -u 9
exec 9>&-

NODE_PATH="$CACHE/node_modules" exec timeout 60 node "$HERE/close.js" "$@"
