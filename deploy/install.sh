#!/bin/sh
# Install (or upgrade) the pair on this host, as root. Idempotent: run it again after
# pulling a new version. README.md, "Install on a host", says what each step is for.
#
#   deploy/install.sh [--prefix DIR] [--unit-dir DIR] [--wheelhouse DIR]
#
#   --prefix      where the venv and the README go (default /opt/pair)
#   --unit-dir    where the units go (default /etc/systemd/system)
#   --wheelhouse  install the locked dependencies from this directory, offline
#                 (fill it elsewhere: pip download --no-deps --require-hashes
#                 -r deploy/requirements-runtime.lock -d DIR)
set -eu

prefix=/opt/pair
unit_dir=/etc/systemd/system
wheelhouse=
while [ $# -gt 0 ]; do
    case $1 in
    --prefix) prefix=$2; shift 2 ;;
    --unit-dir) unit_dir=$2; shift 2 ;;
    --wheelhouse) wheelhouse=$2; shift 2 ;;
    *) echo "install.sh: unknown argument $1 (see the top of this file)" >&2; exit 64 ;;
    esac
done

say() { echo "install.sh: $*"; }
die() { echo "install.sh: $*" >&2; exit "${2:-1}"; }

src=$(cd "$(dirname "$0")/.." && pwd)
[ "$(id -u)" = 0 ] || die "run as root (it creates the user pair and installs units)" 77
# The system's Python, not a pyenv or a venv: the units run it as user pair, under
# ProtectHome=yes, so it must live outside /root and /home.
python=/usr/bin/python3
[ -x "$python" ] || die "$python is missing: apt-get install python3 python3-venv" 69
"$python" -c 'import ensurepip, sys; assert sys.version_info >= (3, 11)' 2>/dev/null ||
    die "$python needs to be 3.11+ with venv: apt-get install python3-venv" 69

say "user and group pair (sysusers.d)"
install -D -m 0644 "$src/deploy/sysusers.d/pair.conf" /etc/sysusers.d/pair.conf
systemd-sysusers /etc/sysusers.d/pair.conf

venv=$prefix/venv
say "venv $venv from deploy/requirements-runtime.lock"
if [ -x "$venv/bin/python" ] && ! "$venv/bin/python" -c 'import sys; sys.exit(sys.version_info[:2] != tuple(map(int, sys.argv[1].split("."))))' \
    "$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"; then
    say "the system's Python changed: the venv is made anew"
    rm -rf "$venv"
fi
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
if [ -n "$wheelhouse" ]; then
    set -- --no-index --find-links "$wheelhouse"
else
    set --
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check --require-hashes --no-deps "$@" \
    -r "$src/deploy/requirements-runtime.lock"
# Built from this checkout with the locked setuptools: nothing is fetched.
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
tar -C "$src" --exclude=./.git --exclude=./.venv --exclude=./.pair -cf - . | tar -C "$build" -xf -
"$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps --no-build-isolation \
    --no-index --force-reinstall "$build"
install -m 0644 "$src/README.md" "$prefix/README.md"

say "units in $unit_dir"
for unit in "$src"/deploy/systemd/pair-*; do
    sed "s|/opt/pair/|$prefix/|g" "$unit" >"$unit_dir/.$(basename "$unit").new"
    mv "$unit_dir/.$(basename "$unit").new" "$unit_dir/$(basename "$unit")"
done

textfiles=/var/lib/prometheus/node-exporter
if [ -d "$textfiles" ] && [ ! -e "$textfiles/pair.prom" ]; then
    say "node_exporter's textfile collector reads the metrics through $textfiles/pair.prom"
    ln -s /var/lib/pair-metrics/pair.prom "$textfiles/pair.prom"
fi

if [ ! -d /run/systemd/system ]; then
    say "systemd is not running here: enable the units once it is (see README)"
    exit 0
fi
systemctl daemon-reload
systemctl enable --now pair-assistant.socket pair-gateway.socket pair-metrics.timer
# A running daemon takes the new code now; its socket holds callers meanwhile.
systemctl try-restart pair-assistant.service pair-gateway.service
say "done: $(systemctl is-active pair-assistant.socket pair-gateway.socket | tr '\n' ' ')"
say "try: $venv/bin/pairctl status"
