"""Prometheus metrics of the service, summed over every uvicorn worker process whichever worker is scraped.

The metrics (label values are all bounded: model names, key names, error codes, route templates):

    llm_calls_total{model,key,outcome}          counter    upstream calls ended; outcome "ok" or the error code
    llm_tokens_total{model,key,kind}            counter    tokens the upstream counted; kind "prompt" or "completion"
    llm_request_duration_seconds{route}         histogram  whole HTTP requests, by route template (not raw path)
    llm_upstream_latency_seconds{model}         histogram  an upstream call to its whole answer (streams: the end)
    llm_time_to_first_token_seconds{model}      histogram  streams: an upstream call to its first token
    llm_streams_in_flight                       gauge      streams open now, summed over the live processes
    llm_rate_limit_rejections_total{key,kind}   counter    calls a key's limits refused; kind "rate" or "budget"
    llm_ledger_rows_dropped_total               counter    usage rows the ledger had to drop
    llm_redis_errors_total                      counter    Redis operations that failed (limits fell back)

`key` is the service key's *name* (core/keys.py), never the key; an open service (no keys) records the name of
`keys.ANONYMOUS`, "anonymous".

Several processes, one answer
-----------------------------
`uvicorn --workers N` runs N processes; a scrape reaches one of them and must report the sum over all. So the
metrics always run in prometheus-client's multiprocess mode (one code path, one process or many): each process
writes its values to memory-mapped files in one shared directory, and a scrape merges every file there.

The directory (`choose_metrics_directory`): PROMETHEUS_MULTIPROC_DIR or METRICS_DIR when set (never removed, only
swept); else, in a worker spawned by uvicorn's supervisor (which never imports the app), `<tmp>/llm-service-metrics/
<supervisor pid>`, shared by that supervisor's workers; else, in a single process, `<tmp>/llm-service-metrics/
<own pid>`, which that process removes at shutdown. On startup, files of processes that no longer exist are removed
(a replacement worker must not bring a dead one's `llm_streams_in_flight` back; a dead worker's counters go with
it, which Prometheus reads as a counter reset), and so are the directories of supervisors and single processes that
no longer exist (no worker can tell it is the last to stop, so a supervisor's directory waits for that sweep; a
single process killed before its shutdown too). At shutdown a process removes its live-gauge file
(`mark_process_dead`). The directory must be private to one host's processes: a pid from another host or container
would look dead and be swept.

prometheus-client picks multiprocess mode when it is first imported, from PROMETHEUS_MULTIPROC_DIR. This module
therefore imports it only inside functions, after exporting the variable (`prepare_metrics_directory`, which
`Metrics.open()` calls), so importing this module, or `main`, is always safe. What is not: importing
prometheus_client anywhere before the first `Metrics.open()`; `open()` then raises `MetricsSetupError` rather than
serve per-process numbers.

One set of metric objects per process, however many apps
--------------------------------------------------------
The files are per process, so the metric objects are too: the first open `Metrics` of a process builds them
(registered in no registry: a scrape reads the files, and two apps can never clash with "Duplicated timeseries"),
the last one to close tears them down, and a later `open()` in the same process (tests build many apps) starts a
new set. Apps open at the same time in one process share the set, and its numbers.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import shutil
import stat
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

if TYPE_CHECKING:
    from prometheus_client import Counter, Gauge, Histogram

MULTIPROC_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
DIRECTORY_ROOT_NAME = "llm-service-metrics"
OUTCOME_OK = "ok"
# From a fast cached answer (~50 ms) to a reasoning model's long stream (LLM_TIMEOUT_SECONDS defaults to 600).
LATENCY_BUCKETS_SECONDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)
_PROCESS_FILE_PID = re.compile(r"_(\d+)\.db$")


class MetricsSetupError(RuntimeError):
    """The metrics cannot be set up as configured; the message says what to change."""


@dataclass(frozen=True)
class MetricsDirectory:
    """Where this process's metric files go; `owned`: chosen for this single process, removed at its shutdown."""

    path: Path
    owned: bool


def metrics_root() -> Path:
    """Parent of the directories chosen when none is configured: one per supervisor or single process."""
    return Path(tempfile.gettempdir()) / DIRECTORY_ROOT_NAME


