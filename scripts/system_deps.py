"""Install the Debian packages the tests and the bench run (nginx, tinyproxy, wrk, nodejs, npm, chromium, valgrind)
if missing.

As root, with apt-get, and without leaving the packages' daemons running or enabled: the test fixtures start nginx
and tinyproxy themselves on free ports, so a system nginx on :80 or tinyproxy on :8888 would only get in the way.
Otherwise it says what to install and succeeds (those tests skip), except in CI, where every test must run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

# Debian package -> the binary the tests look for: a fixed path (the nginx and tinyproxy fixtures), or a name on PATH.
PACKAGES = {
    "nginx": "/usr/sbin/nginx",
    "tinyproxy": "/usr/bin/tinyproxy",
    "wrk": "wrk",
    "nodejs": "node",
    "npm": "npm",
    # The playground's browser tests drive it with Playwright (never Playwright's own browser downloads).
    "chromium": "/usr/bin/chromium",
    # `make bench-instructions` counts instructions per call with callgrind.
    "valgrind": "valgrind",
}
# Packages whose maintainer scripts would start (and enable) a daemon.
DAEMONS = ("nginx", "tinyproxy")
# invoke-rc.d and deb-systemd-invoke ask this script before starting a service; 101 means "action forbidden".
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
POLICY_FORBID_ALL = (
    "#!/bin/sh\n# Written by `make system-deps` for as long as apt-get installs packages: start no daemons.\nexit 101\n"
)
SYSTEMD_RUNNING = Path("/run/systemd/system")


def is_present(binary: str) -> bool:
    return os.access(binary, os.X_OK) if "/" in binary else shutil.which(binary) is not None


@contextlib.contextmanager
def daemons_forbidden() -> Iterator[None]:
    """Keep maintainer scripts from starting services, unless a policy is already in place (Docker images ship one)."""
    if POLICY_RC_D.exists():
        yield
        return
    POLICY_RC_D.write_text(POLICY_FORBID_ALL)
    POLICY_RC_D.chmod(0o755)
    try:
        yield
    finally:
        POLICY_RC_D.unlink(missing_ok=True)


def run_quietly(*command: str) -> None:
    subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def stop_and_disable(service: str) -> None:
    """The package was absent a moment ago, so whatever runs under its name was started by its installation."""
    if SYSTEMD_RUNNING.is_dir():
        run_quietly("systemctl", "disable", "--now", f"{service}.service")
        return
    run_quietly("service", service, "stop")
    if shutil.which("update-rc.d"):
        run_quietly("update-rc.d", service, "disable")


def install(packages: list[str], *, apt_get: str) -> None:
    print(f"system-deps: installing {' '.join(packages)} with apt-get", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with daemons_forbidden():
        subprocess.run([apt_get, "update", "-qq"], env=env, check=True)
        subprocess.run(
            [apt_get, "install", "-y", "-qq", "--no-install-recommends", *packages],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
    for service in DAEMONS:
        if service in packages:
            stop_and_disable(service)


def main() -> int:
    missing = [package for package, binary in PACKAGES.items() if not is_present(binary)]
    if not missing:
        return 0
    apt_get = shutil.which("apt-get")
    if os.geteuid() == 0 and apt_get is not None:
        install(missing, apt_get=apt_get)
        return 0
    names = " ".join(missing)
    advice = f"system-deps: missing {names}: install them (Debian/Ubuntu: apt-get install {names})"
    # Like the test fixtures: any non-empty CI means CI, where a missing package fails tests rather than skipping them.
    if os.environ.get("CI"):
        print(f"{advice}; CI runs every test, so this is an error", file=sys.stderr)
        return 1
    print(f"{advice}; until then the tests that need them are skipped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
