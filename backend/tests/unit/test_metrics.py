"""Metrics: each recording moves its series and no other, apps in one process share one set of metric objects,
the directory rule, and the sweep of files left by processes that no longer exist.

prometheus_client is imported only inside helpers that run after a `Metrics.open()`: imported first, it would
pick single-process mode for this whole test process (see src/core/metrics.py).
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager

from src.core.metrics import (
    DIRECTORY_ROOT_NAME,
    LATENCY_BUCKETS_SECONDS,
    MULTIPROC_DIR_VARIABLE,
    Metrics,
    MetricsDirectory,
    MetricsSetupError,
    choose_metrics_directory,
    prepare_metrics_directory,
)
from src.devtools.servers import BACKEND_DIR, clean_environment
from tests.e2e import metrics_app

# Larger than any pid Linux can hand out (PID_MAX_LIMIT is 2**22): a process that certainly does not exist.
NEVER_A_PID = 2**22 + 1
CHILD_WAIT_SECONDS = 30.0
Series = tuple[str, frozenset[tuple[str, str]]]

# A process that records one call and opens one stream, then (with "stay") lives until its stdin closes; it never
# closes its metrics, like a worker that was killed.
RECORDING_CHILD = """
import sys
from pathlib import Path
from src.core.metrics import Metrics
metrics = Metrics(directory=Path(sys.argv[1]))
metrics.open()
metrics.call_finished(
    model="m", key="k", outcome="ok", prompt_tokens=None, completion_tokens=None, upstream_seconds=0.1,
    ttft_seconds=None,
)
metrics.stream_started()
print("recorded", flush=True)
if sys.argv[2] == "stay":
    sys.stdin.read()
"""


@pytest.fixture(autouse=True)
def private_temp_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Default directories go under this test's tmp_path, and no PROMETHEUS_MULTIPROC_DIR from the shell applies."""
    monkeypatch.delenv(MULTIPROC_DIR_VARIABLE, raising=False)
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    return temp


@pytest.fixture
def metrics(tmp_path: Path) -> Iterator[Metrics]:
    with Metrics(directory=tmp_path / "metrics") as opened:
        yield opened


def samples(metrics: Metrics) -> dict[Series, float]:
    from prometheus_client.parser import text_string_to_metric_families

    body, _ = metrics.render()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return samples(metrics).get((name, frozenset(labels.items())), 0.0)


def series(name: str, **labels: str) -> Series:
    return (name, frozenset(labels.items()))


def changes(before: dict[Series, float], after: dict[Series, float]) -> dict[Series, float]:
    """Every series that moved, by how much."""
    moved = {key: after[key] - before.get(key, 0.0) for key in after}
    return {key: delta for key, delta in moved.items() if delta}


def latency_changes(name: str, label: str, label_value: str, seconds: float) -> dict[Series, float]:
    """What one observation of `seconds` does to a histogram: its count, its sum, the buckets it falls in."""
    moved = {
        series(f"{name}_bucket", **{label: label_value, "le": str(bound)}): 1.0
        for bound in LATENCY_BUCKETS_SECONDS
        if seconds <= bound
    }
    moved[series(f"{name}_bucket", **{label: label_value, "le": "+Inf"})] = 1.0
    moved[series(f"{name}_count", **{label: label_value})] = 1.0
    moved[series(f"{name}_sum", **{label: label_value})] = seconds
    return moved


def test_call_finished_counts_the_call_its_tokens_and_its_latencies(metrics: Metrics) -> None:
    before = samples(metrics)
    metrics.call_finished(
        model="gpt-x",
        key="web",
        outcome="ok",
        prompt_tokens=12,
        completion_tokens=30,
        upstream_seconds=3.0,
        ttft_seconds=0.4,
    )
    assert changes(before, samples(metrics)) == {
        series("llm_calls_total", model="gpt-x", key="web", outcome="ok"): 1.0,
        series("llm_tokens_total", model="gpt-x", key="web", kind="prompt"): 12.0,
        series("llm_tokens_total", model="gpt-x", key="web", kind="completion"): 30.0,
        **latency_changes("llm_upstream_latency_seconds", "model", "gpt-x", 3.0),
        **latency_changes("llm_time_to_first_token_seconds", "model", "gpt-x", 0.4),
    }


