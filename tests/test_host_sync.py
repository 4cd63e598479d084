"""No host-device synchronisation inside an attack's iteration loop, checked on any device.

A value read back from the device (``.item()``, ``bool``/``float``/``int`` of a tensor, ``.cpu()``,
``.tolist()``), or a result whose shape depends on the data (``nonzero``, a boolean-mask index),
makes the host wait until the device has finished everything queued: on a GPU, one such call per
step drains the launch queue every step. :class:`advbench.tensors.HostSyncCounter` counts those
calls as they pass through ``__torch_function__``, so the check runs on a CPU too: each attack runs
twice, with 5 and with 20 iterations, and the calls it makes must be the same (by kind and by the
line that makes them) in both runs. What an attack reads back once per call (the base class's
input checks and audit) or once per restart or target (which examples are still failing) is
allowed; it does not grow with the iterations.

Three attacks are bounded instead, each for a reason given with its test:

- Square reads back, once per iteration, which examples are still failing, as the reference does:
  only those are queried, so queries and passes stay what they are, and its draws per queried
  example keep the reference's random stream;
- DeepFool reads back, once per iteration, which examples go on: each one dropped saves its
  candidates - 1 backward passes in every later iteration (``test_deepfool.py`` checks the drop);
- Carlini-Wagner reads back, every ceil(steps / 10) iterations (its stall-check period), how
  many rows finished, to shrink the batch: about ten times per optimization problem whatever
  ``steps``.

``torch.cuda.set_sync_debug_mode("error")`` makes the same check on a GPU (``test_gpu.py``).
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import pytest
import torch
from torch import nn

from advbench.attacks import cw as cw_module
from advbench.attacks import deepfool as deepfool_module
from advbench.attacks import square as square_module
from advbench.registry import ATTACKS
from advbench.tensors import HostSyncCounter
from advbench.threat import ThreatModel

N = 40  # examples: enough that some finish early and some do not

#: (id, attack, params, the parameter that sets the iterations, norm, eps, model fixture)
LOOP_FREE: list[tuple[str, str, dict[str, Any], str | None, str, float, str]] = [
    ("fgsm", "fgsm", {}, None, "linf", 0.1, "digits_mlp"),
    ("fgsm-l2", "fgsm", {}, None, "l2", 1.0, "digits_cnn"),
    ("bim", "bim", {}, "steps", "linf", 0.1, "digits_mlp"),
    ("illc", "illc", {}, "steps", "linf", 0.1, "digits_cnn"),
    ("pgd-linf", "pgd", {}, "steps", "linf", 0.1, "digits_mlp"),
    ("pgd-l2", "pgd", {}, "steps", "l2", 1.0, "digits_cnn"),
    ("pgd-linf-restarts", "pgd", {"restarts": 2}, "steps", "linf", 0.1, "digits_mlp"),
    ("pgd-l2-restarts", "pgd", {"restarts": 2, "loss": "margin"}, "steps", "l2", 1.0, "digits_cnn"),
    ("apgd-ce-linf", "apgd", {"loss": "ce"}, "steps", "linf", 0.1, "digits_mlp"),
    ("apgd-dlr-linf", "apgd", {"loss": "dlr"}, "steps", "linf", 0.1, "digits_cnn"),
    ("apgd-ce-l2", "apgd", {"loss": "ce"}, "steps", "l2", 1.0, "digits_cnn"),
    ("apgd-dlr-l2", "apgd", {"loss": "dlr", "restarts": 2}, "steps", "l2", 1.0, "digits_mlp"),
    ("apgd-ce-l1", "apgd", {"loss": "ce"}, "steps", "l1", 6.0, "digits_mlp"),
    ("apgd-dlr-l1-schedule", "apgd", {"loss": "dlr", "l1_eps_schedule": True}, "steps", "l1", 6.0, "digits_cnn"),
    ("apgd-t-linf", "apgd-t", {"targets": 3}, "steps", "linf", 0.1, "digits_mlp"),
    ("apgd-t-l2", "apgd-t", {"targets": 3}, "steps", "l2", 1.0, "digits_cnn"),
    ("apgd-t-l1", "apgd-t", {"targets": 2}, "steps", "l1", 6.0, "digits_mlp"),
    ("fab-linf", "fab", {}, "steps", "linf", 0.1, "digits_mlp"),
    ("fab-l2-restarts", "fab", {"restarts": 2}, "steps", "l2", 1.0, "digits_cnn"),
    ("fab-l1", "fab", {}, "steps", "l1", 6.0, "digits_mlp"),
    ("fab-t-linf", "fab-t", {"targets": 3}, "steps", "linf", 0.1, "digits_cnn"),
]


class Calls(nn.Module):
    """The model, counting its forward calls: all of them, and those made with grad enabled on an
    input that requires grad (an attack's gradient steps; clean passes and audits run without)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls = 0
        self.grad_calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.grad_calls += int(torch.is_grad_enabled() and x.requires_grad)
        return self.model(x)


def attack_once(name: str, params: dict[str, Any], model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                threat: ThreatModel) -> tuple[HostSyncCounter, Calls]:
    """Run the attack under a sync counter on a counting model; (counter, calls)."""
    calls = Calls(model)
    attack = ATTACKS.create(name, **params)
    with HostSyncCounter() as counter:
        attack(calls, x, y, threat, generator=torch.Generator().manual_seed(0))
    return counter, calls


def line_of(module: Any, text: str) -> str:
    """``file:line`` (as the counter names it) of the one line of ``module`` holding ``text``."""
    with open(inspect.getsourcefile(module)) as fh:
        hits = [i for i, line in enumerate(fh, 1) if text in line]
    assert len(hits) == 1, f"{text!r} occurs {len(hits)} times in {module.__name__}"
    path = module.__name__.replace(".", "/") + ".py"
    return f"{path}:{hits[0]}"


def at(counter: HostSyncCounter, where: str) -> int:
    """The syncs the counter saw made at ``where`` (``path:line``)."""
    return sum(n for (_, loc), n in counter.counts.items() if loc.endswith(where))


def without(counter: HostSyncCounter, where: str) -> dict[tuple[str, str], int]:
    return {k: n for k, n in counter.counts.items() if not k[1].endswith(where)}


@pytest.fixture()
def batch(digits_test) -> tuple[torch.Tensor, torch.Tensor]:
    return digits_test.x[:N], digits_test.y[:N]


def test_counter_sees_every_kind_of_sync():
    t = torch.tensor([0.5, 2.0])
    mask = t > 1
    with HostSyncCounter() as c:
        bool(mask.any()), float(t[0]), int(t[1]), t[0].item(), t.tolist(), t.cpu(), t.nonzero()
        torch.nonzero(t), t.numpy(), t[mask], torch.masked_select(t, mask), t.to("cpu"), torch.where(mask)
        t[mask] = 0.0
        t[torch.tensor([0])], t[0], t.to(t.device), t.sum(), torch.where(mask, t, 0.0)  # none of these
    kinds = sorted(kind for kind, _ in c.counts)
    assert kinds == sorted(["bool", "float", "int", "item", "tolist", "cpu", "nonzero", "nonzero", "numpy",
                            "bool-mask getitem", "masked_select", "to(cpu)", "where(cond)", "bool-mask setitem"])
    assert c.total == 14 and all(loc.startswith("tests/test_host_sync.py:") for _, loc, _ in c.where())


@pytest.mark.parametrize("case", LOOP_FREE, ids=[c[0] for c in LOOP_FREE])
def test_no_sync_per_iteration(case, batch, request):
    _, name, params, knob, norm, eps, model_name = case
    model = request.getfixturevalue(model_name)
    x, y = batch
    threat = ThreatModel(norm=norm, eps=eps)
    runs = [attack_once(name, {**params, **({knob: steps} if knob else {})}, model, x, y, threat)
            for steps in ((5, 20) if knob else (None,))]
    few = runs[0][0]
    # per call: the base class's input checks and its audit read a handful of values back; per
    # restart or target at most one selection of the examples still failing
    assert few.total <= 12, few.where()
    for counter, calls in runs[1:]:
        assert calls.calls > runs[0][1].calls  # the second run did iterate more
        assert counter.counts == few.counts, (few.where(), counter.where())


@pytest.mark.parametrize("name, params", [("pgd", {"restarts": 2}), ("apgd", {"restarts": 2})])
def test_no_sync_per_iteration_under_8bit_quantization(name, params, batch, digits_mlp):
    """PGD and APGD check the 8-bit image once per restart, not per step."""
    x, y = batch
    threat = ThreatModel(norm="linf", eps=0.1, quantize="8bit")
    few, _ = attack_once(name, {**params, "steps": 5}, digits_mlp, x, y, threat)
    many, _ = attack_once(name, {**params, "steps": 20}, digits_mlp, x, y, threat)
    assert many.counts == few.counts, (few.where(), many.where())


def test_fab_under_8bit_quantization_syncs_twice_per_iteration_at_most(batch, digits_mlp):
    """Under ``quantize: 8bit`` FAB asks :func:`advbench.audit.reached` per iteration whether the
    rounded image is adversarial too, which runs the extra forward pass on the examples that are
    adversarial before rounding only (a ``nonzero``, and an ``any`` to skip it when there are none):
    a pass saved on the others, at two syncs per iteration. Without quantization FAB makes none."""
    x, y = batch
    threat = ThreatModel(norm="linf", eps=0.1, quantize="8bit")
    few, _ = attack_once("fab", {"steps": 5}, digits_mlp, x, y, threat)
    many, _ = attack_once("fab", {"steps": 20}, digits_mlp, x, y, threat)
    extra = {k: n - few.counts.get(k, 0) for k, n in many.counts.items() if n != few.counts.get(k, 0)}
    assert 0 < many.total - few.total <= 2 * (20 - 5), extra
    assert all(loc.startswith("advbench/audit.py:") for _, loc in extra), extra


@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 1.0)])
def test_square_syncs_once_per_iteration(norm, eps, batch, digits_cnn):
    """Square selects the examples still failing once per iteration (``nonzero``), as the reference
    (``idx_to_fool``): only they are queried, which keeps the per-example query and pass counts,
    and under l2 (and ``draws: example``) the generator draws per queried example, so masking the
    whole batch instead would change the random stream and the results. That one selection is the
    loop's only sync (the loop may end on an empty selection: one more)."""
    x, y = batch
    threat = ThreatModel(norm=norm, eps=eps)
    select = line_of(square_module, "a = active.nonzero().squeeze(1)")
    none, c0 = attack_once("square", {"queries": 1}, digits_cnn, x, y, threat)  # the first query only: no loop
    assert at(none, select) == 0
    for queries in (5, 20):
        counter, calls = attack_once("square", {"queries": queries}, digits_cnn, x, y, threat)
        iterations = calls.calls - c0.calls  # one query batch, one forward, per iteration
        assert iterations >= 1
        assert iterations <= at(counter, select) <= iterations + 1, counter.where()
        assert without(counter, select) == without(none, select)  # nothing else grows


