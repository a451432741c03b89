#!/bin/sh
# Install (or upgrade) the pair on a host without dpkg, as root; on Debian and Ubuntu
# use the package (README, "Install on a host"). Idempotent: run it again after
# pulling a new version. README.md, "Install on a host", says what each step is for.
#
#   deploy/install.sh [--only gateway|assistant] [--prefix DIR] [--unit-dir DIR]
#                     [--wheelhouse DIR]
#
#   --only        upgrade (or downgrade) this daemon alone; the other keeps its release
#   --prefix      where the releases, pairctl and the README go (default /opt/pair)
#   --unit-dir    where the units go (default /etc/systemd/system)
#   --wheelhouse  install the locked dependencies from this directory, offline
#                 (fill it elsewhere: pip download --no-deps --require-hashes
#                 -r deploy/requirements-runtime.lock -d DIR)
#
# Each daemon runs PREFIX/SIDE/current, a link to a release directory of its own
# (a venv, VERSION-STAMP). A new release is built beside the running one and the link
# is switched in one rename, so a failed build leaves the old release serving; the
# release it replaced stays, for a downgrade, and older ones are removed.
set -eu

prefix=/opt/pair
unit_dir=/etc/systemd/system
wheelhouse=-
sides="gateway assistant"
while [ $# -gt 0 ]; do
    case $1 in
    --only)
        case ${2:-} in gateway | assistant) sides=$2 ;;
        *) echo "install.sh: --only takes gateway or assistant, not '${2:-}'" >&2; exit 64 ;;
        esac
        shift 2 ;;
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
case $(dpkg-query -W -f '${Status}' pair 2>/dev/null || true) in
"" | *not-installed) ;;
*config-files)
    die "the Debian package pair was removed but not purged: its purge would delete /var/lib/pair under this install. Reinstall the package (apt install), or take a backup and apt purge pair first" 78 ;;
*) die "the Debian package pair manages this host: upgrade with apt (README, \"Install on a host\")" 78 ;;
esac
# The system's Python, not a pyenv or a venv: the units run it as user pair, under
# ProtectHome=yes, so it must live outside /root and /home.
python=/usr/bin/python3
[ -x "$python" ] || die "$python is missing: apt-get install python3 python3-venv" 69
"$python" -c 'import ensurepip, sys; assert sys.version_info >= (3, 11)' 2>/dev/null ||
    die "$python needs to be 3.11+ with venv: apt-get install python3-venv" 69
# The interpreter by its versioned name: a release runs on the one it was built for.
python=$("$python" -c 'import sys; print("/usr/bin/python%d.%d" % sys.version_info[:2])')
say "user and group pair (sysusers.d), state directories (tmpfiles.d)"
install -D -m 0644 "$src/deploy/sysusers.d/pair.conf" /etc/sysusers.d/pair.conf
systemd-sysusers /etc/sysusers.d/pair.conf
install -D -m 0644 "$src/deploy/tmpfiles.d/pair.conf" /etc/tmpfiles.d/pair.conf
systemd-tmpfiles --create /etc/tmpfiles.d/pair.conf

version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$src/pair/__init__.py")
release=$version-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$prefix"
touch "$prefix/.install-sh"
# Every side is built before any is switched: a failure leaves all of them as they were.
for side in $sides; do
    say "$side: release $release in $prefix/$side"
    mkdir -p "$prefix/$side"
    # What an interrupted run left half built.
    rm -rf "$prefix/$side"/.[0-9]*
    "$src/deploy/make-venv" "$python" "$src" "$wheelhouse" "$prefix/$side/.$release" \
        "$prefix/$side/$release" || {
        for built in $sides; do rm -rf "$prefix/$built/.$release"; done
        [ "$wheelhouse" != - ] ||
            say "no package index here? fill a wheelhouse elsewhere and pass --wheelhouse DIR (see the top of this file)"
        die "$side: the release was not built; the one running stays" 69
    }
done
for side in $sides; do
    mv "$prefix/$side/.$release" "$prefix/$side/$release"
    ln -sfn "$release" "$prefix/$side/.current"
    mv -T "$prefix/$side/.current" "$prefix/$side/current"
done
install -D -m 0755 "$src/deploy/pairctl" "$prefix/bin/pairctl"
mkdir -p /usr/local/bin
ln -sfn "$prefix/bin/pairctl" /usr/local/bin/pairctl
install -m 0644 "$src/README.md" "$prefix/README.md"

say "units in $unit_dir"
units="pair-metrics.service pair-metrics.timer"
sockets=
for side in $sides; do
    units="$units pair-$side.service pair-$side.socket"
    sockets="$sockets pair-$side.socket"
done
for unit in $units; do
    sed "s|/opt/pair/|$prefix/|g" "$src/deploy/systemd/$unit" >"$unit_dir/.$unit.new"
    mv "$unit_dir/.$unit.new" "$unit_dir/$unit"
done

textfiles=/var/lib/prometheus/node-exporter
if [ -d "$textfiles" ] && [ ! -e "$textfiles/pair.prom" ] && [ ! -L "$textfiles/pair.prom" ]; then
    say "node_exporter's textfile collector reads the metrics through $textfiles/pair.prom"
    ln -s /var/lib/pair-metrics/pair.prom "$textfiles/pair.prom"
fi

if [ ! -d /run/systemd/system ]; then
    say "systemd is not running here: enable the units once it is (see README)"
    exit 0
fi
systemctl daemon-reload
systemctl enable --now $sockets pair-metrics.timer
# A running daemon takes the new release now; its socket holds callers meanwhile.
for side in $sides; do
    systemctl try-restart "pair-$side.service"
done
# Kept: each side's current release and the one before it (a downgrade is a link and a
# restart); any other goes once no process runs from it. Then the single venv of
# install.sh before 0.2.0, once no process runs from it and no unit names it.
running() { grep -qsF "$1/" /proc/[0-9]*/cmdline; }
for side in $sides; do
    keep=$(readlink "$prefix/$side/current")
    for old in $(ls -1t "$prefix/$side" | grep -vx -e current -e "$keep" | tail -n +2); do
        running "$prefix/$side/$old" || rm -rf "${prefix:?}/$side/$old"
    done
done
if [ -d "$prefix/venv" ] && ! running "$prefix/venv" && ! grep -qsrF "$prefix/venv/" "$unit_dir"; then
    rm -rf "$prefix/venv"
fi
say "done: $(systemctl is-active pair-assistant.socket pair-gateway.socket | tr '\n' ' ')"
say "try: pairctl status"