def test_failed_call_counts_its_error_code_and_no_tokens(metrics: Metrics) -> None:
    before = samples(metrics)
    metrics.call_finished(
        model="gpt-x",
        key="anonymous",
        outcome="upstream_timeout",
        prompt_tokens=None,
        completion_tokens=None,
        upstream_seconds=1.5,
        ttft_seconds=None,
    )
    assert changes(before, samples(metrics)) == {
        series("llm_calls_total", model="gpt-x", key="anonymous", outcome="upstream_timeout"): 1.0,
        **latency_changes("llm_upstream_latency_seconds", "model", "gpt-x", 1.5),
    }


def test_request_finished_observes_the_route(metrics: Metrics) -> None:
    before = samples(metrics)
    metrics.request_finished(route="/api/v1/llm/chat", seconds=0.07)
    assert changes(before, samples(metrics)) == latency_changes(
        "llm_request_duration_seconds", "route", "/api/v1/llm/chat", 0.07
    )


def test_streams_in_flight_goes_up_and_back_down(metrics: Metrics) -> None:
    metrics.stream_started()
    metrics.stream_started()
    assert value(metrics, "llm_streams_in_flight") == 2
    metrics.stream_ended()
    metrics.stream_ended()
    assert value(metrics, "llm_streams_in_flight") == 0


@pytest.mark.parametrize(
    ("record", "moved"),
    [
        pytest.param(
            lambda m: m.rate_limited(key="web", kind="rate"),
            {series("llm_rate_limit_rejections_total", key="web", kind="rate"): 1.0},
            id="rate_limited",
        ),
        pytest.param(
            lambda m: m.rate_limited(key="web", kind="budget"),
            {series("llm_rate_limit_rejections_total", key="web", kind="budget"): 1.0},
            id="budget_exceeded",
        ),
        pytest.param(
            lambda m: m.ledger_rows_dropped(3), {series("llm_ledger_rows_dropped_total"): 3.0}, id="ledger_rows_dropped"
        ),
        pytest.param(lambda m: m.redis_error(), {series("llm_redis_errors_total"): 1.0}, id="redis_error"),
    ],
)
def test_each_counter_moves_only_its_series(metrics: Metrics, record: object, moved: dict[Series, float]) -> None:
    before = samples(metrics)
    assert callable(record)
    record(metrics)
    assert changes(before, samples(metrics)) == moved


def test_render_is_the_text_format_every_scraper_reads(metrics: Metrics) -> None:
    body, content_type = metrics.render()
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    assert b"# TYPE llm_streams_in_flight gauge" in body


def test_two_metrics_open_in_one_process_share_their_series_and_never_clash(tmp_path: Path) -> None:
    from prometheus_client import REGISTRY

    with Metrics(directory=tmp_path / "metrics") as first, Metrics(directory=tmp_path / "metrics") as second:
        first.redis_error()
        second.redis_error()
        assert value(first, "llm_redis_errors_total") == value(second, "llm_redis_errors_total") == 2
        # Nothing lands in the default registry, where a second app's metrics would be "Duplicated timeseries".
        assert not [family.name for family in REGISTRY.collect() if family.name.startswith("llm_")]
        first.close()
        second.redis_error()
        assert value(second, "llm_redis_errors_total") == 3


async def test_two_apps_in_one_process_each_scrape_the_process_total() -> None:
    apps = [metrics_app.create_app(), metrics_app.create_app()]
    async with LifespanManager(apps[0]) as one, LifespanManager(apps[1]) as other:
        clients = [
            httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://app.test")
            for manager in (one, other)
        ]
        async with clients[0], clients[1]:
            for client in clients:
                (await client.post("/call")).raise_for_status()
            for client in clients:
                scrape = (await client.get("/metrics")).raise_for_status()
                assert f'outcome="ok"}} {2.0}' in scrape.text


