"""The Ray executor: a run on a local Ray cluster (2 CPUs, started here) writes the same results
as an in-process run, byte for byte but the seconds; it survives a worker killed mid-job and a
driver killed mid-run; GPUs are requested as fractions; bad clusters fail in one line."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from advbench.config import parse_config
from advbench.errors import ConfigError
from advbench.eval.evaluator import evaluate

ray = pytest.importorskip("ray")

from advbench.eval.ray_executor import ExecutorError, RayExecutor  # noqa: E402

pytestmark = pytest.mark.slow

#: cascaded attacks (the driver computes what earlier jobs left robust), a minimal attack whose
#: eps sweep is one unit, a randomized defense (scoring draws, EoT), several shards
GRID = {
    "seed": 3,
    "data": {"name": "digits", "split": "test", "n": 60},
    "models": ["digits-mlp", "digits-cnn"],
    "defenses": ["none", "randomization"],
    "threats": [{"norm": "linf", "eps": [0.05, 0.1]}],
    "attacks": ["fgsm", {"name": "pgd", "steps": 5}, {"name": "deepfool", "steps": 10},
                {"name": "square", "queries": 30}],
    "batch_size": 30,
    "cascade": True,
    "eot_samples": 2,
    "draws": 2,
}


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 2 CPUs and one logical GPU (for the resource tests), no dashboard."""
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def _without_seconds(path: Path) -> str:
    """results.csv with its ``seconds`` column blanked (wall time is the one thing that may differ)."""
    rows = list(csv.reader(io.StringIO(path.read_text())))
    col = rows[0].index("seconds")
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([r[:col] + r[col + 1 :] for r in rows])
    return buf.getvalue()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The in-process run of GRID."""
    out = tmp_path_factory.mktemp("inprocess")
    evaluate(parse_config(GRID), out, progress=False, warn=False)
    return out


def _same_outputs(a: Path, b: Path) -> None:
    assert _without_seconds(a / "results.csv") == _without_seconds(b / "results.csv")
    assert (a / "matrix.csv").read_bytes() == (b / "matrix.csv").read_bytes()
    assert _no_seconds(json.loads((a / "masking.json").read_text())) == _no_seconds(
        json.loads((b / "masking.json").read_text()))


def _no_seconds(obj):
    """A JSON value without its ``seconds`` entries (the probes' wall time)."""
    if isinstance(obj, dict):
        return {k: _no_seconds(v) for k, v in obj.items() if k != "seconds"}
    return [_no_seconds(v) for v in obj] if isinstance(obj, list) else obj


def test_a_ray_run_writes_the_in_process_results_byte_for_byte(cluster, reference, tmp_path):
    config = parse_config({**GRID, "executor": {"name": "ray", "workers": 2}})
    assert config.hash() == parse_config(GRID).hash()  # where jobs run is not part of a run's identity
    res = evaluate(config, tmp_path, progress=False, warn=False)
    _same_outputs(reference, tmp_path)
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["executor"]["name"] == "ray" and run["executor"]["workers"] == 2 and run["executor"]["retries"] == []
    assert res.jobs_run == run["jobs"]["total"] > 40
    assert (tmp_path / "results.sqlite").exists() and not list(tmp_path.glob("*.sqlite-*"))  # one writer, closed


def test_a_worker_killed_mid_job_is_replaced_and_its_job_retried(cluster, reference, tmp_path):
    killed: list[int] = []

    def kill_a_busy_worker(executor: RayExecutor) -> None:
        if not killed and executor.busy_pids():
            pid = executor.busy_pids()[0]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    executor = RayExecutor(workers=2, on_result=kill_a_busy_worker)
    evaluate(parse_config(GRID), tmp_path, progress=False, warn=False, executor=executor)
    assert killed
    retries = json.loads((tmp_path / "run.json").read_text())["executor"]["retries"]
    assert len(retries) >= 1 and retries[0]["attempt"] == 1
    _same_outputs(reference, tmp_path)


def test_a_killed_driver_resumes_from_the_store(cluster, reference, tmp_path):
    """The driver (a CLI process on this cluster) killed with SIGKILL once some jobs are stored;
    the same command (here: the Python API) resumes and writes the uninterrupted results."""
    import yaml

    cfg = tmp_path / "grid.yaml"
    cfg.write_text(yaml.safe_dump(GRID))
    out = tmp_path / "run"
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "advbench.cli", "evaluate", str(cfg), "--out", str(out), "--quiet",
                             "--executor", "ray", "--workers", "2"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stored = 0
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if (out / "results.sqlite").exists():
                with sqlite3.connect(out / "results.sqlite") as conn:
                    try:
                        stored = conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
                    except sqlite3.OperationalError:  # tables not created yet
                        stored = 0
                if stored >= 3:
                    break
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert stored >= 3, "the driver stored no jobs in time"
    res = evaluate(parse_config({**GRID, "executor": {"name": "ray", "workers": 2}}), out, progress=False, warn=False)
    assert res.jobs_skipped >= 3 and res.jobs_run > 0
    _same_outputs(reference, out)


def test_workers_share_a_gpu_by_asking_for_a_fraction(cluster, tmp_path):
    """Two workers of half a GPU each fit the cluster's one GPU (logical here: the jobs run on the
    CPU, which is what a worker without a visible CUDA device does); two of a whole GPU do not."""
    small = {**GRID, "models": ["digits-mlp"], "defenses": ["none"], "attacks": ["fgsm"], "masking_checks": False}
    ex = RayExecutor(workers=2, gpus_per_job=0.5)
    evaluate(parse_config(small), tmp_path / "half", progress=False, warn=False, executor=ex)
    assert ex.describe()["workers"] == 2 and ex.describe()["gpus_per_job"] == 0.5
    with pytest.raises(ConfigError, match=r"2 worker\(s\) .* need 2 CPU\(s\) and 2 GPU\(s\); the cluster has 2 CPU\(s\) and 1 GPU"):
        evaluate(parse_config(small), tmp_path / "whole", progress=False, warn=False,
                 executor=RayExecutor(workers=2, gpus_per_job=1))
    assert not (tmp_path / "whole").exists()  # refused before anything was written


def test_a_worker_without_a_module_the_driver_has_fails_in_one_line(cluster, tmp_path, monkeypatch):
    """A model from an import path on the driver's sys.path only: the workers cannot import it."""
    pkg = tmp_path / "driver_only"
    pkg.mkdir()
    (pkg / "driver_only_models.py").write_text(
        "import torch\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))\n")
    monkeypatch.syspath_prepend(str(pkg))
    config = parse_config({**GRID, "models": [{"name": "mine", "import": "driver_only_models:build"}],
                           "defenses": ["none"], "attacks": ["fgsm"], "masking_checks": False})
    with pytest.raises(ExecutorError, match=r"lacks a dependency the driver has, running model 'mine'.*driver_only_models"):
        evaluate(config, tmp_path / "out", progress=False, warn=False, executor=RayExecutor(workers=1))


def test_an_unreachable_address_is_one_error_line_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "advbench.cli", "evaluate", "--executor", "ray", "--address",
                           "127.0.0.1:9", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach the Ray cluster at 127.0.0.1:9"), proc.stderr
    assert "ray start --head" in lines[0]
    assert not out.exists()
    assert time.perf_counter() - t0 < 60


def test_without_ray_installed_the_error_says_how_to_get_it(monkeypatch, tmp_path):
    from advbench.eval.evaluator import make_executor

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ConfigError, match=r"pip install 'advbench\[ray\]'"):
        make_executor(parse_config({**GRID, "executor": "ray"}).executor)


