#!/usr/bin/env bash
# Compiles and runs the Java programs made from the seed article's snippets against a running
# Holdfast broker, with the RabbitMQ Java client from Debian (librabbitmq-client-java).
#
# Usage: interop/java/run.sh HOST PORT                  all the one-shot programs
#        interop/java/run.sh HOST PORT PROGRAM [ARGS...]  one program, with extra arguments
#                                                        (e.g. SeedDurableRestart before|after SUFFIX)
# Exits non-zero if any program fails. Installs the client (and a JDK) when missing.
set -euo pipefail

HOST=${1:?usage: run.sh HOST PORT [PROGRAM [ARGS...]]}
PORT=${2:?usage: run.sh HOST PORT [PROGRAM [ARGS...]]}
shift 2
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export DEBIAN_FRONTEND=noninteractive

apt_updated=0
apt_install() {
    if [ "$apt_updated" = 0 ]; then
        apt-get -o DPkg::Lock::Timeout=300 update -qq
        apt_updated=1
    fi
    apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "$@" >/dev/null
}

# Several runs may start at once (the tests run in parallel): install under one lock.
exec 9>"${TMPDIR:-/tmp}/holdfast-java-seeds.lock"
flock 9
if ! command -v javac >/dev/null 2>&1 || ! command -v java >/dev/null 2>&1; then
    echo "run.sh: installing a JDK" >&2
    apt_install openjdk-17-jdk-headless
fi
if ! dpkg -s librabbitmq-client-java >/dev/null 2>&1; then
    echo "run.sh: installing librabbitmq-client-java" >&2
    apt_install librabbitmq-client-java
fi
flock -u 9
exec 9>&-

# The classpath: the jars the client package installed in /usr/share/java, plus the
# slf4j API it depends on (and the no-op binding when present, to keep stderr quiet).
jars_of() {
    dpkg -L "$1" 2>/dev/null | grep -E '^/usr/share/java/[^/]+\.jar$' || true
}
pick() { # first existing file among the arguments
    for f in "$@"; do
        if [ -f "$f" ]; then
            echo "$f"
            return 0
        fi
    done
    return 1
}
client_jars=$(jars_of librabbitmq-client-java)
amqp_jar=$(pick /usr/share/java/amqp-client.jar $client_jars) || {
    echo "run.sh: no amqp-client jar found in librabbitmq-client-java" >&2
    exit 1
}
slf4j_jars=$(jars_of libslf4j-java)
slf4j_api=$(pick /usr/share/java/slf4j-api.jar $(echo "$slf4j_jars" | grep slf4j-api || true)) || {
    echo "run.sh: no slf4j-api jar found (libslf4j-java)" >&2
    exit 1
}
classpath="$amqp_jar:$slf4j_api"
if slf4j_nop=$(pick /usr/share/java/slf4j-nop.jar $(echo "$slf4j_jars" | grep slf4j-nop || true)); then
    classpath="$classpath:$slf4j_nop"
fi
echo "run.sh: classpath $classpath"

out=$(mktemp -d "${TMPDIR:-/tmp}/holdfast-java-seeds.XXXXXX")
trap 'rm -rf "$out"' EXIT
javac -encoding UTF-8 -d "$out" -cp "$classpath" "$HERE"/*.java

programs=(SeedTransactions SeedConfirms SeedDurable SeedManualAck SeedNackRequeue SeedReject)
extra=()
if [ $# -gt 0 ]; then
    programs=("$1")
    shift
    extra=("$@")
fi
passed=0
failed=0
failures=()
for program in "${programs[@]}"; do
    echo "== $program $HOST $PORT ${extra[*]:-}"
    status=0
    timeout 120 java -Dfile.encoding=UTF-8 -cp "$out:$classpath" "$program" "$HOST" "$PORT" ${extra[@]+"${extra[@]}"} || status=$?
    if [ "$status" = 0 ]; then
        passed=$((passed + 1))
    else
        echo "== $program FAILED (exit status $status)"
        failed=$((failed + 1))
        failures+=("$program")
    fi
done

echo "java seeds: $passed passed, $failed failed"
if [ "$failed" != 0 ]; then
    echo "failed: ${failures[*]}"
    exit 1
fi
