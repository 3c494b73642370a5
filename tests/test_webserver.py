"""`dagster dev` from the repo root serves the asset graph (real webserver, real GraphQL)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from conftest import REPO


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _graphql(port: int, query: str) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def test_dagster_dev_serves_asset_graph(tmp_path, mini_root):
    cfg = tmp_path / "musc.yaml"
    cfg.write_text(f"storage: {tmp_path / 'store'}\ndatasets:\n  mini: {{root: {mini_root}}}\n")
    port = _free_port()
    env = dict(os.environ, MUSC_CONFIG=str(cfg), DAGSTER_HOME=str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    shutil.copy(REPO / "dagster.yaml", tmp_path / "home" / "dagster.yaml")  # the instance config we ship
    dagster = Path(sys.executable).parent / "dagster"
    proc = subprocess.Popen(
        [str(dagster), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    try:
        deadline = time.time() + 180
        nodes = None
        while time.time() < deadline and nodes is None:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            try:
                data = _graphql(port, "{ assetNodes { assetKey { path } partitionKeysByDimension { partitionKeys } } }")
                nodes = data["data"]["assetNodes"]
            except (OSError, KeyError, TypeError):
                time.sleep(2)
        assert nodes, "dagster dev did not serve the asset graph within 180 s"
        keys = {"/".join(n["assetKey"]["path"]) for n in nodes}
        assert {"musc/backbone_features", "musc/msm_scores", "musc/rscin_scores", "html_report"} <= keys
        msm = next(n for n in nodes if n["assetKey"]["path"] == ["musc", "msm_scores"])
        assert msm["partitionKeysByDimension"][0]["partitionKeys"] == ["mini/cat1"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