def test_a_later_metrics_in_the_same_process_continues_a_shared_directory(tmp_path: Path) -> None:
    directory = tmp_path / "metrics"
    with Metrics(directory=directory) as first:
        first.redis_error()
        first.redis_error()
    with Metrics(directory=directory) as later:
        later.redis_error()
        assert value(later, "llm_redis_errors_total") == 3


def test_a_single_process_uses_its_own_directory_and_removes_it_at_close(private_temp_dir: Path) -> None:
    root = private_temp_dir / DIRECTORY_ROOT_NAME
    dead, live = root / str(NEVER_A_PID), root / str(os.getppid())
    for leftover in (dead, live):
        leftover.mkdir(parents=True)
        (leftover / f"counter_{leftover.name}.db").write_bytes(b"")

    with Metrics() as metrics:
        own = root / str(os.getpid())
        assert metrics.directory == own
        assert os.environ[MULTIPROC_DIR_VARIABLE] == str(own)
        metrics.redis_error()
        assert value(metrics, "llm_redis_errors_total") == 1
        assert not dead.exists(), "a directory whose process no longer exists is swept at startup"
        assert live.exists()

    assert not own.exists()
    # Processes started later must not inherit a directory that was this one's.
    assert MULTIPROC_DIR_VARIABLE not in os.environ
    with Metrics() as again:
        assert value(again, "llm_redis_errors_total") == 0
        again.redis_error()
        assert value(again, "llm_redis_errors_total") == 1


