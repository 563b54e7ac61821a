"""The KFP client side: submit a compiled pipeline, follow its runs, manage recurring runs, and
the preflight checks (``doctor``) that must pass before any GPU time is spent. Talks to a KFP API
server through ``kfp.Client``; nothing here runs on the cluster."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patchgap.errors import ConfigError, PatchgapError

log = logging.getLogger("patchgap.kfp")

KFP_HOST_ENV = "KF_PIPELINES_ENDPOINT"


def package_file(path: str | Path) -> Path:
    """A compiled pipeline YAML that must exist (names are resolved by
    :func:`patchgap.pipelines.compile.pipeline_package`)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"pipeline package {p}: not a file")
    return p


def parse_params(items: list[str] | None) -> dict[str, Any]:
    """``key=value`` pipeline parameters; values are parsed as YAML scalars (ints, bools, lists)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--param {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v) if v else ""
    return out


# KFP's cron has six fields, seconds first (robfig/cron): "0 0 2 * * *" is every day at 02:00.
_CRON_FIELD = r"[\d\*\?/,\-LW#A-Za-z]+"
_CRON_RE = re.compile(rf"^{_CRON_FIELD}(\s+{_CRON_FIELD}){{5}}$")


def validate_cron(expr: str) -> str:
    """Accept KFP's 6-field cron (with seconds); a 5-field Unix cron is a clear error."""
    expr = expr.strip()
    if _CRON_RE.match(expr):
        return expr
    n = len(expr.split())
    hint = f" (prefix seconds: '0 {expr}')" if n == 5 else ""
    raise ConfigError(f"cron {expr!r}: KFP expects 6 fields with seconds first{hint}")


@dataclass
class KfpTarget:
    """Where and as whom to talk to KFP."""

    host: str | None = None
    namespace: str | None = None
    existing_token: str | None = None
    verify_ssl: bool | None = None

    def client(self) -> Any:
        import warnings

        import kfp

        host = self.host or os.environ.get(KFP_HOST_ENV)
        if not host:
            raise ConfigError(f"no KFP host: pass --host or set {KFP_HOST_ENV}")
        token = self.existing_token or os.environ.get("KFP_TOKEN") or None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            kwargs: dict[str, Any] = {"host": host, "existing_token": token}
            if self.namespace:
                kwargs["namespace"] = self.namespace
            if self.verify_ssl is not None:
                kwargs["verify_ssl"] = self.verify_ssl
            return kfp.Client(**kwargs)

    def ui_link(self, run_id: str) -> str:
        host = (self.host or os.environ.get(KFP_HOST_ENV) or "").rstrip("/")
        return f"{host}/#/runs/details/{run_id}"


@dataclass
class Submitted:
    run_id: str
    url: str


def submit(
    target: KfpTarget,
    pipeline: str,
    *,
    params: Mapping[str, Any] | None = None,
    experiment: str = "patchgap",
    run_name: str | None = None,
    service_account: str | None = None,
    pipeline_root: str | None = None,
    enable_caching: bool | None = None,
) -> Submitted:
    """Submit one run of a compiled pipeline; returns its id and UI link."""
    package = package_file(pipeline)
    client = target.client()
    try:
        # kfp.Client prints its links on stdout, which carries only our results (-o json).
        with contextlib.redirect_stdout(sys.stderr):
            result = client.create_run_from_pipeline_package(
                str(package),
                arguments=dict(params or {}),
                run_name=run_name,
                experiment_name=experiment,
                namespace=target.namespace,
                pipeline_root=pipeline_root,
                enable_caching=enable_caching,
                service_account=service_account,
            )
    except Exception as err:  # the API client raises many types; the user needs the message
        raise PatchgapError(f"KFP submit of {package.name} failed: {_api_message(err)}") from err
    return Submitted(run_id=result.run_id, url=target.ui_link(result.run_id))


