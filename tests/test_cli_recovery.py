"""Crash recovery with no daemon: command-line and Python runs recover from runs killed before them.

Real processes of the README's CLI (``dagster asset materialize``, ``dg launch``) on a temporary
DAGSTER_HOME with the shipped deploy/dagster.yaml, real signals (SIGKILL, SIGSTOP, SIGTERM), the
random_vit profile at 112 px on 10 images so that a whole run takes seconds.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pandas as pd
import psutil
import pytest
from dagster import AssetKey, DagsterEventType, DagsterInstance, DagsterRunStatus
from dagster._core.events import EngineEventData
from dagster._core.storage.dagster_run import DagsterRun

from conftest import REPO, make_category
from musc_pipeline.definitions import build_definitions
from musc_pipeline.recovery import HOST_TAG
from musc_pipeline.settings import load_settings
from run_processes import freeze, step_event_time, stop, wait_for

BIN = Path(sys.executable).parent
POOL = "musc_model"
KEY = "mini/cat1"
METRICS = ["image_auroc", "image_f1_max", "image_ap", "pixel_auroc", "pixel_f1_max", "pixel_ap", "pixel_pro"]
CLI = {
    "dagster": [str(BIN / "dagster"), "asset", "materialize", "-m", "musc_pipeline.definitions",
                "--select", "*random_vit/category_metrics", "--partition", KEY],
    "dg": [str(BIN / "dg"), "launch", "--assets", "*random_vit/category_metrics", "--partition", KEY],
}


def _site(root: Path, data: Path) -> dict:
    """Config, storage and a fresh instance under ``root``: the environment of the CLI runs."""
    root.mkdir(parents=True)
    (root / "musc.yaml").write_text(
        f"storage: {root / 'store'}\nreports_dir: {root / 'reports'}\ndatasets:\n  mini: {{root: {data}}}\n"
        "profiles:\n  random_vit: {backbone: {name: ViT-B-16, weights: random, image_size: 112, seed: 0}}\n")
    (root / "home").mkdir()
    shutil.copy(REPO / "deploy" / "dagster.yaml", root / "home" / "dagster.yaml")  # the instance config we ship
    DagsterInstance.from_config(str(root / "home")).dispose()  # create the storages before processes race to
    return dict(os.environ, MUSC_CONFIG=str(root / "musc.yaml"), DAGSTER_HOME=str(root / "home"))


def _start(cli: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen(CLI[cli], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _metrics(env: dict) -> pd.DataFrame:
    return pd.read_parquet(Path(env["MUSC_CONFIG"]).parent / "store" / "random_vit" / "category_metrics"
                           / "mini" / "cat1.parquet")[METRICS]


def _new_run(instance: DagsterInstance, known: set[str], proc: subprocess.Popen) -> str:
    return wait_for("run created", lambda: [r.run_id for r in instance.get_runs() if r.run_id not in known],
                    300, proc, poll=0.1)[0]


def _messages(instance: DagsterInstance, run_id: str) -> str:
    return "\n".join(record.message or "" for record in instance.all_logs(run_id))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_category(root, "cat1")
    return root


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data) -> pd.DataFrame:
    """The metrics of a run nothing interrupted (in this process: the same code as the CLI's run)."""
    env = _site(tmp_path_factory.mktemp("clean") / "site", data)
    defs = build_definitions(load_settings(env["MUSC_CONFIG"]))
    job = defs.resolve_job_def("random_vit_categories")
    assert job.execute_in_process(partition_key=KEY, instance=DagsterInstance.ephemeral()).success
    return _metrics(env)


@pytest.mark.parametrize(("cli", "step"), [("dagster", "random_vit__msm_scores"), ("dg", "random_vit__embed")])
def test_cli_run_killed_inside_a_model_step_is_recovered_by_the_same_command_run_again(
        tmp_path, data, uninterrupted, cli, step):
    env = _site(tmp_path / "site", data)
    first = second = None
    with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        try:
            first = _start(cli, env)
            killed_id = _new_run(instance, set(), first)
            wait_for(f"first run in {step}", lambda: step_event_time(instance, killed_id, step), 300, first, poll=0.1)
            # killed where it is; read the storage only after: a process frozen by SIGSTOP can hold
            # SQLite's write lock, and the reads below would then fail with "database is locked"
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=30)
            assert step_event_time(instance, killed_id, step, DagsterEventType.STEP_SUCCESS) is None
            assert instance.event_log_storage.get_concurrency_info(POOL).active_run_ids == {killed_id}

            second = _start(cli, env)
            assert second.wait(timeout=300) == 0, second.stderr.read()[-3000:]
            (second_id,) = [r.run_id for r in instance.get_runs() if r.run_id != killed_id]
        finally:
            for proc in (first, second):
                if proc is not None:
                    stop(proc)
        killed = instance.get_run_by_id(killed_id)
        assert killed.status == DagsterRunStatus.FAILURE
        failure = instance.all_logs(killed_id, of_type=DagsterEventType.RUN_FAILURE)[-1].dagster_event.message
        assert f"Marked failed by run {second_id}" in failure and "is gone (killed or crashed)" in failure
        assert f"Crash recovery: run {killed_id} marked failed" in _messages(instance, second_id)
        assert instance.get_run_by_id(second_id).status == DagsterRunStatus.SUCCESS
        assert not instance.event_log_storage.get_concurrency_run_ids()
    pd.testing.assert_frame_equal(_metrics(env), uninterrupted)