def test_an_operators_directory_is_used_and_kept(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    directory = tmp_path / "operator"
    monkeypatch.setenv(MULTIPROC_DIR_VARIABLE, str(directory))
    with Metrics() as metrics:
        assert metrics.directory == directory
        metrics.redis_error()
    assert directory.is_dir()
    assert os.environ[MULTIPROC_DIR_VARIABLE] == str(directory)


def test_files_of_processes_that_no_longer_exist_are_swept_at_startup(tmp_path: Path) -> None:
    directory = tmp_path / "metrics"
    live = run_recording_child(directory, stay=True)
    try:
        dead = run_recording_child(directory, stay=False)
        dead.communicate(timeout=CHILD_WAIT_SECONDS)
        assert {pid_of(path) for path in directory.glob("*.db")} == {live.pid, dead.pid}
        # A dead process with this process's pid left a live gauge: the library would read it back as ours.
        shutil.copy(directory / f"gauge_livesum_{dead.pid}.db", directory / f"gauge_livesum_{os.getpid()}.db")
        with Metrics(directory=directory) as metrics:
            assert {pid_of(path) for path in directory.glob("*.db")} == {live.pid, os.getpid()}
            # The live child's call and stream only: the dead child's (and the impostor's stream) are gone.
            assert value(metrics, "llm_calls_total", model="m", key="k", outcome="ok") == 1
            assert value(metrics, "llm_streams_in_flight") == 1
            metrics.stream_started()
            assert value(metrics, "llm_streams_in_flight") == 2
    finally:
        live.communicate(timeout=CHILD_WAIT_SECONDS)


def run_recording_child(directory: Path, *, stay: bool) -> subprocess.Popen[str]:
    """A process that has recorded into `directory` (and, with `stay`, still runs)."""
    env = clean_environment()
    env.pop(MULTIPROC_DIR_VARIABLE, None)
    env["PYTHONPATH"] = str(BACKEND_DIR)
    child = subprocess.Popen(
        [sys.executable, "-c", RECORDING_CHILD, str(directory), "stay" if stay else "exit"],
        cwd=BACKEND_DIR,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    ready, _, _ = select.select([child.stdout], [], [], CHILD_WAIT_SECONDS)
    if not ready or child.stdout.readline().strip() != "recorded":
        child.kill()
        child.communicate()
        raise AssertionError(f"the recording child did not record within {CHILD_WAIT_SECONDS}s")
    return child


def pid_of(path: Path) -> int:
    return int(path.stem.rpartition("_")[2])


def test_recording_needs_open_metrics(tmp_path: Path) -> None:
    metrics = Metrics(directory=tmp_path / "metrics")
    with pytest.raises(RuntimeError, match="not open"):
        metrics.redis_error()
    with metrics, pytest.raises(RuntimeError, match="already open"):
        metrics.open()
    with pytest.raises(RuntimeError, match="not open"):
        metrics.render()
    metrics.close()


def test_apps_open_at_once_in_one_process_must_share_a_directory(tmp_path: Path) -> None:
    with Metrics(directory=tmp_path / "one") as one:
        with pytest.raises(MetricsSetupError, match="same metrics directory"):
            Metrics(directory=tmp_path / "other").open()
        one.redis_error()
        assert value(one, "llm_redis_errors_total") == 1


def test_a_root_that_is_not_this_users_own_directory_is_refused(private_temp_dir: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (private_temp_dir / DIRECTORY_ROOT_NAME).symlink_to(elsewhere)
    with pytest.raises(MetricsSetupError, match="not a directory of this user's own"):
        Metrics().open()
    assert MULTIPROC_DIR_VARIABLE not in os.environ


def test_prometheus_client_imported_too_early_is_an_error_not_per_process_numbers(tmp_path: Path) -> None:
    env = clean_environment()
    env.pop(MULTIPROC_DIR_VARIABLE, None)
    env["PYTHONPATH"] = str(BACKEND_DIR)
    code = (
        "import sys, pathlib, prometheus_client\n"
        "from src.core.metrics import Metrics\n"
        "Metrics(directory=pathlib.Path(sys.argv[1])).open()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "metrics")],
        cwd=BACKEND_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=CHILD_WAIT_SECONDS,
    )
    assert result.returncode != 0
    assert "imported before PROMETHEUS_MULTIPROC_DIR was set" in result.stderr


ROOT = Path("/tmp-root")


@pytest.mark.parametrize(
    ("environment", "configured", "parent_pid", "expected"),
    [
        pytest.param("/ops", None, 7, MetricsDirectory(Path("/ops"), owned=False), id="operator_variable"),
        pytest.param(None, Path("/cfg"), 7, MetricsDirectory(Path("/cfg"), owned=False), id="metrics_dir_setting"),
        pytest.param("/cfg", Path("/cfg"), None, MetricsDirectory(Path("/cfg"), owned=False), id="both_agree"),
        pytest.param(None, None, 7, MetricsDirectory(ROOT / "7", owned=False), id="worker_shares_supervisor_dir"),
        pytest.param(None, None, None, MetricsDirectory(ROOT / "42", owned=True), id="single_process_owns_its_dir"),
    ],
)
def test_directory_rule(
    environment: str | None, configured: Path | None, parent_pid: int | None, expected: MetricsDirectory
) -> None:
    chosen = choose_metrics_directory(
        environment=environment, configured=configured, parent_pid=parent_pid, pid=42, root=ROOT
    )
    assert chosen == expected


def test_directory_rule_refuses_two_disagreeing_settings() -> None:
    with pytest.raises(MetricsSetupError, match="disagree"):
        choose_metrics_directory(environment="/ops", configured=Path("/cfg"), parent_pid=None, pid=42, root=ROOT)


def test_a_directory_prepared_before_any_import_is_the_one_metrics_open(private_temp_dir: Path) -> None:
    prepared = prepare_metrics_directory()
    assert prepared == private_temp_dir / DIRECTORY_ROOT_NAME / str(os.getpid())
    assert os.environ[MULTIPROC_DIR_VARIABLE] == str(prepared)
    assert not prepared.exists(), "created by the first open: a process that never records leaves nothing behind"
    with Metrics() as metrics:
        assert metrics.directory == prepared
        assert prepared.is_dir()
    assert not prepared.exists()
    assert MULTIPROC_DIR_VARIABLE not in os.environ
