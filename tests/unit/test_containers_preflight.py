"""`patchgap run --docker` checks that need no engine: no engine answering is one line naming
the fix, and the containers get the run's S3 settings but none of the host's paths."""

from __future__ import annotations

import pytest

from patchgap.errors import ConfigError
from patchgap.run.containers import container_env, engine_client


def test_no_engine_is_one_line_naming_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    pytest.importorskip("docker")
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    with pytest.raises(ConfigError, match="no container engine answers at unix://") as err:
        engine_client()
    assert "podman system service" in str(err.value) and "\n" not in str(err.value)


def test_containers_get_s3_settings_and_token_but_no_host_paths(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    env = container_env(
        {
            "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:8333",
            "PATCHGAP_HOME": "/root/.patchgap",
            "PATCHGAP_CACHE_DIR": "/root/.cache/patchgap",
            "PATCHGAP_IMAGE_TAG": "dev",
        }
    )
    assert env == {
        "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:8333",
        "PATCHGAP_IMAGE_TAG": "dev",
        "HF_TOKEN": "hf_x",
        "HF_HUB_OFFLINE": "1",
    }
