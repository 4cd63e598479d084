"""Threat-model descriptors: what an attacker may change, how much, and what it may see.

A :class:`ThreatModel` is frozen, hashable and serializable (``to_dict``/``from_dict``). It
projects onto its perturbation set, measures distances in its norm and tests membership
allowing floating-point rounding only (:meth:`ThreatModel.slack`). Inputs follow the PyTorch convention: a batch
``x`` of shape ``(N, ...)`` (images NCHW) with values inside ``bounds``.

Norm conventions (per example):

- ``linf``: max absolute change of any element;
- ``l2``, ``l1``: the vector norm over all elements;
- ``l0``: the number of *pixels* changed, a pixel being all channels at one (h, w) position
  for 4-D NCHW batches, and a single element for any other shape;
- ``unbounded``: no budget (``eps`` is ``inf``), only the input bounds apply.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, replace
from enum import Enum
from typing import Any

import torch

from advbench.errors import ConfigError
from advbench.params import check_number, check_whole
from advbench.registry import TRANSFORMATIONS  # filled by the package import before any lookup

class Norm(str, Enum):
    LINF = "linf"
    L2 = "l2"
    L1 = "l1"
    L0 = "l0"
    UNBOUNDED = "unbounded"


class Targeting(str, Enum):
    UNTARGETED = "untargeted"
    FIXED = "fixed"  # one class for every example (``target_class``)
    RANDOM = "random"  # a class drawn uniformly among the wrong ones, per example
    LEAST_LIKELY = "least_likely"  # argmin_y p(y | x) on the clean input


class Scope(str, Enum):
    INDIVIDUAL = "individual"  # a perturbation per example
    UNIVERSAL = "universal"  # one perturbation shared by every example (or by every example of a class)


class Knowledge(str, Enum):
    WHITE_BOX = "white_box"  # logits and gradients
    SCORE_BASED = "score_based"  # probabilities only, counted queries
    DECISION_BASED = "decision_based"  # top-1 labels only, counted queries
    TRANSFER = "transfer"  # no access to the target at all


def _enum(cls: type[Enum], value: Any, what: str) -> Any:
    if isinstance(value, cls):
        return value
    try:
        return cls(str(value).lower().replace("-", "_"))
    except ValueError:
        allowed = ", ".join(m.value for m in cls)  # type: ignore[attr-defined]
        raise ConfigError(f"unknown {what} {value!r}; allowed: {allowed}") from None


REGION_LOCATIONS = ("fixed", "random", "any")
PHYSICAL_RULES = ("all", "majority", "mean")


@dataclass(frozen=True)
class Region:
    """Where the attacker may change the image: a ``size`` x ``size`` square of pixels (all channels).

    ``location``: ``fixed`` (top-left corner ``at`` = (row, col), the same for every example),
    ``random`` (a corner drawn uniformly per example from the evaluation's generator, told to the
    attacker; the placement of Brown et al.'s patch at test time), or ``any`` (the attacker picks
    the square per example: the audit accepts any change whose changed pixels fit in one square).
    Inside the square the threat model's norm and eps apply (``unbounded``: any value in the
    bounds, a patch); outside it nothing may change."""

    size: int
    location: str = "any"
    at: tuple[int, int] | None = None
    shape: str = "square"

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if self.shape != "square":
            raise ConfigError(f"region shape must be 'square', got {self.shape!r}")
        set_(self, "size", check_whole(self.size, "region size (pixels)", 1))
        if self.location not in REGION_LOCATIONS:
            raise ConfigError(f"region location must be one of {', '.join(REGION_LOCATIONS)}, got {self.location!r}")
        if self.location == "fixed":
            if self.at is None:
                raise ConfigError("region location 'fixed' needs at: [row, col], the square's top-left pixel")
            try:
                row, col = self.at
            except (TypeError, ValueError):
                raise ConfigError(f"region at must be [row, col], got {self.at!r}") from None
            set_(self, "at", (check_whole(row, "region at row", 0), check_whole(col, "region at col", 0)))
        elif self.at is not None:
            raise ConfigError(f"region at is only allowed with location 'fixed', not {self.location!r}")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"shape": self.shape, "size": self.size, "location": self.location}
        if self.at is not None:
            d["at"] = list(self.at)
        return d

    def check_fits(self, height: int, width: int) -> None:
        """A ConfigError when the square (at its fixed corner) does not fit an image of this size."""
        if self.size > min(height, width):
            raise ConfigError(f"region size {self.size} does not fit {height}x{width} images")
        if self.at is not None and (self.at[0] + self.size > height or self.at[1] + self.size > width):
            raise ConfigError(f"region at {list(self.at)} with size {self.size} leaves the {height}x{width} image")

    def label(self) -> str:
        where = f"{self.at[0]},{self.at[1]}" if self.at is not None else self.location
        return f"square{self.size}@{where}"


@dataclass(frozen=True)
class Perceptual:
    """An imperceptibility bound other than a norm: ``ssim``, the least structural similarity
    (scikit-image's ``structural_similarity``, as the blind-spot tables compute it) an example
    may have to its clean input."""

    ssim: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "ssim", check_number(self.ssim, "perceptual ssim", low=0, high=1))
        if self.ssim <= 0:
            raise ConfigError(f"perceptual ssim must lie in (0, 1], got {self.ssim}")

    def to_dict(self) -> dict[str, Any]:
        return {"ssim": self.ssim}

    def label(self) -> str:
        return f"ssim{self.ssim:g}"


@dataclass(frozen=True)
class Physical:
    """A physical data feed: what the model sees is ``transform`` (a registered destruction-rate
    transformation, by name or ``{name, params}``) of the example, drawn ``draws`` times (each
    example's randomness seeded by ``seed``, the draw and its clean image, so its verdict does
    not depend on its batch). ``rule``: the example counts only if it is adversarial after
    ``all`` draws, or after a strict ``majority`` of them; or (``mean``) it counts for the share
    of draws it is adversarial in, as a randomized defense's ``mean`` scoring counts a point (an
    attack's boolean success is then adversarial in every draw). The seed is part of the threat model,
    so an attacker could fit the audit's exact draws: report a physical result with the seed it
    was audited at, and re-audit with another to see it hold."""

    transform: str
    params: tuple[tuple[str, Any], ...] = ()
    draws: int = 8
    rule: str = "all"
    seed: int = 0

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if not isinstance(self.transform, str) or not self.transform:
            raise ConfigError(f"physical transform must be a registered transformation's name, got {self.transform!r}")
        set_(self, "params", tuple(sorted((str(k), _freeze(v)) for k, v in dict(self.params).items())))
        set_(self, "draws", check_whole(self.draws, "physical draws", 1))
        set_(self, "seed", check_whole(self.seed, "physical seed", 0))
        if self.rule not in PHYSICAL_RULES:
            raise ConfigError(f"physical rule must be one of {', '.join(PHYSICAL_RULES)}, got {self.rule!r}")

    @classmethod
    def parse(cls, value: Any) -> Physical:
        if isinstance(value, Physical):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"physical must be a mapping {{transform: NAME, draws: N, rule: all|majority|mean}}, got {value!r}")
        unknown = set(value) - {"transform", "draws", "rule", "seed"}
        if unknown:
            raise ConfigError(f"unknown physical field(s) {sorted(unknown)}; allowed: draws, rule, seed, transform")
        spec = value.get("transform")
        if isinstance(spec, dict):
            params = {k: v for k, v in spec.items() if k != "name"}
            spec = spec.get("name")
        else:
            params = {}
        return cls(transform=spec, params=tuple(params.items()), **{k: value[k] for k in ("draws", "rule", "seed") if k in value})

    def to_dict(self) -> dict[str, Any]:
        transform: Any = {"name": self.transform, **self.plain_params()} if self.params else self.transform
        return {"transform": transform, "draws": self.draws, "rule": self.rule, "seed": self.seed}

    def build(self) -> Any:
        """The registered transformation (a ConfigError for an unknown name or a bad parameter)."""
        return TRANSFORMATIONS.create(self.transform, **self.plain_params())

    def plain_params(self) -> dict[str, Any]:
        """The transformation's parameters as plain JSON types (lists and mappings again)."""
        return {k: _thaw(v) for k, v in self.params}

    def label(self) -> str:
        """``photo x8-all``-style token; parameters that are all scalars are spelled out, nested
        ones (a chain's steps) are named by a short digest of their canonical JSON (a file-name-safe id)."""
        if all(isinstance(v, (int, float, str, bool)) for _, v in self.params):
            inner = ",".join(f"{k}={v}" for k, v in self.params)
        else:
            blob = json.dumps(self.plain_params(), sort_keys=True, separators=(",", ":"))
            inner = hashlib.sha256(blob.encode()).hexdigest()[:8]
        return f"{self.transform}{f'({inner})' if inner else ''}x{self.draws}-{self.rule}"


def _freeze(value: Any) -> Any:
    """A hashable form of a JSON value: lists as tuples, mappings as ("__map__", sorted pairs)."""
    if isinstance(value, dict):
        return ("__map__", tuple(sorted((str(k), _freeze(v)) for k, v in value.items())))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    """The JSON value :func:`_freeze` made hashable."""
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "__map__":
        return {k: _thaw(v) for k, v in value[1]}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def _parse_field(cls: type, value: Any, what: str, allowed: str) -> Any:
    """A Region / Perceptual from its mapping (None stays None)."""
    if value is None or isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"{what} must be a mapping {allowed}, got {value!r}")
    names = {f for f in cls.__dataclass_fields__}  # type: ignore[attr-defined]
    unknown = set(value) - names
    if unknown:
        raise ConfigError(f"unknown {what} field(s) {sorted(unknown)}; allowed: {', '.join(sorted(names))}")
    d = dict(value)
    if "at" in d and isinstance(d["at"], list):
        d["at"] = tuple(d["at"])
    return cls(**d)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _pixel_magnitude(delta: torch.Tensor) -> torch.Tensor:
    """Per-pixel change magnitude, shape (N, P): max over channels for NCHW, |.| otherwise."""
    if delta.dim() == 4:
        return delta.abs().amax(dim=1).reshape(delta.shape[0], -1)
    return _flat(delta.abs())


