"""What ``patchgap run --docker`` needs beyond the subprocess run: checks, before any stage
starts, that a container engine answers, that the stage images are built and that a container
reaches the S3 endpoint (the engine and image checks also run in the preflight, before anything
starts); pi0 and the evaluation sets put in S3 (:mod:`patchgap.run.inputs`: containers see no host
path); the arguments of kfp.local's DockerRunner."""

from __future__ import annotations

import os
import shutil
from typing import Any

from patchgap.errors import ConfigError
from patchgap.kfp.images import image_for
from patchgap.run.inputs import inputs_to_s3
from patchgap.run.prepare import PreparedRun, Say

#: The images a pipeline's steps run in (patchgap.kfp.images names).
PIPELINE_IMAGES = {
    "full": ("ops", "train_rewriter", "rewrite", "gate", "sft", "evaluate"),
    "rewrite": ("ops", "rewrite", "gate", "sft", "evaluate"),
    "watch": ("ops", "rewrite", "gate"),
    "study": ("ops", "train_rewriter", "rewrite", "gate", "sft", "evaluate"),
}
#: Host paths the containers must not inherit: the images set their own cache under /cache.
HOST_ONLY_ENV = ("PATCHGAP_HOME", "PATCHGAP_CACHE_DIR", "PATCHGAP_DATA_DIR")
PODMAN_HINT = (
    "start docker, or podman: `podman system service --time=0 unix:///run/podman/podman.sock &` "
    "and `export DOCKER_HOST=unix:///run/podman/podman.sock`"
)
# Run in the ops image: exit 0 when the store answers and holds the staged dataset (or, for a
# watch run's prefix, when the prefix's bucket can be listed).
_S3_PROBE = (
    "import sys\nfrom patchgap.storage.store import Store\n"
    "uri = sys.argv[1]\n"
    "sys.exit(0 if uri.endswith('/') and Store.from_env().list(uri) is not None "
    "or Store.from_env().exists(uri) else 3)"
)


#: Passed on from this process when set: the hub token and the offline switches.
HUB_ENV = ("HF_TOKEN", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def container_env(env: dict[str, str]) -> dict[str, str]:
    """The run's environment as the containers get it (S3 settings, hub token and offline
    switches; no host paths)."""
    out = {k: v for k, v in env.items() if k not in HOST_ONLY_ENV}
    out.update({k: os.environ[k] for k in HUB_ENV if os.environ.get(k)})
    return out


def engine_client() -> Any:
    """A docker SDK client that answers (docker or podman's Docker API); one-line errors."""
    try:
        import docker
    except ImportError:
        raise ConfigError(
            "--docker needs the docker Python package: pip install 'patchgap[containers]'"
        ) from None
    where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(
            f"no container engine answers at {where} ({first}); {PODMAN_HINT}"
        ) from None
    return client


def check_images(client: Any, pipeline: str) -> list[str]:
    """The image references of ``pipeline``'s steps; raises when any is not built."""
    import docker

    refs = [image_for(name) for name in PIPELINE_IMAGES[pipeline]]
    missing = []
    for ref in refs:
        try:
            client.images.get(ref)
        except docker.errors.ImageNotFound:
            missing.append(ref)
    if missing:
        raise ConfigError(
            f"image(s) not built: {', '.join(missing)}; run `make images` (VARIANT=cpu on a "
            "machine without a GPU), or set PATCHGAP_IMAGE_REGISTRY/PATCHGAP_IMAGE_TAG to images "
            "you have"
        )
    return refs


def check_s3_from_container(client: Any, prepared: PreparedRun, env: dict[str, str]) -> None:
    """Run the store client in the ops image against the staged dataset; raises when the
    container cannot reach the endpoint (or cannot read the object)."""
    import docker

    endpoint = env.get("AWS_ENDPOINT_URL_S3", "(AWS default)")
    try:
        client.containers.run(
            image_for("ops"),
            ["python", "-c", _S3_PROBE, prepared.dataset_uri],
            environment=env,
            network_mode="host",
            remove=True,
            stdout=False,
            stderr=True,
        )
    except docker.errors.ContainerError as err:
        text = err.stderr.decode(errors="replace") if isinstance(err.stderr, bytes) else ""
        last = (text.strip().splitlines() or [f"exit status {err.exit_status}"])[-1]
        raise ConfigError(
            f"a container cannot reach S3 at {endpoint} ({last}); the containers use the host "
            "network, so the endpoint must be reachable from this machine's engine: with a "
            "remote engine, set AWS_ENDPOINT_URL_S3 to an address its containers reach"
        ) from None


def run_step_container(
    client: Any, image: str, command: list[str], volumes: dict[str, Any], **run_args: Any
) -> int:
    """One step's container, as kfp.local runs it but removed after ``wait`` rather than
    auto-removed: when a quick step is gone before kfp asks for its logs, podman's Docker API
    answers 500 where docker answers 404, and kfp only tolerates the 404."""
    run_args.pop("auto_remove", None)
    container = client.containers.run(
        image=image, command=command, detach=True, volumes=volumes, **run_args
    )
    try:
        for line in container.logs(stream=True):
            print(line.decode(errors="replace"), end="")
        return int(container.wait()["StatusCode"])
    finally:
        container.remove(force=True)


def prepare_docker(prepared: PreparedRun, say: Say) -> dict[str, Any]:
    """All checks, then pi0 and the evaluation sets into S3; returns the DockerRunner keyword
    arguments."""
    from kfp.local import docker_task_handler

    client = engine_client()
    try:
        check_images(client, prepared.settings.pipeline)
        env = container_env(prepared.env)
        check_s3_from_container(client, prepared, env)
    finally:
        client.close()
    inputs_to_s3(prepared, say)
    # kfp.local looks this function up at each step; the images are checked above, so kfp's
    # own pull-if-missing is not needed.
    docker_task_handler.run_docker_container = run_step_container
    kwargs: dict[str, Any] = {
        "environment": env,
        # The embedded S3 listens on 127.0.0.1: the containers share the host network.
        "network_mode": "host",
        "shm_size": "8g",
        # Outputs land in the bind-mounted pipeline root: write them as the host user.
        "user": f"{os.getuid()}:{os.getgid()}",
    }
    if shutil.which("nvidia-smi"):
        import docker

        kwargs["device_requests"] = [docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])]
    return kwargs