# kfp.Client.wait_for_run_completion does not stop on CANCELED; these are every final state.
FINAL_STATES = frozenset({"SUCCEEDED", "SKIPPED", "FAILED", "CANCELED"})
OK_STATES = frozenset({"SUCCEEDED", "SKIPPED"})
# A day-long wait outlives API server restarts: this many failed polls in a row before giving up.
WAIT_RETRIES = 5


@dataclass
class RunStatus:
    """One KFP run as ``patchgap runs`` shows it."""

    run_id: str
    name: str | None
    state: str
    created_at: str | None
    finished_at: str | None
    error: str | None
    url: str

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def ok(self) -> bool:
        return self.state in OK_STATES


def _status(target: KfpTarget, run: Any) -> RunStatus:
    def when(value: Any) -> str | None:
        return value.isoformat() if hasattr(value, "isoformat") else value

    error = getattr(run, "error", None)
    return RunStatus(
        run_id=run.run_id,
        name=run.display_name,
        state=run.state or "RUNTIME_STATE_UNSPECIFIED",
        created_at=when(run.created_at),
        finished_at=when(run.finished_at),
        error=getattr(error, "message", None) or None,
        url=target.ui_link(run.run_id),
    )


def get_run(target: KfpTarget, run_id: str, client: Any = None) -> RunStatus:
    """The state of one run."""
    client = client or target.client()
    try:
        return _status(target, client.get_run(run_id))
    except Exception as err:
        raise PatchgapError(f"KFP run {run_id}: {_api_message(err)}") from err


def _experiment_id(client: Any, target: KfpTarget, experiment: str | None) -> str | None:
    if not experiment:
        return None
    found = client.get_experiment(experiment_name=experiment, namespace=target.namespace)
    return found.experiment_id


def list_runs(target: KfpTarget, experiment: str | None = None, limit: int = 20) -> list[RunStatus]:
    """The newest ``limit`` runs (optionally one experiment's), newest first."""
    client = target.client()
    try:
        exp_id = _experiment_id(client, target, experiment)
        resp = client.list_runs(
            experiment_id=exp_id,
            namespace=target.namespace,
            page_size=limit,
            sort_by="created_at desc",
        )
    except Exception as err:
        raise PatchgapError(f"KFP list of runs failed: {_api_message(err)}") from err
    return [_status(target, r) for r in resp.runs or []]


def wait_run(
    target: KfpTarget,
    run_id: str,
    *,
    timeout: float | None = None,
    poll_seconds: float = 10.0,
    on_change: Callable[[RunStatus], None] | None = None,
) -> RunStatus:
    """Poll a run until it reaches a final state; ``on_change`` sees every new state."""
    client = target.client()
    started = time.monotonic()
    last = None
    failures = 0
    while True:
        try:
            status = get_run(target, run_id, client)
        except PatchgapError as err:
            code = getattr(err.__cause__, "status", None)
            failures += 1
            if (code is not None and code < 500) or failures > WAIT_RETRIES:
                raise  # a 4xx (unknown run, no access) will not heal
            log.warning("%s; poll %d of %d, retrying", err, failures, WAIT_RETRIES)
            time.sleep(poll_seconds)
            continue
        failures = 0
        if status.state != last and on_change is not None:
            on_change(status)
        last = status.state
        if status.final:
            return status
        waited = time.monotonic() - started
        if timeout is not None and waited >= timeout:
            raise PatchgapError(f"KFP run {run_id}: still {status.state} after {waited:.0f}s")
        time.sleep(poll_seconds)


@dataclass
class Schedule:
    name: str
    pipeline: str
    cron: str | None = None
    interval_seconds: int | None = None
    max_concurrency: int = 1
    params: dict[str, Any] = field(default_factory=dict)
    experiment: str = "patchgap"
    service_account: str | None = None
    pipeline_root: str | None = None
    enabled: bool = True