@dataclass(frozen=True)
class ThreatModel:
    """The set of allowed adversarial inputs around each clean input, and the attacker's access.

    ``eps`` is in input units (for bounds [0, 1], ``8/255`` is 8 grey levels); for ``l0`` it is
    a whole number of pixels. ``query_budget`` counts model queries *per example* for score- and
    decision-based attackers. ``quantize="8bit"`` makes the image that counts the example rounded
    to 256 levels, as a saved image would be (:meth:`quantized`); it must pass the audit itself.
    """

    norm: Norm = Norm.LINF
    eps: float = 8 / 255
    bounds: tuple[float, float] = (0.0, 1.0)
    targeting: Targeting = Targeting.UNTARGETED
    target_class: int | None = None
    knowledge: Knowledge = Knowledge.WHITE_BOX
    query_budget: int | None = None
    quantize: str | None = None
    #: one perturbation per example, or one shared by all examples (``shared_by: set``) or by
    #: all examples of a class (``shared_by: class``: each example carries its true class's
    #: perturbation, so the attacker is granted the label of every example it perturbs)
    scope: Scope = Scope.INDIVIDUAL
    shared_by: str | None = None
    region: Region | None = None
    perceptual: Perceptual | None = None
    physical: Physical | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "norm", _enum(Norm, self.norm, "norm"))
        set_(self, "targeting", _enum(Targeting, self.targeting, "targeting"))
        set_(self, "knowledge", _enum(Knowledge, self.knowledge, "knowledge"))
        set_(self, "scope", _enum(Scope, self.scope, "scope"))
        set_(self, "region", _parse_field(Region, self.region, "region", "{shape: square, size: S, location: fixed|random|any}"))
        set_(self, "perceptual", _parse_field(Perceptual, self.perceptual, "perceptual", "{ssim: 0.95}"))
        if self.physical is not None:
            set_(self, "physical", Physical.parse(self.physical))
        self._check_combination()
        if self.norm is Norm.UNBOUNDED:
            eps = math.inf
        else:
            eps = check_number(self.eps, f"eps for norm {self.norm.value}", low=0)
        if self.norm is Norm.L0 and eps != int(eps):
            raise ConfigError(f"eps for norm l0 is a whole number of pixels, got {self.eps!r}")
        set_(self, "eps", eps)
        try:
            lo, hi = (float(b) for b in self.bounds)
        except (TypeError, ValueError):
            raise ConfigError(f"bounds must be two numbers [low, high], got {self.bounds!r}") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ConfigError(f"bounds must be finite with low < high, got {self.bounds!r}")
        if self.norm is Norm.LINF and eps > hi - lo:
            raise ConfigError(f"eps {eps} exceeds the input range {hi - lo} for norm linf")
        set_(self, "bounds", (lo, hi))
        if self.targeting is Targeting.FIXED:
            if self.target_class is None:
                raise ConfigError("targeting 'fixed' needs target_class, a class index >= 0")
            set_(self, "target_class", check_whole(self.target_class, "target_class (a class index)", 0))
        elif self.target_class is not None:
            raise ConfigError(f"target_class is only allowed with targeting 'fixed', not {self.targeting.value!r}")
        if self.query_budget is not None:
            set_(self, "query_budget", check_whole(self.query_budget, "query_budget", 1))
        if self.quantize not in (None, "8bit"):
            raise ConfigError(f"quantize must be '8bit' or absent, got {self.quantize!r}")

    def _check_combination(self) -> None:
        """Refuse the combinations of axes that have no meaning (one line each, naming what is allowed)."""
        set_ = object.__setattr__
        if self.scope is Scope.UNIVERSAL:
            shared = self.shared_by or "set"
            if shared not in ("set", "class"):
                raise ConfigError(f"shared_by must be 'set' or 'class', got {self.shared_by!r}")
            set_(self, "shared_by", shared)
            if self.targeting in (Targeting.RANDOM, Targeting.LEAST_LIKELY):
                raise ConfigError(f"a universal perturbation has one goal for all its examples: targeting must be "
                                  f"untargeted or fixed, not {self.targeting.value!r}")
            if self.knowledge is not Knowledge.WHITE_BOX:
                raise ConfigError("universal scope is supported for white-box attackers only (knowledge: white_box); "
                                  f"got {self.knowledge.value!r}")
            if self.norm is Norm.L0:
                raise ConfigError("universal scope with norm l0 is not supported: give the pixels as a region "
                                  "(region: {size: S, location: random}, norm: unbounded) instead")
            if self.region is not None and self.region.location == "any":
                raise ConfigError("a universal patch is placed by the evaluation, not per example by the attacker: "
                                  "region location must be fixed or random with scope universal")
            if self.region is not None and self.norm is not Norm.UNBOUNDED:
                raise ConfigError("a universal patch replaces the pixels of its square (its content is shared, not "
                                  f"a change of each image): use norm unbounded with scope universal and a region, "
                                  f"not {self.norm.value}")
        elif self.shared_by is not None:
            raise ConfigError("shared_by is only allowed with scope 'universal'")
        if self.region is not None and self.norm is Norm.L0:
            raise ConfigError("a region already bounds which pixels change: use norm unbounded, linf or l2 with it, not l0")
        if self.perceptual is not None and self.norm is Norm.L0:
            raise ConfigError("perceptual (ssim) bounds go with an Lp ball or norm unbounded, not with l0")

    # ------------------------------------------------------------------ serialization
    @property
    def constrained(self) -> bool:
        """Whether any axis beyond the Lp ball is set (scope, region, perceptual, physical)."""
        return (self.scope is not Scope.INDIVIDUAL or self.region is not None or self.perceptual is not None
                or self.physical is not None)

    def to_dict(self) -> dict[str, Any]:
        """The descriptor as plain JSON types; the axes beyond the Lp ball only where they are set
        (so every threat model that has none keeps the identity, keys and hashes it had)."""
        d = asdict(self)
        d["norm"], d["targeting"], d["knowledge"] = self.norm.value, self.targeting.value, self.knowledge.value
        d["bounds"] = list(self.bounds)
        if self.norm is Norm.UNBOUNDED:
            d["eps"] = None
        for key in ("scope", "shared_by", "region", "perceptual", "physical"):
            d.pop(key)
        if self.scope is not Scope.INDIVIDUAL:
            d["scope"], d["shared_by"] = self.scope.value, self.shared_by
        for key in ("region", "perceptual", "physical"):
            value = getattr(self, key)
            if value is not None:
                d[key] = value.to_dict()
        return d

    def constraint_label(self) -> str:
        """The axes beyond the Lp ball as one short token (``universal-square8@random-ssim0.95``),
        empty when none is set: the threat's identity in table columns, job keys and leaderboard ids."""
        parts = []
        if self.scope is Scope.UNIVERSAL:
            parts.append("universal" if self.shared_by == "set" else "universal-per-class")
        if self.region is not None:
            parts.append(self.region.label())
        if self.perceptual is not None:
            parts.append(self.perceptual.label())
        if self.physical is not None:
            parts.append(self.physical.label())
        return "-".join(parts)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ThreatModel:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown threat-model field(s) {sorted(unknown)}; allowed: {sorted(known)}")
        d = dict(d)
        if d.get("eps") is None and str(d.get("norm", "")).lower() == "unbounded":
            d["eps"] = math.inf
        if "bounds" in d:
            d["bounds"] = tuple(d["bounds"])
        return cls(**d)

    def with_eps(self, eps: float) -> ThreatModel:
        return replace(self, eps=eps)

    def describe(self) -> str:
        eps = "inf" if self.norm is Norm.UNBOUNDED else f"{self.eps:g}"
        s = f"{self.norm.value} eps={eps} {self.targeting.value}"
        if self.targeting is Targeting.FIXED:
            s += f"({self.target_class})"
        s += f" {self.knowledge.value}"
        if self.query_budget:
            s += f" budget={self.query_budget}"
        if self.constrained:
            s += f" {self.constraint_label()}"
        return s

    # ------------------------------------------------------------------ geometry
    def distance(self, x_adv: torch.Tensor, x: torch.Tensor, norm: Norm | str | None = None) -> torch.Tensor:
        """Per-example distance in this threat model's norm (or ``norm``), shape (N,), float32.

        Computed in float64 (the difference of two float32 tensors is exact there), then rounded."""
        return _distance(x_adv, x, self.norm if norm is None else _enum(Norm, norm, "norm")).float()

    def slack(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per example, how far past ``eps`` a point may lie and still count as inside the ball
        (float64, (N,)): exactly what rounding to the inputs' floating-point type can add.

        A point inside the ball, computed in float32, is x + delta with delta rounded once or twice
        (eps converted to float32, a projection's scale factor and its product: relative error at
        most 2u, u = 2^-24) and the sum rounded once (at most half a unit in the last place of the
        result); ``x`` itself is a rounded value too (data on a grid such as k/255). So each element
        may exceed its share of the ball by (ulp(x_adv) + ulp(x)) / 2, and the budget by 2u eps:
        linf: per element; l2 and l1: the norm of those per-element terms (triangle inequality). No
        slack for l0 (a count) or unbounded."""
        n = x_adv.shape[0]
        if self.norm in (Norm.L0, Norm.UNBOUNDED):
            return torch.zeros(n, dtype=torch.float64, device=x_adv.device)
        e = _half_ulp(torch.nan_to_num(x_adv)) + _half_ulp(x)
        rel = 2 * _unit_roundoff(x_adv) * self.eps
        if self.norm is Norm.LINF:
            return rel + _flat(e).amax(dim=1)
        if self.norm is Norm.L2:
            return rel + _flat(e).norm(p=2, dim=1)
        return rel + _flat(e).sum(dim=1)

    def clip(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.bounds
        return x.clamp(lo, hi)

    def in_bounds(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.bounds
        return _flat((x >= lo) & (x <= hi)).all(dim=1)

    def contains(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-example membership: finite, inside the bounds and inside the eps-ball, allowing the
        rounding :meth:`slack` describes and nothing more (bool, (N,)). For linf every element is
        held to its own share of the slack."""
        finite = _flat(torch.isfinite(x_adv)).all(dim=1)
        ok = finite & self.in_bounds(x_adv)
        if self.norm is Norm.UNBOUNDED:
            return ok
        safe = torch.nan_to_num(x_adv)
        if self.norm is Norm.LINF:
            return ok & _flat(self._linf_inside(safe, x)).all(dim=1)
        return ok & (_distance(safe, x, self.norm) <= self.eps + self.slack(safe, x))

    def _linf_inside(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per element, whether ``x_adv`` is within eps of ``x`` up to its own rounding slack."""
        excess = (x_adv.double() - x.double()).abs() - _half_ulp(x_adv) - _half_ulp(x)
        return excess <= self.eps * (1 + 2 * _unit_roundoff(x_adv))

    def quantized(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The 8-bit image that counts for ``x_adv`` (with ``quantize: 8bit``): every value rounded
        to the nearest of 256 levels across the bounds, as saving the image would, except where
        that rounding leaves the eps-ball, where it is rounded to the neighbouring level on the side
        of ``x`` instead (linf: per element; other norms: the whole example). On data that lies on
        the grid the result is always inside the ball; off the grid it may not be, and the audit
        then rejects it."""
        lo, hi = self.bounds
        level = torch.round((x_adv - lo) / (hi - lo) * 255)
        nearest = _level_value(level, lo, hi)
        # the neighbouring level toward x, where rounding to the nearest one moved away from x
        away = (nearest - x_adv) * (x_adv - x) > 0
        toward = torch.where(away, _level_value((level - torch.sign(x_adv - x)).clamp(0, 255), lo, hi), nearest)
        if self.norm is Norm.UNBOUNDED:
            return nearest
        if self.norm is Norm.LINF:
            return torch.where(self._linf_inside(nearest, x), nearest, toward)
        inside = self.contains(nearest, x).view(-1, *([1] * (x.dim() - 1)))
        return torch.where(inside, nearest, toward)

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Euclidean projection of ``x_adv`` onto the eps-ball around ``x``, then into the bounds.

        Clipping into the box after the ball projection only moves coordinates toward ``x`` (which
        lies inside the box), so every norm of the perturbation can only fall: the result is in
        both sets. (It is the exact projection onto the intersection for linf and l0; for l1 the
        exact projection onto the intersection is computed, :func:`project_l1_box`.)
        """
        delta = x_adv - x
        if self.norm is Norm.LINF:
            delta = delta.clamp(-self.eps, self.eps)
        elif self.norm is Norm.L2:  # the norm and the scale in float64: one rounding of the product
            n = torch.linalg.vector_norm(_flat(delta), 2, dim=1, dtype=torch.float64).clamp_min(1e-12)
            factor = (self.eps / n).clamp(max=1.0).to(delta.dtype).view(-1, *([1] * (delta.dim() - 1)))
            delta = delta * factor
        elif self.norm is Norm.L1:  # the exact projection onto the ball intersected with the box
            return self.clip(x + project_l1_box(delta, x, self.eps, self.bounds))
        elif self.norm is Norm.L0:
            delta = project_l0(delta, int(self.eps))
        return self.clip(x + delta)

    # ------------------------------------------------------------------ targets
    def resolve_targets(
        self, logits: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor | None:
        """Target classes for a targeted threat model (None when untargeted).

        ``random`` draws uniformly among the classes other than ``y`` from ``generator``;
        ``least_likely`` is argmin of the clean logits (Kurakin et al.'s y_LL).
        """
        n, k = logits.shape
        if self.targeting is Targeting.UNTARGETED:
            return None
        if self.targeting is Targeting.FIXED:
            if self.target_class >= k:  # type: ignore[operator]
                raise ConfigError(f"target_class {self.target_class} is out of range for a model with {k} classes")
            return torch.full_like(y, int(self.target_class))  # type: ignore[arg-type]
        if self.targeting is Targeting.LEAST_LIKELY:
            return logits.argmin(dim=1)
        offset = torch.randint(1, k, (n,), generator=generator, device="cpu").to(y.device)
        return (y + offset) % k


def _distance(x_adv: torch.Tensor, x: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Per-example distance in ``norm``, float64 (exact differences for float32 inputs)."""
    delta = x_adv.double() - x.double()
    if norm in (Norm.LINF, Norm.UNBOUNDED):
        return _flat(delta).abs().amax(dim=1)
    if norm is Norm.L2:
        return _flat(delta).norm(p=2, dim=1)
    if norm is Norm.L1:
        return _flat(delta).abs().sum(dim=1)
    return (_pixel_magnitude(delta) > 0).sum(dim=1).double()


def _unit_roundoff(t: torch.Tensor) -> float:
    """u, the largest relative rounding error of ``t``'s floating-point type (2^-24 for float32)."""
    return float(torch.finfo(t.dtype if t.is_floating_point() else torch.float32).eps) / 2


def _half_ulp(t: torch.Tensor) -> torch.Tensor:
    """Half the spacing of ``t``'s floating-point numbers at each of its values (float64): the
    largest error of rounding a real number to that value."""
    a = t.abs() if t.is_floating_point() else t.float().abs()
    return (torch.nextafter(a, torch.full_like(a, math.inf)) - a).double() / 2


def project_l1_box(delta: torch.Tensor, x: torch.Tensor, eps: float, bounds: tuple[float, float]) -> torch.Tensor:
    """Exact Euclidean projection of each row's perturbation onto {d : ||d||_1 <= eps,
    lo <= x + d <= hi}, batched, in float64, rounded once (Croce & Hein's "Mind the box").

    The solution is d_i = sign(v_i) clip(|v_i| - lambda, 0, u_i), u_i the room the box leaves in
    the direction of v_i, with the smallest lambda >= 0 that brings the L1 norm to eps. The norm
    is piecewise linear and non-increasing in lambda with breakpoints |v_i| - u_i and |v_i|:
    sorting them gives lambda in closed form, with no loop over examples or iterations."""
    lo, hi = bounds
    v, xf = _flat(delta).double(), _flat(x).double()
    a = v.abs()
    room = torch.where(v >= 0, hi - xf, xf - lo).clamp_min(0)
    capped = torch.minimum(a, room)
    total = capped.sum(dim=1)
    breaks = torch.cat([(a - room).clamp_min(0), a], dim=1)
    steps = torch.cat([torch.ones_like(a), -torch.ones_like(a)], dim=1)
    order = breaks.argsort(dim=1)
    b, active = breaks.gather(1, order), steps.gather(1, order).cumsum(dim=1)
    gaps = torch.diff(b, dim=1, append=b[:, -1:])
    at = torch.cat([total[:, None], total[:, None] - (active * gaps).cumsum(dim=1)[:, :-1]], dim=1)  # norm at each break
    k = ((at > eps).sum(dim=1) - 1).clamp_min(0)[:, None]
    lam = b.gather(1, k) + (at.gather(1, k) - eps) / active.gather(1, k).clamp_min(1)
    lam = torch.where((total > eps)[:, None], lam, torch.zeros_like(lam))
    out = v.sign() * torch.minimum((a - lam).clamp_min(0), room)
    return out.to(delta.dtype).view_as(delta)


def project_l0(delta: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k pixels with the largest change per example (all channels of a pixel together)."""
    mag = _pixel_magnitude(delta)
    if k >= mag.shape[1]:
        return delta
    keep = torch.zeros_like(mag, dtype=torch.bool)
    if k > 0:
        keep.scatter_(1, mag.topk(k, dim=1).indices, True)
    if delta.dim() == 4:
        n, _, h, w = delta.shape
        return delta * keep.view(n, 1, h, w)
    return delta * keep.view_as(delta)


def _level_value(level: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """The value of 8-bit level k across [lo, hi], computed as ``k / 255 * (hi - lo) + lo`` (one
    formula for every rounding here, so data stored as k / 255 maps to itself bit for bit)."""
    return level / 255 * (hi - lo) + lo


def quantize_8bit(x: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
    """Round to 256 evenly spaced levels across ``bounds``, as saving an 8-bit image would."""
    lo, hi = bounds
    return _level_value(torch.round((x - lo) / (hi - lo) * 255), lo, hi)