def _cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def test_a_run_waiting_for_a_live_runs_slot_sleeps_never_takes_it_and_stops_on_sigterm(tmp_path, data):
    env = _site(tmp_path / "site", data)
    holder = waiting = None
    with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        try:
            holder = _start("dagster", env)
            holder_id = _new_run(instance, set(), holder)
            wait_for("holder in embed", lambda: step_event_time(instance, holder_id, "random_vit__embed"), 300, holder)
            freeze(holder, env["DAGSTER_HOME"])  # alive, holding the slot, doing nothing
            waiting = _start("dg", env)
            waiting_id = _new_run(instance, {holder_id}, waiting)
            wait_for("second run queued on the pool",
                     lambda: waiting_id in instance.event_log_storage.get_concurrency_info(POOL).pending_run_ids,
                     300, waiting)
            watched = psutil.Process(waiting.pid)
            cpu, start = _cpu_seconds(watched), time.time()
            time.sleep(30)
            share = (_cpu_seconds(watched) - cpu) / (time.time() - start)
            assert share < 0.10, f"the waiting run used {share:.0%} of a core"
            assert instance.event_log_storage.get_concurrency_info(POOL).active_run_ids == {holder_id}

            os.killpg(waiting.pid, signal.SIGTERM)
            sent = time.time()
            waiting.wait(timeout=10)
            print(f"the waiting run used {share:.1%} of a core and exited {time.time() - sent:.1f} s after SIGTERM")
            assert instance.get_run_by_id(waiting_id).status in (DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED)
            assert waiting_id not in instance.event_log_storage.get_concurrency_run_ids()

            os.killpg(holder.pid, signal.SIGCONT)
            assert holder.wait(timeout=300) == 0, holder.stderr.read()[-3000:]
        finally:
            for proc in (holder, waiting):
                if proc is not None:
                    stop(proc)
        assert instance.get_run_by_id(holder_id).status == DagsterRunStatus.SUCCESS
        assert step_event_time(instance, waiting_id, "random_vit__embed") is None
        assert "Crash recovery" not in _messages(instance, waiting_id)


def _dead_run(instance: DagsterInstance, pid: int, holds_slot: bool, host: str | None = None) -> str:
    """A STARTED run whose logged process is ``pid`` on ``host`` (as a run's executor logs and tags it)."""
    run = DagsterRun(job_name="killed_job", run_id=str(uuid.uuid4()), status=DagsterRunStatus.STARTED,
                     tags={HOST_TAG: host or socket.gethostname()})
    instance.add_run(run)
    instance.report_engine_event("Executing steps in process", run, EngineEventData.in_process(pid))
    if holds_slot:
        instance.event_log_storage.claim_concurrency_slot(POOL, run.run_id, "random_vit__embed")
    return run.run_id


def test_python_run_fails_dead_runs_and_takes_a_slot_whose_holder_dies_while_it_waits(tmp_path, data):
    from dagster import materialize

    env = _site(tmp_path / "site", data)
    defs = build_definitions(load_settings(env["MUSC_CONFIG"]))
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        instance.event_log_storage.initialize_concurrency_limit_to_default(POOL)
        stale_id = _dead_run(instance, exited.pid, holds_slot=False)  # shows as running forever in the UI
        holder_id = _dead_run(instance, holder.pid, holds_slot=True)
        elsewhere_id = _dead_run(instance, exited.pid, holds_slot=False, host="another-host")  # its pid means nothing here
        threading.Timer(8.0, holder.kill).start()  # alive when the run starts, dead while it waits
        try:
            assets = [defs.resolve_assets_def(AssetKey(["random_vit", n])) for n in ("image_manifest", "backbone_features")]
            result = materialize(assets, partition_key=KEY, instance=instance)  # resources bound in defs
        finally:
            holder.kill()
            holder.wait()
        assert result.success
        engine = [r.message for r in instance.all_logs(result.run_id, of_type=DagsterEventType.ENGINE_EVENT)]
        at_setup = _messages(instance, result.run_id)
        # the stale run is failed when the run sets up; the holder while its embed step waits
        assert f"Crash recovery: run {stale_id} marked failed: run process {exited.pid} is gone" in at_setup
        assert any(f"Crash recovery: run {holder_id} marked failed: run process {holder.pid} is gone" in m
                   for m in engine)
        assert step_event_time(instance, result.run_id, "random_vit__embed") is not None
        for run_id in (stale_id, holder_id):
            assert instance.get_run_by_id(run_id).status == DagsterRunStatus.FAILURE
        assert instance.get_run_by_id(elsewhere_id).status == DagsterRunStatus.STARTED
        assert instance.get_run_by_id(result.run_id).tags[HOST_TAG] == socket.gethostname()
        assert not instance.event_log_storage.get_concurrency_run_ids()
