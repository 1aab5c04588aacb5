"""The image of deploy/Dockerfile, built here with buildah and run against the local stack.

`eco2 image build` makes it (a local Debian base, the runtime lock; cached under .local/image and
in buildah's layer cache, so only the first run pays for it). Each component then runs from the
image's root filesystem as the manifests run it: as the image's user (10001), with the root
filesystem mounted read-only and only /tmp and ECO2_LOCAL_DIR writable (tmpfs, the pods'
emptyDirs), with the image's environment and working directory. `buildah run --isolation chroot`
checks the user and the permissions; it cannot mount the root read-only, so the components run
under `unshare --mount` + `chroot` on a read-only bind mount of the image (buildah mount).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from contract.events import PIPELINE
from contract.settings import Settings
from contract.topics import STAGE_TOPICS, stage_group
from eco2 import image
from eco2.lock import LOCK, applicable, norm

from .gateway_support import Proc, commit_at_end, free_port, isolated_redis_url, log_path

pytestmark = pytest.mark.integration
USER = "10001:10001"


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "buildah with chroot isolation and read-only mounts need root here"
    for tool in ("buildah", "mmdebstrap", "unshare", "chroot"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (eco2 stack up installs buildah and mmdebstrap)"
    probe = subprocess.run(["buildah", "from", "scratch"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"buildah cannot create containers here: {probe.stderr.strip()[:200]}"
    subprocess.run(["buildah", "rm", probe.stdout.strip()], capture_output=True)
    return None


@dataclass
class Image:
    tag: str
    root: Path  # the image's root filesystem (buildah mount), never written
    container: str
    config: dict[str, Any]

    def buildah_run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["buildah", "run", "--isolation", "chroot", self.container, "--", *argv],
            capture_output=True,
            text=True,
            timeout=120,
        )

    def argv(self, command: list[str], env: dict[str, str], target: Path) -> list[str]:
        """Run `command` as the image's user on its read-only root, like a locked-down pod."""
        t = shlex.quote(str(target))
        image_env = dict(e.split("=", 1) for e in self.config["Env"])
        envs = " ".join(shlex.quote(f"{k}={v}") for k, v in {**image_env, **env}.items())
        inner = f"cd {shlex.quote(self.config['WorkingDir'])} && exec {shlex.join(command)}"
        script = " && ".join(
            [
                f"mount --bind {shlex.quote(str(self.root))} {t}",
                f"mount -o remount,bind,ro {t}",
                f"mount -t tmpfs -o mode=1777 tmpfs {t}/tmp",
                f"mount -t tmpfs -o uid=10001,gid=10001 tmpfs {t}/var/lib/eco2",
                f"mount -t proc proc {t}/proc",
                f"mount --rbind /dev {t}/dev",
                f"exec chroot --userspec={self.config['User']} {t} /usr/bin/env -i {envs} "
                f"/bin/sh -c {shlex.quote(inner)}",
            ]
        )
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]


@pytest.fixture(scope="module")
def built(settings: Settings, stack_status: Any) -> Iterator[Image]:
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    t0 = time.monotonic()
    tag = image.build(settings)
    print(f"image {tag} ready in {time.monotonic() - t0:.0f}s")
    ctr = subprocess.run(["buildah", "from", tag], capture_output=True, text=True, check=True).stdout.strip()
    try:
        root = Path(
            subprocess.run(
                ["buildah", "mount", ctr], capture_output=True, text=True, check=True
            ).stdout.strip()
        )
        info = json.loads(
            subprocess.run(
                ["buildah", "inspect", "--type", "image", tag], capture_output=True, text=True, check=True
            ).stdout
        )
        yield Image(tag, root, ctr, info["OCIv1"]["config"])
    finally:
        subprocess.run(["buildah", "umount", ctr], capture_output=True)
        subprocess.run(["buildah", "rm", ctr], capture_output=True)


def stack_env(s: Settings, **extra: str) -> dict[str, str]:
    """What a pod's ConfigMap gives it, pointing at the local stack."""
    return {
        "ECO2_KAFKA_BOOTSTRAP": s.kafka_bootstrap,
        "ECO2_REDIS_URL": s.redis_url,
        "ECO2_POSTGRES_DSN": s.postgres_dsn,
        "ECO2_MODEL_HOST": s.model_host,
        "ECO2_MODEL_PORT": str(s.model_port),
        **extra,
    }


@contextlib.contextmanager
def component(img: Image, s: Settings, name: str, command: list[str], **env: str) -> Iterator[Proc]:
    """A component started from the image (its own mount namespace); stopped by its pid."""
    target = Path(tempfile.mkdtemp(prefix="eco2-image-root-"))
    proc = Proc(name, img.argv(command, stack_env(s, **env), target), {}, log_path(s, f"image-{name}"))
    proc.log.unlink(missing_ok=True)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()
        with contextlib.suppress(OSError):
            target.rmdir()


