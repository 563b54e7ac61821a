"""The container tier's engine: docker, or podman's Docker API through DOCKER_HOST (`make
test-containers` starts it and builds the CPU images first; on a machine with Docker,
`VARIANT=cpu make images` then `pytest -m containers tests/containers` does the same)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture(scope="session")
def engine() -> Iterator[Any]:
    """A docker SDK client that answers; the images of the full pipeline must be built."""
    from patchgap.run.containers import check_images, engine_client

    client = engine_client()
    check_images(client, "full")
    yield client
    client.close()
