#!/bin/sh
# PID 1 of fresh PID, mount, UTS, IPC, network and cgroup namespaces (see machine.py):
# builds a root that shares nothing writable with the host, then becomes systemd.
#   boot.sh MOUNTPOINT TARGET CONSOLE_FILE CHECKOUT
#
# The root is an overlay of the host's root file system whose upper layer is a tmpfs
# of this namespace: the install writes /etc, /opt, /var/lib and the journal there,
# and all of it dies with PID 1. /run, /tmp and /var/tmp are private tmpfs mounts;
# /sys is read-only but for the cgroup trees systemd manages.
set -eu
base=$1
target=$2
console=$3
checkout=$4

mount -t tmpfs -o mode=0700 pair-systemd-test "$base"
mkdir "$base/upper" "$base/work" "$base/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$base/upper,workdir=$base/work" "$base/root"
root=$base/root
mount -t proc proc "$root/proc"
mount --rbind /sys "$root/sys"
mount -o remount,bind,ro "$root/sys"
mount --bind "$root/proc/sys" "$root/proc/sys"
mount -o remount,bind,ro "$root/proc/sys"
# A /dev of our own (systemd's container interface): the host's harmless nodes, a
# private devpts, and a console that is the boot log, not the host's console.
mount -t tmpfs -o mode=0755,nosuid pair-dev "$root/dev"
for node in null zero full random urandom tty; do
    touch "$root/dev/$node"
    mount --bind "/dev/$node" "$root/dev/$node"
done
touch "$root/dev/console"
mount --bind "$console" "$root/dev/console"
mkdir "$root/dev/pts" "$root/dev/shm" "$root/dev/mqueue"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$root/dev/pts"
ln -s pts/ptmx "$root/dev/ptmx"
mount -t tmpfs -o mode=1777,nosuid,nodev shm "$root/dev/shm"
mount -t mqueue mqueue "$root/dev/mqueue"
ln -s /proc/self/fd "$root/dev/fd"
ln -s /proc/self/fd/0 "$root/dev/stdin"
ln -s /proc/self/fd/1 "$root/dev/stdout"
ln -s /proc/self/fd/2 "$root/dev/stderr"
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs "$root/run"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/tmp"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/var/tmp"
# The checkout under test, read-only, wherever it lives (another mount is not in the
# overlay) and as it is now (the overlay may keep showing files replaced after boot).
mkdir -p "$root$checkout"
mount --bind "$checkout" "$root$checkout"
mount -o remount,bind,ro "$root$checkout"

cd "$root"
mkdir -p .host
pivot_root . .host
cd /
umount -l /.host
rmdir /.host

# From here / is the overlay: what is removed below is hidden in this root only.
[ "$(findmnt -n -o FSTYPE /)" = overlay ] || { echo "boot.sh: / is not the overlay" >&2; exit 1; }
# Nothing of the host's own boot: no fstab mounts, no generators, no unit the host
# enabled, no sysinit work (sysctl, modules, binfmt, udev, remount of /).
: >/etc/fstab
rm -rf /etc/systemd/system/* /usr/lib/systemd/system/*.wants /usr/lib/systemd/system-generators/*
rm -f /etc/machine-id
# A container image's "start no service" policy (Docker's exit 101): a host that boots
# systemd has none, and the package's scripts start units through it.
rm -f /usr/sbin/policy-rc.d
mkdir -p /etc/systemd/system
cat >"/etc/systemd/system/$target" <<UNIT
[Unit]
Description=The pair's real-systemd test target: the journal, and what the install enables
Requires=systemd-journald.socket
After=systemd-journald.socket
AllowIsolate=yes
UNIT
hostname pair-systemd-test
exec env -i container=pair-test PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    /lib/systemd/systemd --system "--unit=$target" --log-target=journal --log-level=info