def create_schedule(target: KfpTarget, sched: Schedule) -> str:
    """Create a recurring run (cron with seconds or an interval), no catch-up. Returns its id."""
    if (sched.cron is None) == (sched.interval_seconds is None):
        raise ConfigError("schedule: give exactly one of --cron or --interval")
    if sched.interval_seconds is not None and sched.interval_seconds < 60:
        raise ConfigError("schedule: --interval must be at least 60 seconds")
    if sched.max_concurrency < 1:
        raise ConfigError("schedule: --max-concurrency must be >= 1")
    cron = validate_cron(sched.cron) if sched.cron else None
    package = package_file(sched.pipeline)
    client = target.client()
    try:
        exp = client.create_experiment(sched.experiment, namespace=target.namespace)
        rr = client.create_recurring_run(
            experiment_id=exp.experiment_id,
            job_name=sched.name,
            cron_expression=cron,
            interval_second=sched.interval_seconds,
            max_concurrency=sched.max_concurrency,
            # A missed window must not trigger a burst of runs over the same datasets.
            no_catchup=True,
            params=dict(sched.params),
            pipeline_package_path=str(package),
            enabled=sched.enabled,
            pipeline_root=sched.pipeline_root,
            service_account=sched.service_account,
        )
    except Exception as err:
        raise PatchgapError(f"KFP schedule {sched.name!r} failed: {_api_message(err)}") from err
    return rr.recurring_run_id


def list_schedules(target: KfpTarget, experiment: str | None = None) -> list[dict[str, Any]]:
    """Recurring runs visible to this namespace (optionally one experiment's)."""
    client = target.client()
    try:
        exp_id = _experiment_id(client, target, experiment)
        resp = client.list_recurring_runs(
            experiment_id=exp_id, namespace=target.namespace, page_size=100
        )
    except Exception as err:
        raise PatchgapError(f"KFP list of recurring runs failed: {_api_message(err)}") from err
    out = []
    for rr in resp.recurring_runs or []:
        trig = rr.trigger
        cron = getattr(getattr(trig, "cron_schedule", None), "cron", None) if trig else None
        interval = (
            getattr(getattr(trig, "periodic_schedule", None), "interval_second", None)
            if trig
            else None
        )
        out.append(
            {
                "id": rr.recurring_run_id,
                "name": rr.display_name,
                "status": rr.status,
                "cron": cron,
                "interval_seconds": interval,
                "max_concurrency": rr.max_concurrency,
                "no_catchup": rr.no_catchup,
            }
        )
    return out


def set_schedule_state(target: KfpTarget, recurring_run_id: str, action: str) -> None:
    """``enable``, ``disable`` or ``delete`` one recurring run."""
    client = target.client()
    fn = {
        "enable": client.enable_recurring_run,
        "disable": client.disable_recurring_run,
        "delete": client.delete_recurring_run,
    }.get(action)
    if fn is None:
        raise ConfigError(f"unknown schedule action {action!r}")
    try:
        fn(recurring_run_id)
    except Exception as err:
        raise PatchgapError(
            f"KFP {action} of {recurring_run_id} failed: {_api_message(err)}"
        ) from err


def _api_message(err: Exception) -> str:
    status = getattr(err, "status", None)
    reason = getattr(err, "reason", None)
    body = getattr(err, "body", None)
    if status is not None:
        detail = (body or "").strip().replace("\n", " ")[:300] if isinstance(body, str) else ""
        return f"HTTP {status} {reason or ''} {detail}".strip()
    return f"{type(err).__name__}: {err}"


@dataclass
class Check:
    name: str
    ok: bool | None  # None: not applicable here (skipped)
    detail: str