def choose_metrics_directory(
    *, environment: str | None, configured: Path | None, parent_pid: int | None, pid: int, root: Path
) -> MetricsDirectory:
    """The rule, free of the process: `environment` is an operator's PROMETHEUS_MULTIPROC_DIR, `configured` is
    METRICS_DIR, `parent_pid` the pid of the multiprocessing parent (uvicorn's supervisor) if there is one."""
    if environment and configured is not None and Path(environment) != configured:
        raise MetricsSetupError(
            f"{MULTIPROC_DIR_VARIABLE}={environment} and METRICS_DIR={configured} disagree: set one of them"
        )
    if environment:
        return MetricsDirectory(Path(environment), owned=False)
    if configured is not None:
        return MetricsDirectory(configured, owned=False)
    if parent_pid is not None:
        return MetricsDirectory(root / str(parent_pid), owned=False)
    return MetricsDirectory(root / str(pid), owned=True)


def prepare_metrics_directory(configured: Path | None = None) -> Path:
    """Choose this process's metrics directory and export it as PROMETHEUS_MULTIPROC_DIR (`Metrics.open()` creates
    it: a process that never records leaves nothing behind).

    Call it before anything imports prometheus_client, if something must; `Metrics.open()` calls it itself.
    """
    return _PROCESS.prepare(configured).path


class Metrics:
    """The service's metrics for one app: `open()` in the lifespan's startup, `close()` at its end.

    The recording methods raise `RuntimeError` unless the instance is open: a recording that went nowhere would
    hide a wiring bug.
    """

    def __init__(self, *, directory: Path | None = None) -> None:
        """`directory` is METRICS_DIR (PROMETHEUS_MULTIPROC_DIR, if set, must agree with it)."""
        self._configured = directory
        self._session: _Session | None = None

    def open(self) -> None:
        """Start recording (this process's first open builds the metric objects, sweeping stale files first)."""
        if self._session is not None:
            raise RuntimeError("these metrics are already open")
        self._session = _PROCESS.acquire(self._configured)

    def close(self) -> None:
        """Stop recording; the process's last close removes its live-gauge file (and its own directory). Idempotent,
        so a lifespan can call it in `finally`."""
        if self._session is None:
            return
        self._session = None
        _PROCESS.release()

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    @property
    def directory(self) -> Path:
        return self._open_session().directory.path

    def call_finished(
        self,
        *,
        model: str,
        key: str,
        outcome: str,
        prompt_tokens: int | None,
        completion_tokens: int | None,
        upstream_seconds: float,
        ttft_seconds: float | None,
    ) -> None:
        """An upstream call ended: `outcome` is "ok" or the error code; token counts and the time to the first
        token are None when the upstream gave none (a failed call, a batch answer)."""
        series = self._open_session().series
        # Label values by position, in the order the metrics declare them: keyword labels cost a sort per call.
        series.child(series.calls, model, key, outcome).inc()
        if prompt_tokens:
            series.child(series.tokens, model, key, "prompt").inc(prompt_tokens)
        if completion_tokens:
            series.child(series.tokens, model, key, "completion").inc(completion_tokens)
        series.child(series.upstream_latency, model).observe(upstream_seconds)
        if ttft_seconds is not None:
            series.child(series.time_to_first_token, model).observe(ttft_seconds)

    def request_finished(self, *, route: str, seconds: float) -> None:
        """An HTTP request ended; `route` is the route's template (`/api/v1/llm/chat`), so labels stay bounded."""
        series = self._open_session().series
        series.child(series.request_duration, route).observe(seconds)

    def stream_started(self) -> None:
        self._open_session().series.streams_in_flight.inc()

    def stream_ended(self) -> None:
        self._open_session().series.streams_in_flight.dec()

    def rate_limited(self, *, key: str, kind: str) -> None:
        """A key's limits refused a call: `kind` is "rate" (per minute) or "budget" (per day)."""
        self._open_session().series.rate_limit_rejections.labels(key=key, kind=kind).inc()

    def ledger_rows_dropped(self, count: int) -> None:
        self._open_session().series.ledger_rows_dropped.inc(count)

    def redis_error(self) -> None:
        self._open_session().series.redis_errors.inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition of every process's metrics, summed, and its content type: a fresh registry per scrape,
        holding only the collector of the directory's files (the metric objects are in no registry)."""
        from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        directory = self._open_session().directory.path
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
        # Names here are all classic ones, so the body is the same in every text format version: announce 0.0.4,
        # the version every scraper parses (CONTENT_TYPE_LATEST is 1.0.0, which older scrapers may refuse).
        return generate_latest(registry), CONTENT_TYPE_PLAIN_0_0_4

    def _open_session(self) -> _Session:
        if self._session is None:
            raise RuntimeError("metrics are not open: call Metrics.open() in the app's lifespan first")
        return self._session


