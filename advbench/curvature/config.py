"""The curvature analysis config: data, model, the attack's step sizes, spectra, groups, detector.

Data and models are written as in the benchmark config (:class:`~advbench.specs.DataSpec`,
:class:`~advbench.specs.ModelSpec`); the detector's attack is any registered attack with its
parameters, checked by building it before anything runs. Bad input is one ``error:`` line.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from advbench.analysis.curvature import ALPHAS, CURVATURE_MEASURES
from advbench.errors import ConfigError
from advbench.registry import ATTACKS, DATASETS, MODELS
from advbench.specs import DataSpec, ModelSpec, _Strict, check_device, parse_number, read_yaml_file, seed_field, validated
from advbench.threat import ThreatModel

DEFAULT_CURVATURE_YAML = """\
# The embedded default: `advbench curvature` with no argument runs this (about a minute on 2 cores).
seed: 0
device: auto
data: {name: digits, split: test, n: 200}   # UCI 8x8 digits (scikit-learn); the clean-correct ones are analysed
model: digits-cnn                 # reference model (piecewise linear: its Hessian by the exact Gauss-Newton path)
second_model: digits-mlp          # do the boundary points transfer to it? (null: skip)
batch_size: 50                    # images per resumable part
alphas: [0.1, 0.5, 1, 10]         # iterative-FGSM step sizes in 8-bit pixel units (the seed's)
steps: 100                        # iterative-FGSM iterations per alpha
boundary_alpha: 1                 # its first misclassified iterate gives the attack direction and boundary point
bins: 50                          # spectrum histogram bins, shared by all images
bin_scale: symlog                 # bins of sign(l) log10(1 + |l|/tau), tau 1e-12 of the largest |l|; linear: of the
                                  # eigenvalues (the seed's: a confident image's spectrum is then one bin, so most tie)
by: kl                            # group the images by this measure's quantiles ...
groups: 3                         # ... low / mid / high
trajectories: 4                   # images whose divergence is followed along the attack's iterations (at boundary_alpha)
approximate: true                 # also estimate each exact spectrum by SLQ and compare the divergences
detector: {attack: pgd, norm: linf, eps: 0.1, params: {steps: 20}}   # adversarial images for the detector (null: skip)
"""


class DetectorSpec(_Strict):
    """The attack whose audited adversarial examples the curvature detector must tell from clean ones."""

    attack: str = "pgd"
    norm: str = "linf"
    eps: Any = 0.1
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("eps")
    @classmethod
    def _eps(cls, value: Any) -> float:
        eps = parse_number(value, "detector.eps")
        if not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"must be a positive number, got {value!r}")
        return eps

    def threat(self, bounds: tuple[float, float] = (0.0, 1.0)) -> ThreatModel:
        return ThreatModel(norm=self.norm, eps=self.eps, bounds=bounds)

    def build(self) -> Any:
        """The configured attack (ConfigError for an unknown name, parameter or norm)."""
        attack = ATTACKS.create(self.attack, **self.params)
        if self.norm not in getattr(attack, "norms", (self.norm,)):
            raise ConfigError(f"detector: attack {self.attack!r} takes norms {', '.join(attack.norms)}, "
                              f"got {self.norm!r}")
        return attack


class CurvatureConfig(_Strict):
    """Settings of one curvature analysis run."""

    seed: int = seed_field()
    device: str = "auto"
    data: DataSpec = Field(default_factory=lambda: DataSpec(name="digits", n=200))
    model: ModelSpec = Field(default_factory=lambda: ModelSpec(name="digits-cnn"))
    second_model: ModelSpec | None = None
    batch_size: int = Field(default=50, ge=1)
    alphas: tuple[float, ...] = ALPHAS
    steps: int = Field(default=100, ge=1, le=100_000)
    boundary_alpha: float = 1.0
    bins: int = Field(default=50, ge=2, le=10_000)
    bin_scale: Literal["linear", "symlog"] = "symlog"
    by: str = "kl"
    groups: int = Field(default=3, ge=2, le=20)
    random_directions: int = Field(default=4, ge=1)
    trajectories: int = Field(default=4, ge=0)
    trajectory_steps: int | None = Field(default=None, ge=1)  # None: as many as ``steps``
    approximate: bool = True
    detector: DetectorSpec | None = None
    max_exact_dim: int = Field(default=3072, ge=1)
    slq_steps: int = Field(default=40, ge=2)
    slq_probes: int = Field(default=10, ge=1)
    resamples: int = Field(default=1000, ge=10)

    _device = field_validator("device")(classmethod(lambda cls, v: check_device(v)))

    @field_validator("alphas")
    @classmethod
    def _alphas(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value:
            raise ValueError("must list at least one step size")
        if any(not (math.isfinite(a) and a > 0) for a in value):
            raise ValueError(f"each step size must be a positive number (8-bit pixel units), got {list(value)}")
        if len(set(value)) != len(value):
            raise ValueError(f"step sizes must differ, got {list(value)}")
        return value

    @field_validator("by")
    @classmethod
    def _by(cls, value: str) -> str:
        if value not in CURVATURE_MEASURES:
            raise ValueError(f"must be one of {', '.join(CURVATURE_MEASURES)}, got {value!r}")
        return value

    @model_validator(mode="after")
    def _boundary_alpha_is_run(self) -> CurvatureConfig:
        if self.boundary_alpha not in self.alphas:
            raise ValueError(f"boundary_alpha must be one of the alphas {list(self.alphas)}, got {self.boundary_alpha:g}")
        return self

    def canonical(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def hash(self) -> str:
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def group_names(self) -> tuple[str, ...]:
        """The groups' names, lowest first: low / mid / high for three, q1 ... otherwise."""
        return {2: ("low", "high"), 3: ("low", "mid", "high")}.get(self.groups,
                                                                   tuple(f"q{g + 1}" for g in range(self.groups)))

    def part_key(self) -> dict[str, Any]:
        """The settings a stored batch depends on (not the grouping, bins or bootstrap, which
        only the tables built from the batches read)."""
        presentation = {"bins", "bin_scale", "by", "groups", "resamples", "device"}
        return {k: v for k, v in self.canonical().items() if k not in presentation}


def parse_curvature_config(raw: Any) -> CurvatureConfig:
    """Validate a parsed YAML mapping (ConfigError with a one-line message on bad input)."""
    config = validated(CurvatureConfig, raw, "a curvature config")
    for spec in (config.data,):
        if spec.name is not None:
            DATASETS.get(spec.name)
    for model in (config.model, config.second_model):
        if model is not None and model.source == "registry":
            MODELS.get(model.name)
    if config.detector is not None:
        config.detector.build()
    return config


def load_curvature_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> CurvatureConfig:
    """Read a YAML config file, or the embedded default when ``path`` is None, with ``overrides``
    (e.g. the command line's ``--device``) replacing fields."""
    raw = yaml.safe_load(DEFAULT_CURVATURE_YAML) if path is None else read_yaml_file(path)
    if overrides and isinstance(raw, dict):
        raw = {**raw, **overrides}
    return parse_curvature_config(raw)