def test_deepfool_syncs_once_per_iteration(batch, digits_mlp):
    """DeepFool keeps its per-iteration drop of the finished examples (each one dropped saves
    candidates - 1 backward passes in every later iteration; ``test_deepfool.py`` checks the
    passes), at one sync per iteration: the indices of the examples that go on, which also ends
    the loop when none is left. Every other call is per attack call."""
    x, y = batch
    threat = ThreatModel(norm="l2", eps=1.0)
    select = line_of(deepfool_module, "keep = (~done).nonzero().squeeze(1)")
    runs = [attack_once("deepfool", {"steps": steps}, digits_mlp, x, y, threat) for steps in (2, 5, 20)]
    for counter, calls in runs:
        iterations = calls.grad_calls  # one forward with gradients per iteration
        assert iterations - 1 <= at(counter, select) <= iterations, counter.where()
        assert without(counter, select) == without(runs[0][0], select)
    assert runs[0][1].grad_calls < runs[1][1].grad_calls  # steps bound the iterations here


@pytest.mark.parametrize("norm, eps, params", [("l2", 1.0, {"search_steps": 3}), ("linf", 0.1, {}),
                                               ("l0", 6, {})])
def test_cw_syncs_once_per_stall_check(norm, eps, params, batch, digits_mlp):
    """Carlini-Wagner shrinks its batch to the rows still running once per stall-check period
    (``check`` = ceil(steps / 10) iterations), one sync each (how many finished; the rows are then
    gathered by index): about ten per optimization problem whatever ``steps``. Under l2 a row runs
    at most ``search_steps`` problems, so the syncs are bounded by 10 search_steps + the per-call
    ones for every ``steps``."""
    x, y = batch[0][:20], batch[1][:20]
    threat = ThreatModel(norm=norm, eps=eps)
    pop = line_of(cw_module, "n_done = int(done.sum())")
    base = None
    for steps in (10, 40):
        counter, calls = attack_once("cw", {**params, "steps": steps}, digits_mlp, x, y, threat)
        check = math.ceil(steps / 10)
        iterations = calls.grad_calls  # one forward with gradients per iteration, all rows at once
        assert iterations % check == 0 and at(counter, pop) == iterations // check, counter.where()
        if norm == "l2":
            assert at(counter, pop) <= 10 * params["search_steps"]
        rest = without(counter, pop)
        assert base is None or rest == base
        base = rest
