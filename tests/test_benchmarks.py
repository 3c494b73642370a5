"""The benchmark scripts run and print what the README quotes (smoke runs on tiny workloads)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

from conftest import REPO


def test_stage_benchmark_prints_every_stage_for_every_configuration():
    run = subprocess.run([sys.executable, "benchmarks/stages.py", "--quick", "--subsets", "1", "2"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.split()[:2] == ["N", "s"])
    header = lines[at]
    for stage in ("features", "lnamd", "msm", "maps", "rscin"):
        assert f"{stage} ms" in header
    rows = [line.split() for line in lines[at + 2 : at + 4]]
    assert [r[:3] for r in rows] == [["6", "1", "float32"], ["6", "2", "float32"]]
    for r in rows:
        features, lnamd, msm, maps, rscin, total = map(float, r[4:10])
        assert features > 0 and msm > 0
        assert abs(features + lnamd + msm + maps + rscin - total) < 0.5
        assert r[10] == r[11] == "—" and float(r[12]) > 100  # no GPU here; process peak RSS in MB
    assert "998.8 ms/image" in run.stdout


def test_study_benchmark_prints_the_sweep_against_one_msm(monkeypatch, capsys):
    """In this process (torch is imported already): a subprocess would spend its time importing."""
    import torch

    spec = importlib.util.spec_from_file_location("studies_benchmark", REPO / "benchmarks" / "studies.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(sys, "argv", ["studies.py", "--images", "8", "--categories", "2", "--threads", "1",
                                      "--studies", "interval_start", "msm_variants", "percentage"])
    threads = torch.get_num_threads()
    try:
        bench.main()
    finally:
        torch.set_num_threads(threads)  # the benchmark sets one thread for this whole process
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.split()[:1] == ["category"] and "% of MSM" in line)
    for col in ("load s", "reaggregate s", "maps_rscin s", "metrics s", "total s"):
        assert col in lines[at]
    rows = {r[0]: list(map(float, r[1:])) for r in (line.split() for line in lines[at + 1 : at + 4])}
    assert set(rows) == {"1", "2", "all"}
    for r in rows.values():
        assert r[1] > 0 and r[3] > 0 and abs(sum(r[:4]) - r[4]) < 0.05
    assert abs(rows["1"][4] + rows["2"][4] - rows["all"][4]) < 0.05
    assert lines[-1].startswith("interval_start + msm_variants + percentage (22 settings) + rscin (6 settings)")
    assert "of one category's MSM (target: < 10 %)" in lines[-1]


def test_the_model_runtime_needs_no_dagster():
    """benchmarks/stages.py runs where only torch and a few wheels are (a lent GPU machine)."""
    code = ("import sys; import musc_pipeline.resources.model, musc_pipeline.core.msm, musc_pipeline.core.rscin; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('dagster', 'duckdb', 'pandas')))")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]"
