#!/bin/sh
# Make sure the load generator (wrk) and the peers (etcd; Webdis, Redis and
# redis-benchmark) are installed, installing the Debian packages with apt-get
# when they are not.
set -e
missing=""
command -v wrk >/dev/null 2>&1 || missing="$missing wrk"
command -v etcd >/dev/null 2>&1 || missing="$missing etcd-server"
command -v taskset >/dev/null 2>&1 || missing="$missing util-linux"
command -v webdis >/dev/null 2>&1 || missing="$missing webdis"
command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"
command -v redis-benchmark >/dev/null 2>&1 || missing="$missing redis-tools"
if [ -z "$missing" ]; then
    exit 0
fi
echo "bench: installing$missing with apt-get" >&2
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
# The bench starts its own etcd, Redis and Webdis (loopback, free ports, temp
# data dirs, config files of its own: bench/peers.py).
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
# Under systemd the packages start system-wide Redis and Webdis services
# (loopback only, by Debian's config): the bench needs neither, so they are
# stopped and left disabled rather than running on 6379 and 7379 for good.
if [ -d /run/systemd/system ]; then
    for unit in redis-server.service webdis.service; do
        $SUDO systemctl disable --now "$unit" >/dev/null 2>&1 || true
    done
fi