def test_executor_fields_are_checked_and_not_part_of_the_hash():
    base = parse_config(GRID)
    ray_cfg = parse_config({**GRID, "executor": {"name": "ray", "address": "10.0.0.1:6379", "workers": 8,
                                                 "gpus_per_job": 0.25}})
    assert ray_cfg.hash() == base.hash() and "executor" not in ray_cfg.canonical()
    with pytest.raises(ConfigError, match="workers applies to the ray executor only"):
        parse_config({**GRID, "executor": {"workers": 2}})
    with pytest.raises(ConfigError, match="executor"):
        parse_config({**GRID, "executor": {"name": "dask"}})
    with pytest.raises(ConfigError, match="gpus_per_job"):
        parse_config({**GRID, "executor": {"name": "ray", "gpus_per_job": -1}})


def test_a_worker_with_other_versions_than_the_driver_is_refused(cluster, tmp_path, monkeypatch):
    from advbench.eval import ray_executor

    real = ray_executor.compared_versions()
    monkeypatch.setattr(ray_executor, "compared_versions", lambda: {**real, "torch": "0.0.1"})  # the driver's only
    small = {**GRID, "models": ["digits-mlp"], "defenses": ["none"], "attacks": ["fgsm"], "masking_checks": False}
    with pytest.raises(ExecutorError, match=r"has .*'torch': '[0-9.+a-z]+'.*the driver .*'torch': '0.0.1'.*same versions"):
        evaluate(parse_config(small), tmp_path / "out", progress=False, warn=False, executor=RayExecutor(workers=1))
    assert not (tmp_path / "out").exists()