def wait_http(
    proc: Proc, url: str, timeout_s: float = 90, want: dict[str, Any] | None = None
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if not proc.alive():
            assert proc.popen is not None
            raise AssertionError(f"exited {proc.popen.returncode}:\n{proc.tail()}")
        with contextlib.suppress(httpx.HTTPError):
            r = httpx.get(url, timeout=3)
            last = f"{r.status_code} {r.text[:300]}"
            body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
            if r.status_code == 200 and all(body.get(k) == v for k, v in (want or {}).items()):
                return dict(body)
        time.sleep(0.5)
    raise AssertionError(f"{url} never answered 200 {want or ''} (last: {last}):\n{proc.tail()}")


def test_image_runs_as_its_non_root_user_and_cannot_write_its_own_files(built: Image) -> None:
    assert built.config["User"] == USER
    out = built.buildah_run("sh", "-c", "id -u; id -g; touch /x || echo root-not-writable; "
                            "touch /app/contract/x || echo app-not-writable; "
                            "touch /var/lib/eco2/x && echo local-dir-writable")  # fmt: skip
    assert out.stdout.split() == [
        "10001",
        "10001",
        "root-not-writable",
        "app-not-writable",
        "local-dir-writable",
    ], out
    # The venv holds exactly the runtime lock: no dev tools, the pinned versions.
    listing = "import importlib.metadata as m, json; print(json.dumps({d.name: d.version for d in m.distributions()}))"  # noqa: E501
    installed = {norm(k): v for k, v in json.loads(built.buildah_run("python", "-c", listing).stdout).items()}

    locked = applicable(LOCK)
    assert {n: installed.get(n) for n in locked} == locked
    assert "pytest" not in installed and "eco2-streams" not in installed
    # The operator CLI as the runbook uses it in a pod (`eco2 dlq ...`).
    cli = built.buildah_run("eco2", "dlq", "--help")
    assert cli.returncode == 0 and "replay" in cli.stdout, cli


def test_read_only_root_even_for_root(built: Image, settings: Settings) -> None:
    """The mount the components below run on is really read-only (not just permissions)."""
    with component(built, settings, "probe", ["python", "-c", "open('/app/x', 'w')"]) as probe:
        assert probe.popen is not None
        probe.popen.wait(timeout=60)
    assert probe.popen.returncode != 0 and "Read-only file system" in probe.tail(), probe.tail()


def test_migrations_run_from_the_image(built: Image, settings: Settings) -> None:
    """What the init container of the API and writer Deployments runs."""
    with component(built, settings, "migrate", ["python", "-m", "eco2.cli", "db", "migrate"]) as p:
        assert p.popen is not None
        p.popen.wait(timeout=90)
        assert p.popen.returncode == 0, p.tail()


def test_api_and_gateway_answer_health_and_ready_from_the_image(built: Image, settings: Settings) -> None:
    api_port, gw_port = free_port(), free_port()
    with (
        component(built, settings, "api", ["python", "-m", "producers"], ECO2_API_PORT=str(api_port)) as api,
        component(
            built, settings, "gateway", ["python", "-m", "gateway"], ECO2_GATEWAY_PORT=str(gw_port)
        ) as gw,
    ):
        for proc, port in ((api, api_port), (gw, gw_port)):
            wait_http(proc, f"http://127.0.0.1:{port}/health")
            wait_http(proc, f"http://127.0.0.1:{port}/ready")


def test_stage_worker_router_and_writer_join_their_groups_from_the_image(
    built: Image, settings: Settings
) -> None:
    stage = PIPELINE[1]  # rule: no model calls
    router_group = f"eco2-router-image-{uuid.uuid4().hex[:8]}"
    writer_group = f"eco2-writer-image-{uuid.uuid4().hex[:8]}"
    asyncio.run(_start_at_end(settings, stage, router_group, writer_group))
    ports = [free_port() for _ in range(3)]
    try:
        with (
            component(built, settings, "worker", ["python", "-m", "streams", "worker", "--stages", stage],
                      ECO2_METRICS_PORT=str(ports[0]), ECO2_STAGE_OVERLAP_OK="1") as worker,
            component(built, settings, "router", ["python", "-m", "streams", "router"],
                      ECO2_METRICS_PORT=str(ports[1]), ECO2_ROUTER_GROUP=router_group,
                      ECO2_REDIS_URL=isolated_redis_url(settings)) as router,
            component(built, settings, "writer", ["python", "-m", "persistence"],
                      ECO2_METRICS_PORT=str(ports[2]), ECO2_WRITER_GROUP=writer_group) as writer,
        ):  # fmt: skip
            # /health reports the partitions the group gave each of them: they joined.
            got = {
                "worker": wait_http(worker, f"http://127.0.0.1:{ports[0]}/health", want={"assigned": 12}),
                "router": wait_http(router, f"http://127.0.0.1:{ports[1]}/health", want={"assigned": 4}),
                "writer": wait_http(writer, f"http://127.0.0.1:{ports[2]}/health", want={"assigned": 4}),
            }
            assert got["worker"]["group"] == stage_group([stage])
            assert got["router"]["group"] == router_group and got["writer"]["group"] == writer_group
    finally:
        asyncio.run(_delete_groups(settings, [stage_group([stage]), router_group, writer_group]))


async def _start_at_end(s: Settings, stage: str, router_group: str, writer_group: str) -> None:
    """New groups start at the end: the image's components must not replay the stack's history."""
    await commit_at_end(s, router_group)
    await commit_at_end(s, writer_group)
    await commit_at_end(s, stage_group([stage]), STAGE_TOPICS[stage])


async def _delete_groups(s: Settings, groups: list[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap)
    await admin.start()
    try:
        with contextlib.suppress(Exception):
            await admin.delete_consumer_groups(groups)
    finally:
        await admin.close()
