"""The GPU path: PGD, APGD-CE and AutoAttack on CIFAR-10-sized ResNet-18 and WideResNet-28-10.

For every model and attack this measures, on ``--n`` random 3x32x32 images attacked ``--batch``
at a time (linf, eps 8/255),

- **images per second**: images / the attack's wall time (summed over its batches);
- the **cost ratio**: the attack's wall time / what its passes cost when the model runs them alone,

      ratio = wall / (F x t_fwd + B x (t_fwd+bwd - t_fwd)),

  F and B the forward and backward passes the attack made (every call of the model counted, the
  clean pass and the audit included, in units of one full batch), t_fwd and t_fwd+bwd the
  model's own forward and forward+backward (w.r.t. the input) on one full batch, timed just
  before and just after the attack in the same run. For an attack that only makes
  forward+backward pairs it is wall / (passes x t_fwd+bwd); 1.00 means the attack costs exactly
  its passes, everything above is its own overhead (and, in a cascade, the smaller batches of
  the later components, which keep a GPU less busy);
- the GPU's **busy fraction** while the attack ran: NVML's utilization (the share of each sample
  period in which a kernel was running), through pynvml when it is importable, else
  ``nvidia-smi --query-gpu=utilization.gpu`` polled in a thread; "n/a" on a CPU.

The models have random weights (the cost of a pass does not depend on them) and every label is
the model's own clean prediction, so every image is clean-correct and attacked. A randomly
initialized ResNet-18's or WRN-28-10's prediction hardly moves within 8/255, so the attacks break
(almost) no image (robust accuracy, last column): every attack runs all its iterations on every image, and
AutoAttack runs every component (APGD-CE, APGD-T and FAB-T over 9 targets each, Square's 5,000
queries) on all of them, its worst case (a robust model loses some images on the way, and with them their
share of the later components). That is some 40 times APGD-CE's cost, so AutoAttack attacks
only the first ``--aa-n`` images (default 100).

``torch.cuda.synchronize`` is called only before and after each attack call, never inside it.

    python benchmarks/gpu.py                                   # cuda if there is one; n 1000, batch 500, aa-n 100
    python benchmarks/gpu.py --amp --channels-last             # bfloat16 autocast, NHWC
    python benchmarks/gpu.py --device cpu --n 4 --batch 4 --quick   # a CPU smoke run (1 step each), seconds
    python benchmarks/gpu.py --help        # --models, --attacks, --aa-n, --steps, --targets, --reps, --threads, --out
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name: str, path: str) -> Any:
    """The module in the file ``path``, imported by path: neither benchmarks/ (whose
    ``autoattack.py`` would shadow pyautoattack's alias) nor a package ``__init__`` gets involved."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look a module up by name
    spec.loader.exec_module(module)
    return module


_common = _load("_benchmarks_common", os.path.join(HERE, "_common.py"))
publish, sync, timed = _common.publish, _common.sync, _common.timed
DEFAULT_OUT = os.path.join(HERE, "results", "gpu.md")
EPS = 8 / 255
MODELS = ("resnet18", "wrn-28-10", "cifar10-cnn")
ATTACK_NAMES = ("pgd", "apgd-ce", "autoattack")


# ---------------------------------------------------------------------- models
def resnet18_cifar() -> nn.Module:
    """torchvision's ResNet-18 with the CIFAR stem (a 3x3 stride-1 first convolution, no max-pool),
    10 classes: 11.2M parameters, 0.56 G multiply-adds per 32x32 image."""
    import torchvision

    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def wide_resnet_28_10() -> nn.Module:
    """robustbench's WideResNet-28-10 (the architecture most of its CIFAR-10 Linf entries use):
    36.5M parameters, 5.2 G multiply-adds per image."""
    found = importlib.util.find_spec("robustbench")  # locates the package without importing it
    if found is None or found.origin is None:
        raise SystemExit("wrn-28-10 needs robustbench (pip install robustbench==1.1.1)")
    # its architecture file only needs torch; the package's __init__ imports its whole evaluation
    path = os.path.join(os.path.dirname(found.origin), "model_zoo", "architectures", "wide_resnet.py")
    return _load("_robustbench_wide_resnet", path).WideResNet(depth=28, widen_factor=10, num_classes=10)


def build_model(name: str, seed: int) -> nn.Module:
    """``name`` with random weights from ``seed``, in eval mode, parameters frozen."""
    from advbench.models.architectures import build

    with torch.random.fork_rng(devices=[]):  # the caller's global RNG is left as it was
        torch.manual_seed(seed)
        if name == "resnet18":
            model = resnet18_cifar()
        elif name == "wrn-28-10":
            model = wide_resnet_28_10()
        else:  # advbench's small reference CNN: for smoke runs
            model = build(name, seed=seed)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class Passes(nn.Module):
    """The model, counting the rows of every forward call and of every backward pass through
    its output (as :class:`advbench.access.WhiteBoxModel` counts them), whoever makes them."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.forward_rows = 0
        self.backward_rows = 0

    def _backward(self, grad: torch.Tensor) -> None:
        self.backward_rows += grad.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.forward_rows += x.shape[0]
        out = self.model(x)
        if out.requires_grad:
            out.register_hook(self._backward)
        return out


# ---------------------------------------------------------------------- attacks
def capped_autoattack(steps: int | None, targets: int) -> Any:
    """advbench's ``autoattack`` (standard) with its targeted components' target classes capped at
    ``targets`` (and ``steps`` as AutoAttack's own ``steps``/``queries`` take them); the suite
    itself (components, order, cascade, seeding) unchanged."""
    from advbench.attacks.autoattack import AutoAttack, Component
    from advbench.threat import ThreatModel

    class Capped(AutoAttack):
        """AutoAttack with at most ``targets`` target classes per targeted component."""

        name: ClassVar[str] = "autoattack"

        def components(self, threat: ThreatModel) -> list[Component]:
            return [dataclasses.replace(c, params={**c.params, "targets": min(c.params["targets"], targets)})
                    if "targets" in c.params else c for c in super().components(threat)]

    return Capped(version="standard", **_iterations(steps))


def _iterations(steps: int | None) -> dict[str, int]:
    """AutoAttack's ``steps`` and ``queries`` for ``steps`` iterations per component (Square: its
    first query and ``steps`` iterations); nothing where None (the reference's)."""
    return {} if steps is None else {"steps": steps, "queries": steps + 1}


def make_attack(name: str, steps: int | None, targets: int | None) -> tuple[str, Any]:
    """(row label, attack) for ``name``: PGD-40, APGD-CE with 100 steps, AutoAttack standard
    (``steps``/``targets`` override the iterations and target classes)."""
    from advbench import ATTACKS

    if name == "pgd":
        s = steps or 40
        return f"PGD-{s} (step 2.5 eps / {s})", ATTACKS.create("pgd", steps=s)
    if name == "apgd-ce":
        s = steps or 100
        return f"APGD-CE, {s} step{'s' * (s != 1)}", ATTACKS.create("apgd", loss="ce", steps=s)
    if steps is None and targets is None:
        return "AutoAttack standard", ATTACKS.create("autoattack", version="standard")
    detail = ", ".join(p for p in (f"{steps} step{'s' * (steps != 1)}" if steps else "",
                                   f"{targets} target{'s' * (targets != 1)}" if targets else "") if p)
    attack = (capped_autoattack(steps, targets) if targets is not None
              else ATTACKS.create("autoattack", version="standard", **_iterations(steps)))
    return f"AutoAttack standard ({detail})", attack


# ---------------------------------------------------------------------- GPU busy fraction
def _nvml_id(device: torch.device) -> str:
    """The GPU's PCI bus id as NVML and nvidia-smi name it (its index where torch does not say)."""
    props = torch.cuda.get_device_properties(device)
    try:
        return f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"
    except AttributeError:  # an older torch
        return str(device.index or 0)


class BusySampler:
    """The GPU's utilization sampled every ``period`` seconds in a thread while the block runs.

    ``fraction`` is the mean of the samples / 100 (None on a CPU or where neither pynvml nor
    nvidia-smi is available; ``source`` says which was used, or why none). NVML averages over its
    own sample period (1/6 s to 1 s depending on the GPU), so runs shorter than a second read
    coarsely."""

    def __init__(self, device: torch.device, period: float = 0.05) -> None:
        self.period = period
        self.samples: list[float] = []
        self.read: Callable[[], float] | None = None
        self.source = "n/a on a CPU"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if device.type == "cuda":
            self._open(_nvml_id(device))

    def _open(self, gpu: str) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = (pynvml.nvmlDeviceGetHandleByPciBusId(gpu) if ":" in gpu
                      else pynvml.nvmlDeviceGetHandleByIndex(int(gpu)))
            self.read, self.source = (lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)), "pynvml"
            return
        except Exception:  # not installed, or NVML not usable here: try nvidia-smi
            pass
        smi = shutil.which("nvidia-smi")
        if smi is None:
            self.source = "n/a (neither pynvml nor nvidia-smi)"
            return
        cmd = [smi, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", gpu]

        def read() -> float:
            return float(subprocess.run(cmd, capture_output=True, text=True, timeout=5, check=True).stdout.split()[0])

        try:
            read()
        except Exception as exc:  # noqa: BLE001 - report, do not fail the benchmark
            self.source = f"n/a (nvidia-smi failed: {exc})"
            return
        self.read, self.source = read, "nvidia-smi"

    def _loop(self) -> None:
        assert self.read is not None
        while not self._stop.is_set():
            try:
                self.samples.append(self.read())
            except Exception:  # noqa: BLE001 - a missed sample is no reason to stop
                pass
            self._stop.wait(self.period)

    def __enter__(self) -> BusySampler:
        if self.read is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def fraction(self) -> float | None:
        return statistics.mean(self.samples) / 100 if self.samples else None


# ---------------------------------------------------------------------- timing
def baseline(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
             reps: int) -> tuple[float, float]:
    """(forward, forward+backward w.r.t. the input) seconds on the batch ``x``, medians of ``reps``."""
    def fwd() -> None:
        with torch.no_grad():
            model(x)

    def fwd_bwd() -> None:
        xr = x.detach().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(model(xr).float(), y, reduction="sum"), xr)

    f = statistics.median(timed(fwd, device) for _ in range(reps))
    fb = statistics.median(timed(fwd_bwd, device) for _ in range(reps))
    return f, fb


@dataclass
class Row:
    model: str
    attack: str
    n: int
    seconds: float
    forward: float  # passes per image
    backward: float
    t_f: float  # one full batch, seconds (mean of before and after)
    t_fb: float
    ratio: float
    busy: float | None
    busy_source: str  # where the busy fraction came from (or why there is none)
    robust: float  # robust accuracy of the random model, for orientation


def run_attack(label: str, attack: Any, model_name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               batch: int, device: torch.device, reps: int, warmup: Any | None, seed: int) -> Row:
    """Attack all of ``x`` in batches of ``batch``, bracketed by baseline timings; one table row.
    ``warmup`` (the same attack with one iteration, or None) runs once on a batch, untimed."""
    from advbench.threat import ThreatModel

    threat = ThreatModel(norm="linf", eps=EPS)
    counted = Passes(model)
    if warmup is not None:  # kernels chosen, memory allocated, lazy initialization done
        warmup(counted, x[:batch], y[:batch], threat, generator=torch.Generator().manual_seed(seed))
    f0, fb0 = baseline(model, x[:batch], y[:batch], device, reps)
    counted.forward_rows = counted.backward_rows = 0
    seconds, broken = 0.0, 0
    with BusySampler(device) as busy:
        for start in range(0, len(x), batch):
            xb, yb = x[start:start + batch], y[start:start + batch]
            gen = torch.Generator().manual_seed(seed + start)  # on the CPU, as the evaluator's
            sync(device)
            t0 = time.perf_counter()
            result = attack(counted, xb, yb, threat, generator=gen)
            sync(device)
            seconds += time.perf_counter() - t0
            broken += int(result.success.sum())
    f1, fb1 = baseline(model, x[:batch], y[:batch], device, reps)
    t_f, t_fb = (f0 + f1) / 2, (fb0 + fb1) / 2
    fwd, bwd = counted.forward_rows / batch, counted.backward_rows / batch  # in full batches
    expected = fwd * t_f + bwd * max(t_fb - t_f, 0.0)
    return Row(model_name, label, len(x), seconds, counted.forward_rows / len(x), counted.backward_rows / len(x),
               t_f, t_fb, seconds / expected if expected > 0 else float("nan"), busy.fraction, busy.source,
               1 - broken / len(x))


# ---------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda if torch sees a GPU, else cpu")
    p.add_argument("--n", type=int, default=1000, help="images attacked per model and attack (default 1000)")
    p.add_argument("--batch", type=int, default=500, help="images per attack call (default 500)")
    p.add_argument("--aa-n", type=int, default=100,
                   help="images AutoAttack attacks, the first of the n (default 100: it costs some 40 APGD-CEs)")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (advbench's amp: float32 logits)")
    p.add_argument("--channels-last", action="store_true", help="NHWC weights and inputs")
    p.add_argument("--models", default="resnet18,wrn-28-10", help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--attacks", default=",".join(ATTACK_NAMES), help=f"comma-separated, of {', '.join(ATTACK_NAMES)}")
    p.add_argument("--steps", type=int, default=None,
                   help="every attack's iterations (PGD's and APGD's steps, AutoAttack's components'; default: theirs)")
    p.add_argument("--targets", type=int, default=None, help="AutoAttack's target classes per targeted component (9)")
    p.add_argument("--reps", type=int, default=5, help="timings per baseline, before and after each attack (default 5)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=DEFAULT_OUT, help="markdown file to write ('-' for none)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 step per attack, 1 AutoAttack target, 3 baseline timings, no warm-up run")
    args = p.parse_args(argv)
    if args.quick:
        args.steps = args.steps or 1
        args.targets = args.targets or 1
        args.reps = 3
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    for m in models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; allowed: {', '.join(MODELS)}")
    for a in attacks:
        if a not in ATTACK_NAMES:
            p.error(f"unknown attack {a!r}; allowed: {', '.join(ATTACK_NAMES)}")
    if min(args.n, args.batch, args.aa_n, args.reps) < 1 or (args.steps is not None and args.steps < 1):
        p.error("--n, --batch, --aa-n, --reps and --steps must be at least 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda was asked for, but torch sees no CUDA device")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from advbench.loading import Autocast

    g = torch.Generator().manual_seed(args.seed)
    x_host = torch.rand(args.n, 3, 32, 32, generator=g)
    rows: list[Row] = []
    sizes: dict[str, int] = {}
    for name in models:
        model = build_model(name, args.seed).to(device)
        sizes[name] = sum(q.numel() for q in model.parameters())
        x = x_host.to(device)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        deployed: nn.Module = Autocast(model, device.type) if args.amp else model
        with torch.no_grad():  # every image clean-correct: the labels are the model's predictions
            y = torch.cat([deployed(xb).argmax(dim=1) for xb in x.split(args.batch)])
        baseline(deployed, x[:args.batch], y[:args.batch], device, 1)  # warm-up
        for attack_name in attacks:
            label, attack = make_attack(attack_name, args.steps, args.targets)
            warmup = None if args.quick else make_attack(attack_name, 1, 1)[1]
            n = min(args.aa_n, args.n) if attack_name == "autoattack" else args.n
            row = run_attack(label, attack, name, deployed, x[:n], y[:n], min(args.batch, n), device, args.reps,
                             warmup=warmup, seed=args.seed)
            rows.append(row)
            print(f"{name} {label}: {row.n / row.seconds:.2f} images/s, ratio {row.ratio:.2f}", file=sys.stderr)
        del model, deployed, x
        if device.type == "cuda":
            torch.cuda.empty_cache()
    publish(report(args, argv, device, rows, sizes), args.out)
    return 0


def report(args: argparse.Namespace, argv: list[str] | None, device: torch.device, rows: list[Row],
           sizes: dict[str, int]) -> str:
    """The markdown report: what was measured, the command, the environment, the table."""
    shown = argv if argv is not None else sys.argv[1:]
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/gpu.py", *shown])
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
        kind = "GPU"
    else:
        where = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
        kind = "CPU"
    busy_source = ", ".join(sorted({r.busy_source for r in rows})) or "n/a"
    busy_source = "n/a on a CPU" if device.type != "cuda" else busy_source
    if device.type == "cuda":
        scope = ""
    else:
        scope = ("\n**These are CPU figures**, not the GPU's: this file was written by a CPU run and holds\n"
                 "no GPU figures (a CPU has no busy fraction: n/a). Run the script on a GPU machine\n"
                 "(`--device cuda`, the default there) for those.\n")
        if args.quick:
            scope += ("A quick run (1 iteration per attack, 1 AutoAttack target, 3 baseline timings): the clean\n"
                      "pass and the audit weigh on every ratio, and one timing of a few milliseconds is noisy on a\n"
                      "shared machine; a smoke test of the script, not a measurement of the attacks.\n")
    table = [
        "| model | attack | images | images/s | passes per image (fwd / bwd) | fwd, fwd+bwd per batch (ms) "
        "| cost ratio | GPU busy | robust acc. |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        busy = "n/a" if r.busy is None else f"{100 * r.busy:.0f}%"
        table.append(f"| {r.model} | {r.attack} | {r.n} | {r.n / r.seconds:.2f} | {r.forward:.1f} / {r.backward:.1f} "
                     f"| {1e3 * r.t_f:.1f}, {1e3 * r.t_fb:.1f} | **{r.ratio:.2f}** | {busy} | {100 * r.robust:.1f}% |")
    models = ", ".join(f"{m} ({sizes[m] / 1e6:.2f}M parameters)" for m in sizes)
    return f"""# The GPU path: attack throughput ({kind} figures)

Images per second, and the cost ratio = attack wall time / (the attack's forward passes x one
forward + its backward passes x one backward, each timed on the model alone on a full batch
just before and after the attack; the clean pass and the audit are counted), for linf eps 8/255
on random 3x32x32 images labelled with the model's own predictions (all clean-correct). Random
weights: a ResNet-18 or WRN-28-10 loses (almost) no image (robust accuracy, last column), so every
attack runs all its iterations on every image, and AutoAttack every component on all of them
(its worst case).
GPU busy: NVML utilization during the attack ({busy_source}). `benchmarks/gpu.py` says how
each figure is measured.
{scope}
Command: `{command}`

Environment: torch {torch.__version__}, device {device} ({where}), Python {platform.python_version()};
batch {min(args.batch, args.n)} (AutoAttack: {min(args.batch, args.aa_n, args.n)}), amp {"bfloat16" if args.amp else "off"}, channels_last {"on" if args.channels_last else "off"};
models: {models}.

{chr(10).join(table)}
"""


if __name__ == "__main__":
    raise SystemExit(main())
