"""The third security review's two ways from the daemon user `pair` to root, run as they
were found, inside the real install: the daemon user plants what it can (a forged
`backup` answer from a daemon it controls, a link in its state directory), then root
runs pairctl. Each must fail, with root's files untouched (SECURITY-REVIEW-3.md #1, #2)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

from tests.systemd.machine import PREFIX, Machine

UNITS = [
    f"pair-{daemon}.{kind}" for daemon in ("assistant", "gateway") for kind in ("socket", "service")
]
# Code execution in pair-gateway.service, as the review simulated it: every snapshot
# also names a file the daemon user wrote, to land in /etc/cron.d, and a file of root's.
FORGERY = """

_real_take = Snapshotter.take


def _forged_take(self):
    import hashlib
    result = _real_take(self)
    if self.daemon == "gateway":
        def meta(path):
            data = open(path, "rb").read()
            return len(data), hashlib.sha256(data).hexdigest()
        for name, path in (("/etc/cron.d/pair-pwn", "/var/lib/pair/payload"),
                           ("../../victim-copy", "/etc/pair-victim")):
            size, digest = meta(path)
            result.files.append(SnapshotFile(name=name, path=path, bytes=size, sha256=digest))
    return result


Snapshotter.take = _forged_take
"""


def installed_module(machine: Machine, module: str) -> str:
    python = f"{PREFIX}/gateway/current/bin/python"
    return machine.run(python, "-c", f"import {module} as m; print(m.__file__)").stdout.strip()


@contextlib.contextmanager
def forged_gateway(machine: Machine) -> Iterator[None]:
    source = installed_module(machine, "pair.runtime.backup")
    original = machine.path(source).read_text()
    machine.path(source).write_text(original + FORGERY)
    machine.run("systemctl", "restart", "pair-gateway.service")
    try:
        yield
    finally:
        machine.path(source).write_text(original)
        machine.run("systemctl", "restart", "pair-gateway.service")


def serving(machine: Machine) -> None:
    """Both daemons started by their sockets (the state directory exists from then on)."""
    assert machine.pairctl("status").returncode == 0


def test_a_forged_backup_answer_makes_root_write_and_delete_nothing(machine: Machine) -> None:
    serving(machine)
    machine.run("sh", "-c", "echo '* * * * * root id > /root/PWNED' > /var/lib/pair/payload")
    machine.run("chown", "pair:pair", "/var/lib/pair/payload")
    machine.run("sh", "-c", "echo root-only > /etc/pair-victim")
    machine.run("mkdir", "-p", "/srv/backups")
    with forged_gateway(machine):
        forged = machine.pairctl("backup", "/srv/backups")
    assert forged.returncode != 0
    assert "not the gateway's files" in forged.stderr, forged.stderr
    assert not machine.path("/etc/cron.d/pair-pwn").exists()
    assert machine.path("/etc/pair-victim").read_text() == "root-only\n"
    assert not list(machine.path("/srv").rglob("victim-copy"))
    # What the refused answer named is left to the daemon's own hourly clean-up.
    machine.run("sh", "-c", "rm -f /var/lib/pair/backup/*")
    honest = machine.pairctl("--json", "backup", "/srv/backups")
    assert honest.returncode == 0, honest.stderr
    assert json.loads(honest.stdout)["verified"] is True
    machine.run("rm", "-f", "/var/lib/pair/payload")


def test_a_link_planted_in_the_state_directory_gives_root_no_file_away(machine: Machine) -> None:
    serving(machine)
    machine.run("mkdir", "-p", "/srv/backups")
    taken = machine.pairctl("--json", "backup", "/srv/backups")
    assert taken.returncode == 0, taken.stderr
    bundle = json.loads(taken.stdout)["bundle"]
    shadow_before = machine.run("stat", "-c", "%U %G %a %s", "/etc/shadow").stdout
    for planted in ("gateway.key.restoring", "assistant.db.restoring"):
        machine.run("ln", "-s", "/etc/shadow", f"/var/lib/pair/{planted}", user="pair")
    machine.run("systemctl", "stop", *UNITS)
    try:
        restored = machine.pairctl("restore", bundle)
        assert restored.returncode == 0, restored.stderr
    finally:
        machine.run("systemctl", "start", "pair-assistant.socket", "pair-gateway.socket")
    assert machine.run("stat", "-c", "%U %G %a %s", "/etc/shadow").stdout == shadow_before
    denied = machine.run("sh", "-c", "echo x >> /etc/shadow", user="pair", check=False)
    assert denied.returncode != 0
    kinds = machine.run("stat", "-c", "%F %U", "/var/lib/pair/gateway.key").stdout.split("\n")[0]
    assert kinds == "regular file pair"
    finished = machine.pairctl("restore", "--finish")
    assert finished.returncode == 0, finished.stderr