@dataclass(frozen=True)
class _Series:
    calls: Counter
    tokens: Counter
    request_duration: Histogram
    upstream_latency: Histogram
    time_to_first_token: Histogram
    streams_in_flight: Gauge
    rate_limit_rejections: Counter
    ledger_rows_dropped: Counter
    redis_errors: Counter
    # Each labelled child once: `labels()` validates and locks on every call, several times per request. Label
    # values are bounded (models, keys, outcomes, route templates), and so is this.
    children: dict[tuple[int, tuple[str, ...]], Any] = field(default_factory=dict)

    def child(self, metric: Counter | Histogram, *values: str) -> Any:
        key = (id(metric), values)
        found = self.children.get(key)
        if found is None:
            found = self.children[key] = metric.labels(*values)
        return found


@dataclass(frozen=True)
class _Session:
    directory: MetricsDirectory
    series: _Series
    # PROMETHEUS_MULTIPROC_DIR was set by this module (it was unset), not by an operator.
    exported: bool


class _Process:
    """This process's metrics: the directory and the metric objects, shared by every open `Metrics`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders = 0
        self._session: _Session | None = None
        # Every value this module gave PROMETHEUS_MULTIPROC_DIR, to tell them from one an operator set (a test's
        # monkeypatch may put back one of ours after a session removed it).
        self._exported: set[str] = set()

    def prepare(self, configured: Path | None) -> MetricsDirectory:
        with self._lock:
            directory = self._directory_for(configured)
            self._export(directory)
            return directory

    def acquire(self, configured: Path | None) -> _Session:
        with self._lock:
            if self._session is None:
                self._session = self._start(configured)
            elif self._choose(configured) != self._session.directory:
                raise MetricsSetupError(
                    f"this process already records its metrics in {self._session.directory.path}: apps open at the "
                    "same time in one process must use the same metrics directory"
                )
            self._holders += 1
            return self._session

    def release(self) -> None:
        with self._lock:
            self._holders -= 1
            if self._holders > 0 or self._session is None:
                return
            session, self._session = self._session, None
            self._end(session)

    def _operator_directory(self) -> str | None:
        current = os.environ.get(MULTIPROC_DIR_VARIABLE)
        return current if current and current not in self._exported else None

    def _choose(self, configured: Path | None) -> MetricsDirectory:
        parent = multiprocessing.parent_process()
        return choose_metrics_directory(
            environment=self._operator_directory(),
            configured=configured,
            parent_pid=parent.pid if parent is not None else None,
            pid=os.getpid(),
            root=metrics_root(),
        )

    def _directory_for(self, configured: Path | None) -> MetricsDirectory:
        directory = self._choose(configured)
        if self._session is not None and directory != self._session.directory:
            raise MetricsSetupError(f"this process already records its metrics in {self._session.directory.path}")
        return directory

    def _export(self, directory: MetricsDirectory) -> bool:
        """Point PROMETHEUS_MULTIPROC_DIR at `directory` unless an operator set it; whether it was set here."""
        if self._operator_directory() is not None:
            return False
        # prometheus-client reads the variable at import (to pick multiprocess mode) and whenever it opens a file.
        os.environ[MULTIPROC_DIR_VARIABLE] = str(directory.path)
        self._exported.add(str(directory.path))
        return True

    def _start(self, configured: Path | None) -> _Session:
        directory = self._directory_for(configured)
        _create_directory(directory.path)
        exported = self._export(directory)
        _require_multiprocess_mode()
        _sweep(directory)
        return _Session(directory=directory, series=_build_series(), exported=exported)

    def _end(self, session: _Session) -> None:
        from prometheus_client import values
        from prometheus_client.multiprocess import mark_process_dead

        # The library keeps this process's files open (and mapped) for good: without this, a later session in the
        # process (tests build many apps) would go on writing to files removed below, which no scrape sees. The
        # metric objects go with the session, and the next one opens new files. (`close_all_files` is public but
        # not in the docs, and new in prometheus-client 0.26: the unit tests of a later session guard it.)
        values.ValueClass.close_all_files()
        mark_process_dead(os.getpid(), str(session.directory.path))  # type: ignore[no-untyped-call]
        if session.directory.owned:
            _remove_tree(session.directory.path)
        if session.exported:
            # Processes this one starts later (a test's servers) must not inherit a directory chosen for it.
            os.environ.pop(MULTIPROC_DIR_VARIABLE, None)


_PROCESS = _Process()


def _require_multiprocess_mode() -> None:
    from prometheus_client import values

    if values.ValueClass is values.MutexValue:
        raise MetricsSetupError(
            "prometheus_client was imported before PROMETHEUS_MULTIPROC_DIR was set, so each process would report "
            "only its own numbers: import it only after Metrics.open() (or prepare_metrics_directory())"
        )


def _build_series() -> _Series:
    from prometheus_client import Counter, Gauge, Histogram

    # registry=None: the values live in the directory's files, and a scrape reads those; registering in the
    # default registry would only make a second app in the process fail with "Duplicated timeseries".
    def histogram(name: str, documentation: str, label: str) -> Histogram:
        return Histogram(name, documentation, [label], buckets=LATENCY_BUCKETS_SECONDS, registry=None)

    return _Series(
        calls=Counter(
            "llm_calls_total",
            "Upstream calls ended, by outcome (ok or the error code).",
            ["model", "key", "outcome"],
            registry=None,
        ),
        tokens=Counter(
            "llm_tokens_total",
            "Tokens the upstream counted (prompt or completion).",
            ["model", "key", "kind"],
            registry=None,
        ),
        request_duration=histogram("llm_request_duration_seconds", "Whole HTTP requests, by route.", "route"),
        upstream_latency=histogram(
            "llm_upstream_latency_seconds", "Upstream calls, to the whole answer or the end of the stream.", "model"
        ),
        time_to_first_token=histogram(
            "llm_time_to_first_token_seconds", "Streams: upstream call to the first token.", "model"
        ),
        streams_in_flight=Gauge(
            "llm_streams_in_flight",
            "Streams open now, over every live process.",
            multiprocess_mode="livesum",
            registry=None,
        ),
        rate_limit_rejections=Counter(
            "llm_rate_limit_rejections_total",
            "Calls refused by a key's limits (rate or budget).",
            ["key", "kind"],
            registry=None,
        ),
        ledger_rows_dropped=Counter("llm_ledger_rows_dropped_total", "Usage rows the ledger dropped.", registry=None),
        redis_errors=Counter("llm_redis_errors_total", "Redis operations that failed.", registry=None),
    )


def _create_directory(path: Path) -> None:
    root = metrics_root()
    if path.parent != root:
        path.mkdir(parents=True, exist_ok=True)
        return
    # The shared temp dir is writable by everyone: the root must be this user's own real directory, or another user
    # could plant (or read) the files behind our metrics.
    root.mkdir(mode=0o700, exist_ok=True)
    info = root.lstat()
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise MetricsSetupError(f"{root} is not a directory of this user's own: set METRICS_DIR to one that is")
    path.mkdir(mode=0o700, exist_ok=True)


def _sweep(directory: MetricsDirectory) -> None:
    from prometheus_client.multiprocess import mark_process_dead

    pid = os.getpid()
    if directory.owned:
        # Named after this process and made before it: whatever is there was left by a dead process with our pid.
        for leftover in directory.path.iterdir():
            if leftover.is_dir():
                _remove_tree(leftover)
            else:
                leftover.unlink(missing_ok=True)
    else:
        for file in directory.path.glob("*.db"):
            owner = _file_pid(file.name)
            if owner is not None and owner != pid and not _process_exists(owner):
                file.unlink(missing_ok=True)
        # Live gauges a dead process with our pid left (the library would read them back as ours); counters with
        # our pid are kept, and continued.
        mark_process_dead(pid, str(directory.path))  # type: ignore[no-untyped-call]
    root = metrics_root()
    if directory.path.parent == root:
        for sibling in root.iterdir():
            if sibling.name.isdigit() and sibling != directory.path and not _process_exists(int(sibling.name)):
                _remove_tree(sibling)


def _file_pid(name: str) -> int | None:
    match = _PROCESS_FILE_PID.search(name)
    return int(match.group(1)) if match else None


def _process_exists(pid: int) -> bool:
    if pid <= 0:
        # Not a process: os.kill would signal a whole process group.
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        # Another user's process: it exists.
        return True
    return True


def _remove_tree(path: Path) -> None:
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        # Another worker starting at the same moment swept it first: it is gone either way.
        return