def doctor(
    *,
    bucket: str,
    target: KfpTarget | None = None,
    namespace: str = "patchgap",
    secret_name: str = "patchgap-s3",
    kube_context: str | None = None,
) -> list[Check]:
    """Preflight: S3 endpoint and credentials, the bucket, the KFP host, and (when a kube context
    is available) the ``kfp-launcher`` ConfigMap and the S3 Secret in the namespace."""
    checks: list[Check] = []
    try:
        from patchgap.storage.store import Store

        store = Store.from_env()
        checks.append(
            Check(
                "s3 credentials", True, f"endpoint {store.settings.endpoint_url or 'AWS default'}"
            )
        )
        try:
            store.list(f"s3://{bucket}/")
            checks.append(Check("s3 bucket", True, f"s3://{bucket} is readable"))
        except PatchgapError as err:
            checks.append(Check("s3 bucket", False, str(err)))
    except PatchgapError as err:
        checks.append(Check("s3 credentials", False, str(err)))

    if target is not None and (target.host or os.environ.get(KFP_HOST_ENV)):
        try:
            client = target.client()
            health = client.get_kfp_healthz()
            checks.append(
                Check(
                    "kfp host", True, f"healthy (multi_user={getattr(health, 'multi_user', '?')})"
                )
            )
        except PatchgapError as err:
            checks.append(Check("kfp host", False, str(err)))
        except Exception as err:
            checks.append(Check("kfp host", False, _api_message(err)))
    else:
        checks.append(Check("kfp host", None, f"no host given (--host or {KFP_HOST_ENV})"))

    checks.extend(_kube_checks(namespace, secret_name, kube_context))
    return checks


def _launcher_credentials(providers: str) -> dict[str, Any]:
    """The ``credentials`` of the launcher's default s3 provider; empty when unreadable."""
    import yaml

    try:
        data = yaml.safe_load(providers) or {}
        credentials = data["s3"]["default"]["credentials"]
    except (yaml.YAMLError, KeyError, TypeError):
        return {}
    return credentials if isinstance(credentials, dict) else {}


def _kube_checks(namespace: str, secret_name: str, kube_context: str | None) -> list[Check]:
    try:
        from kubernetes import client as kclient
        from kubernetes import config as kconfig
    except ImportError:
        return [Check("kubernetes", None, "kubernetes package not installed (extra: kfp)")]
    try:
        # KUBECONFIG as it is now: the client reads it once, when it is first imported.
        kconfig.load_kube_config(
            config_file=os.environ.get("KUBECONFIG") or None, context=kube_context
        )
    except Exception:
        try:
            kconfig.load_incluster_config()
        except Exception:
            return [Check("kubernetes", None, "no kube context available; cluster checks skipped")]
    v1 = kclient.CoreV1Api()
    out = []
    from_env = False
    try:
        cm = v1.read_namespaced_config_map("kfp-launcher", namespace)
        credentials = _launcher_credentials((cm.data or {}).get("providers", ""))
        from_env = credentials.get("fromEnv") is True and "secretRef" not in credentials
        ok = from_env or "secretRef" in credentials or "secretRef" in str(cm.data)
        detail = (
            "s3 provider takes credentials from the pod (fromEnv: true)"
            if from_env
            else "s3 provider with credentials"
            if ok
            else "no s3 provider credentials configured"
        )
        out.append(Check("kfp-launcher ConfigMap", ok, detail))
    except Exception as err:
        out.append(
            Check("kfp-launcher ConfigMap", False, f"{namespace}/kfp-launcher: {_api_message(err)}")
        )
    if from_env:
        # IRSA, Workload Identity: the launcher and the stages use the pod's provider chain.
        out.append(Check("s3 Secret", None, "not used: kfp-launcher has fromEnv: true"))
        return out
    try:
        sec = v1.read_namespaced_secret(secret_name, namespace)
        keys = set((sec.data or {}).keys())
        need = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
        missing = sorted(need - keys)
        out.append(
            Check(
                "s3 Secret",
                not missing,
                f"{namespace}/{secret_name} has the keys"
                if not missing
                else f"{namespace}/{secret_name} lacks {', '.join(missing)}",
            )
        )
    except Exception as err:
        out.append(Check("s3 Secret", False, f"{namespace}/{secret_name}: {_api_message(err)}"))
    return out
