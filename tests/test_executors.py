"""What every executor relies on, in this process: jobs grouped into dispatch units, the jobs a
cascaded job reads, a worker refusing content other than the planned, and an attack that runs
out of device memory retried on halves of its batch (recorded, numbers unchanged)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from advbench.config import parse_config
from advbench.eval.evaluator import evaluate, make_executor
from advbench.eval.executors import bundles, dependencies, needs
from advbench.eval.plan import plan_jobs
from advbench.eval.worker import ContentMismatchError, Worker

CASCADE = {
    "data": {"name": "digits", "split": "test", "n": 40},
    "models": ["digits-mlp"],
    "threats": [{"norm": "linf", "eps": [0.05, 0.1, 0.2]}],
    "attacks": ["fgsm", {"name": "deepfool", "steps": 10}, {"name": "bim", "steps": 5}],
    "batch_size": 20,
    "cascade": True,
}


@pytest.fixture(scope="module")
def cascade_jobs():
    import numpy as np
    import torch

    config = parse_config(CASCADE)
    return plan_jobs(config, np.arange(40), worker=Worker(torch.device("cpu")))


def test_a_minimal_attacks_eps_sweep_is_one_unit_and_every_other_job_its_own(cascade_jobs):
    units = bundles(cascade_jobs)
    assert sum(len(u) for u in units) == len(cascade_jobs) == 3 * 3 * 2
    sweeps = [u for u in units if len(u) > 1]
    assert len(sweeps) == 2  # deepfool: one unit per shard, holding its three eps
    assert all(len({j.sweep_key for j in u}) == 1 and len(u) == 3 and u[0].minimal for u in sweeps)
    assert all(not u[0].minimal for u in units if len(u) == 1)


def test_a_cascaded_job_waits_for_the_jobs_before_it_a_minimal_one_for_none(cascade_jobs):
    by_key = {j.key: j for j in cascade_jobs}
    for job in cascade_jobs:
        if job.minimal:
            assert needs(job) == ()  # it searches every clean-correct point, whatever came before
        else:
            assert needs(job) == ((job.after,) if job.after else ())
            deps = [by_key[k] for k in dependencies(job)]
            assert all(d.shard == job.shard and d.threat == job.threat for d in deps)
    bim = [j for j in cascade_jobs if j.attack_label == "bim"]
    assert all({by_key[k].attack_label for k in dependencies(j)} == {"fgsm", "deepfool"} for j in bim)


def test_the_default_executor_is_in_process():
    ex = make_executor(parse_config(CASCADE).executor)
    assert ex.describe() == {"name": "inprocess"}


def test_a_worker_refuses_a_model_or_examples_other_than_the_planned(cascade_jobs):
    import torch

    worker = Worker(torch.device("cpu"))
    job = cascade_jobs[0]
    worker.check_content(job)  # the planned content: fine
    other = dataclasses.replace(job, content={**job.content, "model": "0" * 20})
    with pytest.raises(ContentMismatchError, match="model 'digits-mlp' with content digest .* planned on 0000"):
        worker.check_content(other)
    other = dataclasses.replace(job, content={**job.content, "data": "f" * 20})
    with pytest.raises(ContentMismatchError, match="examples of shard 0"):
        worker.check_content(other)


OOM_MODULE = '''
import torch
from advbench.zoo import load_zoo_model


class FitsFour(torch.nn.Module):
    """digits-mlp that, like a full GPU, cannot take a gradient through more than 4 examples."""

    def __init__(self):
        super().__init__()
        self.net = load_zoo_model("digits-mlp")

    def forward(self, x):
        if torch.is_grad_enabled() and x.requires_grad and x.shape[0] > 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.net(x)


def build():
    return FitsFour().eval()
'''


def test_out_of_memory_halves_the_batch_records_it_and_keeps_the_numbers(tmp_path, monkeypatch):
    (tmp_path / "oom_models.py").write_text(OOM_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    common = {"data": {"name": "digits", "split": "test", "n": 30}, "threats": [{"norm": "linf", "eps": [0.1]}],
              "attacks": ["fgsm", {"name": "bim", "steps": 5}], "masking_checks": False}
    small = evaluate(parse_config({**common, "models": [{"name": "m", "import": "oom_models:build"}]}),
                     tmp_path / "small", progress=False, warn=False)
    whole = evaluate(parse_config({**common, "models": ["digits-mlp"]}), tmp_path / "whole", progress=False, warn=False)
    cols = ["attack", "n", "clean_accuracy", "robust_accuracy", "attack_success_rate", "audit_violations",
            "n_forward", "n_backward"]
    assert small.table[cols].to_dict("records") == whole.table[cols].to_dict("records")
    events = json.loads((tmp_path / "small" / "run.json").read_text())["executor"]["out_of_memory"]
    attacked = round(small.table.clean_accuracy.iloc[0] * 30)
    first = [e for e in events if e["attack"] == "fgsm"]
    assert first[0]["examples"] == attacked and first[0]["batch"] == (attacked + 1) // 2
    assert all(e["batch"] <= 4 for e in first[-1:]) and {e["attack"] for e in events} == {"fgsm", "bim"}
    assert "out_of_memory" not in json.loads((tmp_path / "whole" / "run.json").read_text())["executor"]


def test_channels_last_puts_the_convolutions_in_nhwc_and_is_part_of_the_runs_identity(tmp_path):
    import torch

    from advbench.eval.plan import defense_spec, model_spec

    config = parse_config({**CASCADE, "models": ["digits-cnn"], "channels_last": True, "masking_checks": False})
    assert config.hash() != parse_config({**CASCADE, "models": ["digits-cnn"], "masking_checks": False}).hash()
    assert "channels_last" not in parse_config(CASCADE).canonical()  # the default keeps the hashes runs had
    worker = Worker(torch.device("cpu"), channels_last=True)
    model = worker.model(model_spec(config.models[0]), defense_spec(config.defenses[0]))
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    res = evaluate(config, tmp_path, progress=False, warn=False)
    assert res.table.audit_violations.sum() == 0 and len(res.table) > 0


def test_the_command_lines_executor_flags_merge_into_the_configs(tmp_path):
    import yaml

    from advbench.cli import main
    from advbench.config import load_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**CASCADE, "data": {"name": "digits", "n": 10}, "attacks": ["fgsm"],
                                   "masking_checks": False, "executor": {"name": "ray", "workers": 4}}))
    assert load_config(cfg, {"executor": {"address": "h:1"}}).executor.model_dump() == {
        "name": "ray", "address": "h:1", "workers": 4, "gpus_per_job": 0.0}
    assert main(["evaluate", str(cfg), "--out", str(tmp_path / "run"), "--quiet", "--executor", "inprocess"]) == 0
    assert json.loads((tmp_path / "run" / "run.json").read_text())["executor"] == {"name": "inprocess"}
