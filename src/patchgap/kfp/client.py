"""The KFP client side: submit a compiled pipeline, follow its runs, manage recurring runs, and
the preflight checks (``doctor``) that must pass before any GPU time is spent. Talks to a KFP API
server through ``kfp.Client``; nothing here runs on the cluster.

Every call to the API goes through :func:`_calling`, which keeps ``kfp.Client``'s own prints,
logs and warnings off the terminal and turns any failure (refused, unreachable, TLS, 401, 403,
unknown run) into one :class:`~patchgap.errors.PatchgapError` line naming the host and the fix.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import io
import logging
import math
import os
import re
import ssl
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from patchgap.args import split_key_value
from patchgap.config import safe_load_yaml
from patchgap.errors import ConfigError, PatchgapError

log = logging.getLogger("patchgap.kfp")

KFP_HOST_ENV = "KF_PIPELINES_ENDPOINT"
KFP_TOKEN_ENV = "KFP_TOKEN"
# A CA bundle for a KFP host whose certificate a private CA signed (as for OpenSSL).
CA_BUNDLE_ENV = "SSL_CERT_FILE"

# kfp.Client sets no timeout at all: a host that drops packets would hang a command forever.
CONNECT_TIMEOUT_S = 10.0
# A submit uploads the whole pipeline spec; the API server answers that within seconds.
READ_TIMEOUT_S = 60.0
# A refused or timed-out connection is tried once more (an API server restarting); a request
# that reached the server is never resent (a submit could run twice).
CONNECT_RETRIES = 1


# -- compiled pipelines and their parameters ---------------------------------------------------


def package_file(path: str | Path) -> Path:
    """A compiled pipeline YAML that must exist (names are resolved by
    :func:`patchgap.pipelines.compile.pipeline_package`)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"pipeline package {p}: not a file")
    return p


@dataclass(frozen=True)
class PipelineInput:
    """One parameter a compiled pipeline declares (root ``inputDefinitions``)."""

    name: str
    type: str  # STRING, NUMBER_INTEGER, NUMBER_DOUBLE, BOOLEAN, STRUCT, LIST
    required: bool


_TYPE_WORDS = {
    "STRING": "a string",
    "NUMBER_INTEGER": "an integer",
    "NUMBER_DOUBLE": "a number",
    "BOOLEAN": "true or false",
    "STRUCT": 'a mapping (JSON or YAML, e.g. \'{"k": "v"}\')',
    "LIST": "a list (JSON or YAML, e.g. '[1, 2]')",
}


def pipeline_inputs(package: str | Path) -> dict[str, PipelineInput]:
    """The parameters ``package`` (a compiled pipeline YAML) declares, by name."""
    import yaml

    path = package_file(package)
    try:
        # libyaml's loader where present: a compiled pipeline is 100 kB of YAML.
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        text = path.read_text(encoding="utf-8")
        # The compiler writes no aliases; one in a package given by path could expand without
        # bound (a "billion laughs"), so it is refused while still only events are parsed.
        for event in yaml.parse(text, Loader=loader):
            if isinstance(event, yaml.AliasEvent):
                raise ConfigError(f"pipeline package {path}: YAML aliases are not allowed")
        spec = next(yaml.load_all(text, Loader=loader), None)
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"pipeline package {path}: not readable YAML ({err})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("root"), dict):
        raise ConfigError(
            f"pipeline package {path}: not a compiled KFP pipeline (no root); "
            "compile one with `patchgap compile`"
        )
    declared = (spec["root"].get("inputDefinitions") or {}).get("parameters") or {}
    return {
        name: PipelineInput(
            name=name,
            type=str(d.get("parameterType", "STRING")),
            required="defaultValue" not in d and not d.get("isOptional", False),
        )
        for name, d in declared.items()
    }


def parse_params(items: list[str] | None) -> dict[str, str]:
    """``KEY=VALUE`` pipeline parameters as given; :func:`typed_params` reads the values."""
    out: dict[str, str] = {}
    for item in items or []:
        key, value = split_key_value(item, "-p")
        out[key] = value
    return out


