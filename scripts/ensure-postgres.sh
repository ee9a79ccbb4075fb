#!/bin/sh
# Make sure PostgreSQL server binaries (initdb, pg_ctl, postgres) are present,
# installing them with apt-get when they are not. Prints the bin directory.
set -e
find_bindir() {
    if command -v pg_config >/dev/null 2>&1; then
        d=$(pg_config --bindir 2>/dev/null || true)
        if [ -x "$d/initdb" ]; then echo "$d"; return 0; fi
    fi
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [ -x "$d/initdb" ]; then echo "$d"; return 0; fi
    done
    return 1
}
if bindir=$(find_bindir); then
    echo "postgres binaries: $bindir"
    exit 0
fi
echo "PostgreSQL server binaries not found; installing with apt-get" >&2
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
bindir=$(find_bindir)
echo "postgres binaries: $bindir"
