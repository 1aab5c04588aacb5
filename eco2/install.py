"""Installs what the local stack runs: Debian packages and the Kafka jars from Maven Central."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from pathlib import Path

from contract.settings import KAFKA_VERSION, Settings

APT_PACKAGES = {
    # package: a file that proves it is installed
    "redis-server": "/usr/bin/redis-server",
    "kcat": "/usr/bin/kcat",
    "postgresql": "/usr/lib/postgresql/*/bin/initdb",
    "chromium": "/usr/bin/chromium",  # headless browser for the gateway's web page test
    # `eco2 image build` and its test: build and run the image without a Docker engine or registry
    "buildah": "/usr/bin/buildah",
    "mmdebstrap": "/usr/bin/mmdebstrap",
    "prometheus": "/usr/bin/promtool",  # tests/test_deploy.py checks and unit-tests the alert rules
}


class InstallError(RuntimeError):
    """A prerequisite is missing and cannot be installed here; the message says what to do."""


def _present(probe: str) -> bool:
    return bool(glob.glob(probe))


def ensure_apt_packages(packages: dict[str, str] | None = None) -> list[str]:
    """apt-get install whatever is missing; returns what was installed."""
    wanted = packages or APT_PACKAGES
    missing = [name for name, probe in wanted.items() if not _present(probe)]
    if not missing:
        return []
    if shutil.which("apt-get") is None:
        raise InstallError(f"missing {', '.join(missing)} and apt-get is not available: install them")
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print(f"installing Debian packages: {' '.join(missing)}", flush=True)
    for argv in (
        [*sudo, "apt-get", "update", "-q"],
        [*sudo, "apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
    ):
        proc = subprocess.run(argv, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise InstallError(f"`{' '.join(argv)}` failed:\n{proc.stderr[-2000:]}")
    still = [name for name in missing if not _present(wanted[name])]
    if still:
        raise InstallError(f"apt-get ran but {', '.join(still)} is still missing")
    return missing


def pg_bin(tool: str) -> str:
    """Path of a PostgreSQL server binary (initdb, pg_ctl, postgres), newest major first."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"), reverse=True)
    if not found:
        raise InstallError(f"PostgreSQL's {tool} not found; install the `postgresql` package")
    return found[0]


def kafka_home(settings: Settings) -> Path:
    return settings.local_dir / f"kafka-{KAFKA_VERSION}"


def ensure_kafka(settings: Settings) -> Path:
    """Resolve kafka_2.13 + kafka-tools into .local/kafka-VERSION/libs with Maven (once)."""
    home = kafka_home(settings)
    libs = home / "libs"
    marker = home / ".complete"
    if marker.exists():
        return home
    for tool in ("java", "mvn"):
        if shutil.which(tool) is None:
            raise InstallError(f"`{tool}` not found on PATH: the Kafka broker needs Java 17 and Maven")
    pom = Path(__file__).parent / "kafka" / "pom.xml"
    print(f"resolving Apache Kafka {KAFKA_VERSION} from Maven Central into {libs}", flush=True)
    if libs.exists():
        shutil.rmtree(libs)
    argv = [
        "mvn",
        "-q",
        "-B",
        "-f",
        str(pom),
        f"-Dkafka.version={KAFKA_VERSION}",
        "dependency:copy-dependencies",
        f"-DoutputDirectory={libs}",
        "-DincludeScope=runtime",
    ]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0 or not (libs / f"kafka_2.13-{KAFKA_VERSION}.jar").exists():
        raise InstallError(
            f"Maven could not resolve Kafka {KAFKA_VERSION}:\n{(proc.stdout + proc.stderr)[-3000:]}"
        )
    marker.write_text(KAFKA_VERSION + "\n")
    return home