def typed_params(
    package: str | Path, raw: Mapping[str, str], base: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Read ``-p`` values as the types ``package`` declares (a STRING stays text even when it
    looks like a number or JSON) over ``base`` (typed values, e.g. from a run YAML); an unknown
    name, a value of the wrong type or a required parameter left out is refused."""
    inputs = pipeline_inputs(package)
    out: dict[str, Any] = dict(base or {})
    for key, text in raw.items():
        spec = _declared(inputs, key, package)
        want = spec.type
        value: Any = text
        try:
            if want == "NUMBER_INTEGER":
                value = int(text)
            elif want == "NUMBER_DOUBLE":
                value = float(text)
                if not math.isfinite(value):
                    raise ValueError(text)
            elif want == "BOOLEAN":
                value = {"true": True, "false": False}[text.strip().lower()]
            elif want in ("STRUCT", "LIST") or want not in _TYPE_WORDS:
                value = safe_load_yaml(text, f"-p {key}") if text else ""
        except (ValueError, KeyError, ConfigError):
            raise ConfigError(_type_error(key, text, spec, package)) from None
        out[key] = value
    check_params(package, out, inputs)
    return out


def check_params(
    package: str | Path,
    params: Mapping[str, Any],
    inputs: Mapping[str, PipelineInput] | None = None,
) -> None:
    """Refuse, before any request, a parameter ``package`` does not declare, a value of another
    type than declared, and a required parameter left out."""
    inputs = pipeline_inputs(package) if inputs is None else inputs
    for key, value in params.items():
        spec = _declared(inputs, key, package)
        if not _fits(spec.type, value):
            raise ConfigError(_type_error(key, value, spec, package))
    missing = [i.name for i in inputs.values() if i.required and i.name not in params]
    if missing:
        flags = " ".join(f"-p {m}=..." for m in missing)
        raise ConfigError(
            f"pipeline {Path(package).name}: required parameter{'s' * (len(missing) > 1)} "
            f"{', '.join(missing)} not given; pass {flags}"
        )


def _declared(inputs: Mapping[str, PipelineInput], key: str, package: str | Path) -> PipelineInput:
    if key in inputs:
        return inputs[key]
    close = difflib.get_close_matches(key, list(inputs), n=1)
    hint = (
        f"; did you mean {close[0]!r}?"
        if close
        else f"; it takes {', '.join(sorted(inputs))}"
        if inputs
        else "; it takes no parameters"
    )
    raise ConfigError(f"-p {key}: pipeline {Path(package).name} has no parameter {key!r}{hint}")


def _fits(kind: str, value: Any) -> bool:
    if kind == "STRING":
        return isinstance(value, str)
    if kind == "NUMBER_INTEGER":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "NUMBER_DOUBLE":
        # JSON carries no NaN or infinity, and KFP's API would refuse the request.
        number = isinstance(value, int | float) and not isinstance(value, bool)
        return number and math.isfinite(value)
    if kind == "BOOLEAN":
        return isinstance(value, bool)
    if kind == "STRUCT":
        return isinstance(value, dict)
    if kind == "LIST":
        return isinstance(value, list)
    return True  # a type this client does not know: the server decides


def _type_error(key: str, value: Any, spec: PipelineInput, package: str | Path) -> str:
    word = _TYPE_WORDS.get(spec.type, spec.type)
    return f"-p {key}={value!s}: pipeline {Path(package).name} expects {word} ({spec.type})"


# -- schedules ---------------------------------------------------------------------------------

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


# -- talking to the API ------------------------------------------------------------------------


@dataclass
class KfpTarget:
    """Where and as whom to talk to KFP."""

    host: str | None = None
    namespace: str | None = None
    existing_token: str | None = None
    verify_ssl: bool | None = None

    @property
    def url(self) -> str:
        """The API endpoint (``--host`` or ``KF_PIPELINES_ENDPOINT``), with its scheme."""
        host = (self.host or os.environ.get(KFP_HOST_ENV) or "").strip().rstrip("/")
        if not host:
            raise ConfigError(f"no KFP host: pass --host or set {KFP_HOST_ENV}")
        if not host.startswith(("http://", "https://")):
            raise ConfigError(
                f"KFP host {host!r}: give the scheme, e.g. https://{host} (or http:// for a "
                "port-forward)"
            )
        return host

    @property
    def token(self) -> str | None:
        return self.existing_token or os.environ.get(KFP_TOKEN_ENV) or None

    def client(self) -> Any:
        """A ``kfp.Client`` with timeouts; it contacts the host already (its health check)."""
        host = self.url
        kwargs: dict[str, Any] = {"host": host, "existing_token": self.token}
        if self.namespace:
            kwargs["namespace"] = self.namespace
        if self.verify_ssl is not None:
            kwargs["verify_ssl"] = self.verify_ssl
        # kfp's HTTP client trusts certifi's CAs alone, not OpenSSL's SSL_CERT_FILE.
        if os.environ.get(CA_BUNDLE_ENV):
            kwargs["ssl_ca_cert"] = os.environ[CA_BUNDLE_ENV]
        with _calling(self, "health check"):
            client = _client_class()(**kwargs)
            _with_limits(client._healthz_api.api_client)
        return client

    def ui_link(self, run_id: str) -> str:
        host = (self.host or os.environ.get(KFP_HOST_ENV) or "").rstrip("/")
        return f"{host}/#/runs/details/{run_id}"


@functools.cache
def _client_class() -> type:
    """``kfp.Client`` whose health check tries once: the SDK's tries five times 5 s apart,
    logging a traceback each time, whatever the error (a 401 or a TLS error included), and calls
    it from ``__init__``."""
    import kfp

    class Client(kfp.Client):
        def get_kfp_healthz(self, sleep_duration: int = 5) -> Any:  # noqa: ARG002
            _with_limits(self._healthz_api.api_client)
            return self._healthz_api.healthz_service_get_healthz()

    return Client


def _with_limits(api_client: Any) -> None:
    """Give the generated API client (shared by all of kfp.Client's services) timeouts and a
    small connection retry budget; kfp.Client has no setting for either."""
    import urllib3
    from kfp_server_api import rest

    if getattr(api_client.rest_client, "_patchgap_limits", False):
        return

    class TimedRest(rest.RESTClientObject):
        _patchgap_limits = True

        def request(self, *args: Any, _request_timeout: Any = None, **kwargs: Any) -> Any:
            limit = _request_timeout or (CONNECT_TIMEOUT_S, READ_TIMEOUT_S)
            return super().request(*args, _request_timeout=limit, **kwargs)

    api_client.configuration.retries = urllib3.Retry(
        total=None,
        connect=CONNECT_RETRIES,
        read=0,
        other=0,  # TLS and protocol errors do not heal on a retry
        redirect=5,
        backoff_factor=0.5,
    )
    api_client.rest_client = TimedRest(api_client.configuration)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep kfp.Client's prints (links on stdout), logs (tracebacks through the root and urllib3
    loggers) and warnings off the terminal: the user gets our result or our one error line."""
    root = logging.getLogger()
    # kfp logs through logging.info() & co., which install a stderr handler on a bare root
    # logger for good; a handler of our own in the meantime keeps the root bare afterwards.
    guard = logging.NullHandler()
    bare = not root.handlers
    if bare:
        root.addHandler(guard)
    disabled = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(disabled)
        if bare:
            root.removeHandler(guard)


@contextlib.contextmanager
def _calling(
    target: KfpTarget, doing: str, missing: str | None = None, listed_by: str | None = None
) -> Iterator[None]:
    """Run KFP client calls quietly; any failure becomes one PatchgapError line. ``doing`` says
    what was asked; ``missing`` names the object a 404 means is absent (``KFP run r-1``) and
    ``listed_by`` the command that lists those objects."""
    try:
        with _quiet():
            yield
    except PatchgapError:
        raise
    except Exception as err:  # the SDK raises many types; the user needs one line
        raise PatchgapError(_one_line(_failure(err, target, doing, missing, listed_by))) from err


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _causes(err: BaseException) -> list[BaseException]:
    """``err`` and what it wraps (urllib3's ``reason``, ``__cause__``, ``__context__``)."""
    out: list[BaseException] = []
    todo = [err]
    while todo:
        e = todo.pop(0)
        if e is None or any(e is seen for seen in out):
            continue
        out.append(e)
        reason = getattr(e, "reason", None)
        todo += [r for r in (reason, e.__cause__, e.__context__) if isinstance(r, BaseException)]
    return out


def _server_message(err: BaseException) -> str:
    """The message in a KFP error body (``{"error": ..., "message": ...}``), if any."""
    import json

    body = getattr(err, "body", None)
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if not isinstance(body, str) or not body.strip():
        return ""
    try:
        data = json.loads(body)
    except ValueError:
        return ""  # an HTML page from a proxy says nothing a user can act on
    if not isinstance(data, dict):
        return ""
    return str(data.get("message") or data.get("error") or "").strip()


def _failure(
    err: BaseException,
    target: KfpTarget,
    doing: str,
    missing: str | None,
    listed_by: str | None,
) -> str:
    host = target.url
    status = getattr(err, "status", None)
    if isinstance(status, int) and status > 0:
        reason = str(getattr(err, "reason", None) or "")
        said = _server_message(err)
        said = f" ({said})" if said and said.lower() != reason.lower() else ""
        if status == 401:
            fix = (
                f"the token ({KFP_TOKEN_ENV}) was not accepted; get a fresh one"
                if target.token
                else f"set {KFP_TOKEN_ENV} to a bearer token for this host"
            )
            return f"KFP host {host}: {doing}: HTTP 401 Unauthorized{said}; {fix}"
        if status == 403:
            return (
                f"KFP host {host}: {doing}: HTTP 403 Forbidden{said}; check that --namespace "
                f"names a profile your token ({KFP_TOKEN_ENV}) may use"
            )
        if status == 404 and missing:
            where = f" in namespace {target.namespace}" if target.namespace else ""
            hint = f"; see `{listed_by}`" if listed_by else ""
            return f"{missing} not found on KFP host {host}{where}{hint}"
        if status == 404:
            return (
                f"KFP host {host}: {doing}: HTTP 404 Not Found{said}; is --host the KFP API "
                "endpoint (the ml-pipeline-ui service or its port-forward)?"
            )
        return f"KFP host {host}: {doing}: HTTP {status} {reason}{said}".strip()
    # Below HTTP the request never reached the API: what was asked does not matter.
    return f"KFP host {host}: {_connection_problem(err, host)}"


def _connection_problem(err: BaseException, host: str) -> str:
    """What went wrong below HTTP, and what to check."""
    import socket
    from http.client import RemoteDisconnected

    from urllib3 import exceptions as u3

    chain = _causes(err)

    def found(*types: type) -> BaseException | None:
        return next((e for e in chain if isinstance(e, types)), None)

    # kfp_server_api turns an SSLError it sees directly into ApiException(status=0, "SSLError").
    said = [str(getattr(e, "reason", "")) for e in chain]
    tls_text = next((text for text in said if "SSLError" in text), "")
    tls = found(ssl.SSLError, u3.SSLError)
    if tls is not None or tls_text:
        text = tls_text or str(tls)
        if "WRONG_VERSION_NUMBER" in text or "wrong version number" in text:
            return "TLS handshake failed: the server does not speak TLS; use http:// for it"
        if "CERTIFICATE_VERIFY_FAILED" in text:
            why = text.split("certificate verify failed:", 1)[-1].split("(_ssl", 1)[0].strip()
            return (
                f"TLS certificate not trusted ({why or 'verify failed'}); use the host name it "
                f"is issued for, or point {CA_BUNDLE_ENV} at the CA certificate that signed it"
            )
        return f"TLS error ({_one_line(text, 160)})"
    if found(u3.NameResolutionError, socket.gaierror) is not None:
        name = urlsplit(host).hostname or host
        return f"cannot resolve host name {name!r}; check --host (or {KFP_HOST_ENV})"
    if found(ConnectionRefusedError) is not None:
        return (
            f"connection refused: nothing listens there; check --host (or {KFP_HOST_ENV}) and "
            "that the KFP API, or a port-forward to it, is running"
        )
    if found(u3.ConnectTimeoutError) is not None:
        tries = CONNECT_RETRIES + 1
        return (
            f"unreachable (no connection within {CONNECT_TIMEOUT_S:g} s, {tries} tries); "
            "check --host, the network or VPN, and the port-forward"
        )
    if found(u3.ReadTimeoutError, TimeoutError) is not None:
        return (
            f"no answer within {READ_TIMEOUT_S:g} s; the API server may be overloaded "
            "(a submit may still have been accepted: see `patchgap runs list`)"
        )
    if found(RemoteDisconnected, ConnectionResetError, u3.ProtocolError) is not None:
        return (
            "the connection was closed without an answer; is --host an HTTP(S) endpoint of the "
            "KFP API?"
        )
    return _one_line(f"{type(err).__name__}: {err}", 200)


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
    """Submit one run of a compiled pipeline; returns its id and UI link. The parameters are
    checked against the pipeline's declared inputs before the host is contacted."""
    package = package_file(pipeline)
    check_params(package, params or {})
    client = target.client()
    with _calling(target, f"submit of {package.name}"):
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
    with _calling(target, f"run {run_id}", f"KFP run {run_id}", "patchgap runs list"):
        run = client.get_run(run_id)
    return _status(target, run)


def _experiment_id(client: Any, target: KfpTarget, experiment: str | None) -> str | None:
    if not experiment:
        return None
    with _calling(target, f"experiment {experiment!r}"):
        try:
            found = client.get_experiment(experiment_name=experiment, namespace=target.namespace)
        except ValueError:  # kfp's way of saying that no experiment has that name
            raise PatchgapError(
                f"KFP experiment {experiment!r} not found on {target.url}"
                + (f" in namespace {target.namespace}" if target.namespace else "")
            ) from None
    return found.experiment_id


def list_runs(target: KfpTarget, experiment: str | None = None, limit: int = 20) -> list[RunStatus]:
    """The newest ``limit`` runs (optionally one experiment's), newest first."""
    client = target.client()
    exp_id = _experiment_id(client, target, experiment)
    with _calling(target, "list of runs"):
        resp = client.list_runs(
            experiment_id=exp_id,
            namespace=target.namespace,
            page_size=limit,
            sort_by="created_at desc",
        )
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
            # A day-long wait rides out API server restarts (5xx, refused), but a wrong id,
            # token or certificate does not heal, and neither does a host never reached.
            heals = (code is not None and code >= 500) or (code is None and last is not None)
            if not heals or failures > WAIT_RETRIES:
                raise
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
    check_params(package, sched.params)
    client = target.client()
    with _calling(target, f"schedule {sched.name!r}"):
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
    return rr.recurring_run_id


def list_schedules(target: KfpTarget, experiment: str | None = None) -> list[dict[str, Any]]:
    """Recurring runs visible to this namespace (optionally one experiment's)."""
    client = target.client()
    exp_id = _experiment_id(client, target, experiment)
    with _calling(target, "list of recurring runs"):
        resp = client.list_recurring_runs(
            experiment_id=exp_id, namespace=target.namespace, page_size=100
        )
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


SCHEDULE_ACTIONS = ("enable", "disable", "delete")


def set_schedule_state(target: KfpTarget, recurring_run_id: str, action: str) -> None:
    """``enable``, ``disable`` or ``delete`` one recurring run."""
    if action not in SCHEDULE_ACTIONS:
        raise ConfigError(f"unknown schedule action {action!r}")
    client = target.client()
    fn = {
        "enable": client.enable_recurring_run,
        "disable": client.disable_recurring_run,
        "delete": client.delete_recurring_run,
    }[action]
    doing = f"{action} of recurring run {recurring_run_id}"
    missing = f"KFP recurring run {recurring_run_id}"
    with _calling(target, doing, missing, "patchgap schedule list"):
        fn(recurring_run_id)


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
    checks = _s3_checks(bucket)
    if target is not None and (target.host or os.environ.get(KFP_HOST_ENV)):
        try:
            client = target.client()
            with _calling(target, "health check"):
                health = client.get_kfp_healthz()
            multi = getattr(health, "multi_user", "?")
            checks.append(Check("kfp host", True, f"{target.url} healthy (multi_user={multi})"))
        except PatchgapError as err:
            checks.append(Check("kfp host", False, str(err)))
    else:
        checks.append(Check("kfp host", None, f"no host given (--host or {KFP_HOST_ENV})"))

    checks.extend(_kube_checks(namespace, secret_name, kube_context))
    return checks


# Codes with which S3 refuses the credentials themselves (not a bucket policy: AccessDenied).
_BAD_KEY_CODES = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"}
)


def s3_credentials(settings: Any) -> tuple[str | None, str]:
    """Where the store's S3 credentials come from, resolved as its boto3 client resolves them
    (explicit keys from the environment or the embedded server's env file, else boto3's provider
    chain: profile, shared files, web identity, container or instance role). Returns
    ``(source, detail)``; ``source`` is None when there are none, and ``detail`` says why."""
    key, secret = settings.access_key_id, settings.secret_access_key
    if key and secret:
        return settings.source, f"access key {key[:4]}... from {settings.source}"
    if key or secret:
        given, lacking = (
            ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
            if key
            else ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID")
        )
        return None, f"{given} is set ({settings.source}) but {lacking} is not"
    import boto3
    from botocore.exceptions import BotoCoreError

    try:
        found = boto3.session.Session().get_credentials()
    except BotoCoreError as err:
        return None, f"no usable S3 credentials: {err}"
    if found is None:
        return None, (
            "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or start the "
            "embedded server: patchgap store up"
        )
    method = getattr(found, "method", None) or "provider chain"
    return f"boto3 {method}", f"from boto3's provider chain ({method})"


def _s3_checks(bucket: str) -> list[Check]:
    """The credentials row and the bucket row, from one answer to "are there credentials, and
    from where": the bucket is only listed with credentials, and credentials the endpoint
    refuses fail their own row, not just the bucket's."""
    # Deferred: kept out of the CLI's start-up.
    from patchgap.storage.store import Store

    uri = f"s3://{bucket}/"
    try:
        store = Store.from_env()
        source, detail = s3_credentials(store.settings)
    except PatchgapError as err:
        return [
            Check("s3 credentials", False, str(err)),
            Check("s3 bucket", None, f"{uri} not checked: S3 settings invalid"),
        ]
    if source is None:
        return [
            Check("s3 credentials", False, detail),
            Check("s3 bucket", None, f"{uri} not checked: no S3 credentials"),
        ]
    endpoint = store.settings.endpoint_url or "AWS default"
    try:
        store.list(uri)
    except PatchgapError as err:
        if _credentials_refused(err):
            return [
                Check("s3 credentials", False, f"{detail}, refused by {endpoint}: {err}"),
                Check("s3 bucket", None, f"{uri} not checked: credentials refused"),
            ]
        return [
            Check("s3 credentials", True, f"{detail}; endpoint {endpoint}"),
            Check("s3 bucket", False, str(err)),
        ]
    return [
        Check("s3 credentials", True, f"{detail}; endpoint {endpoint}"),
        Check("s3 bucket", True, f"s3://{bucket} is readable"),
    ]


def _credentials_refused(err: BaseException) -> bool:
    """Whether a store error came from credentials that are absent or refused (the store raises
    its one-line errors from inside the handler, so the botocore error is the context)."""
    from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

    cause = err.__context__
    if isinstance(cause, NoCredentialsError | PartialCredentialsError):
        return True
    if isinstance(cause, ClientError):
        return str(cause.response.get("Error", {}).get("Code", "")) in _BAD_KEY_CODES
    return False


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
    # The Secret the launcher names (secretRef), with the keys it reads; the stages read
    # AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY from --secret, the compiled pipelines' Secret.
    launcher_ref: tuple[str, list[str]] | None = None
    try:
        cm = v1.read_namespaced_config_map("kfp-launcher", namespace)
        credentials = _launcher_credentials((cm.data or {}).get("providers", ""))
        ref = credentials.get("secretRef")
        from_env = credentials.get("fromEnv") is True and ref is None
        if isinstance(ref, dict) and ref.get("secretName"):
            keys = [str(ref.get(k) or "") for k in ("accessKeyKey", "secretKeyKey")]
            launcher_ref = (str(ref["secretName"]), [k for k in keys if k])
        if from_env:
            check = Check(
                "kfp-launcher ConfigMap",
                True,
                "s3 provider takes credentials from the pod (fromEnv: true)",
            )
        elif launcher_ref is not None:
            check = Check(
                "kfp-launcher ConfigMap",
                True,
                f"s3 provider reads credentials from Secret {namespace}/{launcher_ref[0]}",
            )
        elif "secretRef" in str(cm.data):
            check = Check("kfp-launcher ConfigMap", True, "s3 provider override with a secretRef")
        else:
            check = Check("kfp-launcher ConfigMap", False, "no s3 provider credentials configured")
        out.append(check)
    except Exception as err:
        out.append(
            Check("kfp-launcher ConfigMap", False, f"{namespace}/kfp-launcher: {_api_message(err)}")
        )
    if from_env:
        # IRSA, Workload Identity: the launcher and the stages use the pod's provider chain.
        out.append(Check("s3 Secret", None, "not used: kfp-launcher has fromEnv: true"))
        return out
    stage_keys = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]
    if launcher_ref is not None and launcher_ref[0] == secret_name:
        out.append(
            _secret_check(v1, "s3 Secret", namespace, secret_name, stage_keys + launcher_ref[1])
        )
        return out
    out.append(_secret_check(v1, "s3 Secret", namespace, secret_name, stage_keys))
    if launcher_ref is not None:
        name, keys = launcher_ref
        out.append(_secret_check(v1, "kfp-launcher s3 Secret", namespace, name, keys))
    return out


def _secret_check(v1: Any, row: str, namespace: str, name: str, keys: list[str]) -> Check:
    """Whether Secret ``namespace/name`` exists and holds ``keys``."""
    try:
        sec = v1.read_namespaced_secret(name, namespace)
    except Exception as err:
        return Check(row, False, f"{namespace}/{name}: {_api_message(err)}")
    missing = sorted(set(keys) - set((sec.data or {}).keys()))
    if missing:
        return Check(row, False, f"{namespace}/{name} lacks {', '.join(missing)}")
    return Check(row, True, f"{namespace}/{name} has {', '.join(sorted(set(keys)))}")
