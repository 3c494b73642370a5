"""The instance's run launcher: Dagster's DefaultRunLauncher, plus a health check of run processes.

Dagster's run monitoring (``run_monitoring`` in ``dagster.yaml``, run by the daemon of
``dagster dev``) fails a started run whose worker is gone only for launchers that can tell;
the DefaultRunLauncher cannot, so a run killed with ``kill -9`` (or by the OOM killer) stayed
"Started" and kept its ``musc_model`` pool slot. Every run logs the pid of the process that
executes it (an engine event with ``pid`` metadata); a run is dead when that process no longer
exists, is a zombie, or is a newer process that reuses the pid. This holds for runs launched
from the UI and for CLI runs (``dagster asset materialize``) against the same instance, all
on this host: the instance is the local ``$DAGSTER_HOME`` of ``make dev``.

Monitoring then marks the run failed, and ``free_slots_after_run_end_seconds`` hands its pool
slots back. :func:`fail_dead_runs` does the same without a daemon (``make demo`` calls it).
"""

from __future__ import annotations

import psutil
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus, RunsFilter
from dagster._core.launcher import CheckRunHealthResult, DefaultRunLauncher, WorkerStatus
from dagster._core.storage.dagster_run import DagsterRun


def run_process(instance: DagsterInstance, run_id: str) -> tuple[int, float] | None:
    """(pid, when it was logged) of the process executing a run, or None before it logged one."""
    for record in instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT):
        data = record.dagster_event.event_specific_data if record.dagster_event else None
        metadata = getattr(data, "metadata", None) or {}
        if "pid" in metadata:  # the first is the run worker; later ones may be step subprocesses
            return int(metadata["pid"].value), record.timestamp
    return None


def process_alive(pid: int, logged_at: float) -> bool:
    """Whether the process that logged ``pid`` at ``logged_at`` still runs."""
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and proc.create_time() <= logged_at + 1.0
    except psutil.NoSuchProcess:
        return False


def run_health(instance: DagsterInstance, run: DagsterRun) -> CheckRunHealthResult:
    found = run_process(instance, run.run_id)
    if found is None:  # between RUN_START and the executor's first engine event
        return CheckRunHealthResult(WorkerStatus.RUNNING, "run process not logged yet")
    pid, logged_at = found
    if process_alive(pid, logged_at):
        return CheckRunHealthResult(WorkerStatus.RUNNING, f"run process {pid} is alive")
    return CheckRunHealthResult(WorkerStatus.FAILED, f"run process {pid} is gone (killed or crashed)")


class LocalRunLauncher(DefaultRunLauncher):
    """DefaultRunLauncher whose runs' processes run monitoring can check (see module doc)."""

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        return run_health(self._instance, run)


def fail_dead_runs(instance: DagsterInstance) -> list[str]:
    """Mark started runs whose process is gone as failed and free their pool slots (no daemon)."""
    failed = []
    for run in instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.STARTED])):
        health = run_health(instance, run)
        if health.status == WorkerStatus.FAILED:
            instance.report_run_failed(run, f"Marked failed: {health.msg}.")
            failed.append(run.run_id)
    for run_id in failed:
        instance.event_log_storage.free_concurrency_slots_for_run(run_id)
    return failed
