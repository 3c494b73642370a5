"""`make dev` from the repo root serves the asset graph (real webserver, real GraphQL)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request

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


def test_make_dev_serves_asset_graph_without_warnings(tmp_path, mini_root):
    """``make dev`` as a newcomer types it: ``dg dev`` (no SupersessionWarning of ``dagster dev``)
    with the shipped instance settings copied to ``$DAGSTER_HOME`` and none in the working folder
    (no "dagster.yaml will not be used" warning)."""
    cfg = tmp_path / "musc.yaml"
    cfg.write_text(f"storage: {tmp_path / 'store'}\ndatasets:\n  mini: {{root: {mini_root}}}\n")
    port = _free_port()
    env = dict(os.environ, MUSC_CONFIG=str(cfg), DAGSTER_HOME=str(tmp_path / "home"))
    log = tmp_path / "make_dev.log"
    with log.open("wb") as out:  # --assume-old: never (re)build the venv from a test
        proc = subprocess.Popen(["make", "--no-print-directory", "--assume-old=.venv/.installed", "dev",
                                 f"DEV_ARGS=--host 127.0.0.1 --port {port}"],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 180
        nodes = None
        while time.time() < deadline and nodes is None:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                data = _graphql(port, "{ assetNodes { assetKey { path } partitionKeysByDimension { partitionKeys } } }")
                nodes = data["data"]["assetNodes"]
            except (OSError, KeyError, TypeError):
                time.sleep(2)
        assert nodes, "make dev did not serve the asset graph within 180 s"
        keys = {"/".join(n["assetKey"]["path"]) for n in nodes}
        assert {"musc/backbone_features", "musc/msm_scores", "musc/rscin_scores", "html_report"} <= keys
        msm = next(n for n in nodes if n["assetKey"]["path"] == ["musc", "msm_scores"])
        assert msm["partitionKeysByDimension"][0]["partitionKeys"] == ["mini/cat1"]
        assert (tmp_path / "home" / "dagster.yaml").read_text() == (REPO / "deploy" / "dagster.yaml").read_text()
        started = log.read_text()
        assert "Serving dagster-webserver" in started
        for warning in ("SupersessionWarning", "WARNING", "will not be used"):
            assert warning not in started, started[-3000:]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
