#!/bin/sh
# Make sure the load generator (wrk) and the peer (etcd) are installed,
# installing the Debian packages with apt-get when they are not.
set -e
missing=""
command -v wrk >/dev/null 2>&1 || missing="$missing wrk"
command -v etcd >/dev/null 2>&1 || missing="$missing etcd-server"
command -v taskset >/dev/null 2>&1 || missing="$missing util-linux"
if [ -z "$missing" ]; then
    exit 0
fi
echo "bench: installing$missing with apt-get" >&2
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
# The bench starts its own etcd (loopback, free ports, temp data dir).
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
