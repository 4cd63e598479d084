"""The one-pixel attack: differential evolution over a few pixels, from class probabilities only.

Su, Vargas & Sakurai, "One pixel attack for fooling deep neural networks", IEEE Transactions on
Evolutionary Computation 23(5), 2019 (arXiv:1710.08864).

Every image has its own population; the populations of all still-active images are evaluated
together, in batched forward passes of at most ``max_batch`` rows, so the cost is the model's
forward passes and little else (no Python loop over images or candidates).
"""

from __future__ import annotations

import math
from typing import Annotated, ClassVar

import torch
from pydantic import Field

from advbench.access import Handle, ScoreOracle
from advbench.attacks.base import Attack
from advbench.tensors import rand_like, randn_like
from advbench.errors import UnsupportedThreatError
from advbench import params
from advbench.registry import ATTACKS
from advbench.threat import Knowledge, Norm, Targeting, ThreatModel, quantize_8bit

#: the paper's colour initialization N(128, 127) on 0..255, as fractions of the input range
COLOUR_MEAN = 128 / 255
COLOUR_STD = 127 / 255


def apply_pixels(images: torch.Tensor, genes: torch.Tensor) -> torch.Tensor:
    """Write each row's candidate into its image, in place, and return ``images``.

    ``images`` is (R, C, H, W); ``genes`` is (R, d, 2 + C), one (row, col, c_1..c_C) tuple per
    pixel, positions already inside [0, H-1] x [0, W-1] (they are rounded here). Pixels are
    written in order, so where two tuples name the same position the later one wins.
    """
    rows = torch.arange(images.shape[0], device=images.device)
    pos = genes[..., :2].round().long()
    colours = genes[..., 2:].to(images.dtype)
    for k in range(genes.shape[1]):  # d is small (the pixel budget); every row at once
        images[rows, :, pos[:, k, 0], pos[:, k, 1]] = colours[:, k]
    return images


def same_candidate(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Whether candidates ``a`` and ``b`` (..., d, 2 + C) write the same pixels with the same
    colours (positions compared after rounding), over the leading dimensions."""
    same = torch.cat([a[..., :2].round() == b[..., :2].round(), a[..., 2:] == b[..., 2:]], dim=-1)
    return same.flatten(-2).all(dim=-1)


def mutation_indices(shape: tuple[int, ...], population: int, generator: torch.Generator | None) -> torch.Tensor:
    """Indices (j, k, l) of three distinct population members for every child, shape (*shape, 3).

    Drawn uniformly among the ordered triples of distinct members: k skips j, and l skips j
    and k (a draw from fewer values shifted past the excluded ones).
    """
    device = generator.device if generator is not None else torch.device("cpu")
    j = torch.randint(population, shape, generator=generator, device=device)
    k = torch.randint(population - 1, shape, generator=generator, device=device)
    k += k >= j
    l = torch.randint(population - 2, shape, generator=generator, device=device)  # noqa: E741 (the paper's name)
    low, high = torch.minimum(j, k), torch.maximum(j, k)
    l += l >= low
    l += l >= high
    return torch.stack([j, k, l], dim=-1)


def mutate(population: torch.Tensor, indices: torch.Tensor, scale: float) -> torch.Tensor:
    """The paper's DE/rand/1 step without crossover: X_i = X_j + F (X_k - X_l), per image.

    ``population`` is (A, P, ...) and ``indices`` (A, P, 3) from :func:`mutation_indices`.
    """
    rows = torch.arange(population.shape[0], device=population.device).unsqueeze(1)
    j, k, l = (indices[..., i].to(population.device) for i in range(3))  # noqa: E741
    return population[rows, j] + scale * (population[rows, k] - population[rows, l])


def select(
    parents: torch.Tensor, parent_fitness: torch.Tensor, children: torch.Tensor, child_fitness: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """DE selection: each child replaces its parent if it is strictly fitter (lower fitness).

    Members are (A, P, ...) and fitnesses (A, P); returns the next population and its fitness.
    """
    fitter = child_fitness < parent_fitness
    members = torch.where(fitter.view(*fitter.shape, *([1] * (parents.dim() - 2))), children, parents)
    return members, torch.where(fitter, child_fitness, parent_fitness)


@ATTACKS.register(
    "onepixel",
    description="One-pixel attack by differential evolution (Su, Vargas & Sakurai 2019); l0, score-based",
)
class OnePixel(Attack):
    """One-pixel attack (Su, Vargas & Sakurai 2019): differential evolution on d pixels.

    A candidate is d tuples (row, col, c_1..c_C), one per changed pixel (d = ``pixels``, by
    default the threat model's l0 eps; at most the number of pixels). The initial population
    draws positions uniformly over the image and colours from N(128, 127) on a 0..255 scale (mapped onto the threat model's
    bounds), clipped to the bounds. Each generation every member i gets one child
    X_j + F (X_k - X_l) (j, k, l distinct random members, F = ``mutation``, no crossover),
    clipped back into the search box; the child replaces its parent if it is fitter.

    Fitness (minimized) is the probability of the true class, or minus that of the target
    class. An image stops being queried once its best candidate meets the goal with the true
    class probability at most ``untargeted_threshold`` (paper: 5%) or the target probability
    at least ``targeted_threshold`` (paper: 90%): 1.0 and 0.0 stop as soon as the goal is
    met. It also stops after ``generations`` generations, or when its query budget cannot pay
    for the next generation, and the best candidate found so far is returned (candidates
    meeting the goal first, then by fitness). A child that writes its parent's image again is
    not queried: the model is deterministic (eval mode), so it would tie and lose; converged
    populations make that most children late in a failing run.

    Non-image inputs (not NCHW) are a 1 x numel grid of one-channel pixels, as the l0 norm
    counts them. With an 8-bit quantized threat model the colours are rounded to 8-bit levels.
    """

    norms: ClassVar[frozenset[Norm]] = frozenset({Norm.L0})
    targeting: ClassVar[frozenset[Targeting]] = frozenset(Targeting)
    knowledge: ClassVar[frozenset[Knowledge]] = frozenset({Knowledge.SCORE_BASED})
    kind: ClassVar[str] = "score_based"
    randomized: ClassVar[bool] = True

    class Params(params.Params):
        pixels: params.Count | None = None  # None: the threat model's l0 eps
        #: mutation takes 3 distinct members
        population: Annotated[params.Count, Field(ge=3)] = 400
        generations: params.Natural = 100
        #: the scale F, in (0, 2]
        mutation: Annotated[params.PositiveNumber, Field(le=2)] = 0.5
        untargeted_threshold: params.UnitInterval = 0.05
        targeted_threshold: params.UnitInterval = 0.9
        max_batch: params.Count = 1024

    def supports(self, threat: ThreatModel) -> str | None:
        """The base checks, and that ``pixels`` fits the threat model's l0 eps."""
        reason = super().supports(threat)
        if reason is None and self.pixels is not None and self.pixels > threat.eps:
            return (
                f"attack {self.name!r} with pixels={self.pixels} exceeds the threat model's l0 eps "
                f"{threat.eps:g}; use pixels <= eps, or pixels=None to take eps"
            )
        return reason

    # ------------------------------------------------------------------ pieces
    def _clip(self, genes: torch.Tensor, size: tuple[int, int], threat: ThreatModel) -> torch.Tensor:
        """Clip candidates into the search box: positions in the image, colours in the bounds."""
        lo, hi = threat.bounds
        colours = genes[..., 2:].clamp(lo, hi)
        if threat.quantize == "8bit":
            colours = quantize_8bit(colours, threat.bounds)
        rows = genes[..., 0:1].clamp(0, size[0] - 1)
        cols = genes[..., 1:2].clamp(0, size[1] - 1)
        return torch.cat([rows, cols, colours], dim=-1)

    def initial_population(
        self, like: torch.Tensor, pixels: int, threat: ThreatModel, generator: torch.Generator | None
    ) -> torch.Tensor:
        """The paper's initialization for NCHW ``like``: (N, population, pixels, 2 + C) genes.

        Positions are uniform over the pixel grid, colours normal around the middle of the
        bounds (N(128, 127) on 0..255, scaled), clipped to the bounds.
        """
        n, c, h, w = like.shape
        lo, hi = threat.bounds
        shape = (n, self.population, pixels)
        pos = rand_like(like.new_empty((*shape, 2)), generator)
        pos = (pos * pos.new_tensor([h, w])).floor()
        colours = randn_like(like.new_empty((*shape, c)), generator) * (COLOUR_STD * (hi - lo)) + (
            lo + COLOUR_MEAN * (hi - lo)
        )
        return self._clip(torch.cat([pos, colours], dim=-1), (h, w), threat)

    def _evaluate(
        self,
        oracle: ScoreOracle,
        images: torch.Tensor,
        rows: torch.Tensor,
        genes: torch.Tensor,
        label: torch.Tensor,
        targeted: bool,
        shape: tuple[int, ...],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Query candidates ``genes`` (R, d, G) of images ``rows`` (R,), true or target class
        ``label`` (R,), in chunks of ``max_batch``; return per candidate (fitness, rank key,
        early-stop flag). The rank key puts candidates meeting the goal before the others
        (fitness lies in [-1, 1], so adding 2 to the others suffices)."""
        probs = []
        for start in range(0, rows.numel(), self.max_batch):
            part = slice(start, start + self.max_batch)
            candidates = apply_pixels(images[rows[part]], genes[part])
            probs.append(oracle(candidates.reshape(-1, *shape[1:]), index=rows[part]))
        prob = torch.cat(probs).to(genes.device)
        p_cls = prob.gather(1, label.unsqueeze(1)).squeeze(1)
        if targeted:
            goal = prob.argmax(dim=1) == label
            fitness, stop = -p_cls, goal & (p_cls >= self.targeted_threshold)
        else:
            goal = prob.argmax(dim=1) != label
            fitness, stop = p_cls, goal & (p_cls <= self.untargeted_threshold)
        return fitness, fitness + 2 * (~goal).to(fitness.dtype), stop

    # ------------------------------------------------------------------ attack
    @torch.no_grad()
    def _run(
        self,
        model: Handle,
        x: torch.Tensor,
        y: torch.Tensor,
        threat: ThreatModel,
        target: torch.Tensor | None,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        if not isinstance(model, ScoreOracle):  # pragma: no cover - guarded by check_threat
            raise UnsupportedThreatError("the one-pixel attack needs a score oracle")
        n = x.shape[0]
        images = x if x.dim() == 4 else x.reshape(n, 1, 1, -1)  # the l0 norm's pixels
        h, w = images.shape[2:]
        pixels = min(self.pixels if self.pixels is not None else int(threat.eps), h * w)
        if pixels == 0:
            return x.clone()
        label = y if target is None else target
        size = self.population
        pop = self.initial_population(images, pixels, threat, generator)
        fitness = torch.full((n, size), math.inf, device=x.device)
        best = pop[:, 0].clone()
        best_key = torch.full((n,), math.inf, device=x.device)
        active = torch.ones(n, dtype=torch.bool, device=x.device)
        for generation in range(self.generations + 1):
            # drawn for every image each generation, so none depends on when the others stop
            indices = mutation_indices((n, size), size, generator) if generation else None
            idx = active.nonzero().squeeze(1)
            parents = pop[idx]
            if indices is None:  # generation 0 evaluates the initial population
                children, fresh = parents, torch.ones(parents.shape[:2], dtype=torch.bool, device=x.device)
            else:
                children = self._clip(mutate(parents, indices[idx.to(indices.device)], self.mutation), (h, w), threat)
                # a child that is its parent's image has its parent's fitness: no query, no change
                fresh = ~same_candidate(children, parents)
            # stop, keeping the best so far, where the budget cannot pay for this generation
            affordable = model.remaining().to(x.device)[idx] >= fresh.sum(dim=1)
            active[idx[~affordable]] = False
            idx, parents, children, fresh = (t[affordable] for t in (idx, parents, children, fresh))
            if idx.numel() == 0:
                break
            fit = fitness[idx].clone()  # unqueried children: their parent's fitness
            key = torch.full_like(fit, math.inf)
            stop = torch.zeros_like(fresh)
            ex, member = fresh.nonzero(as_tuple=True)
            if ex.numel():
                queried = self._evaluate(
                    model, images, idx[ex], children[ex, member], label[idx[ex]], target is not None, x.shape
                )
                fit[ex, member], key[ex, member], stop[ex, member] = queried
            pop[idx], fitness[idx] = select(parents, fitness[idx], children, fit)
            top_key, top = key.min(dim=1)
            better = top_key < best_key[idx]
            best[idx[better]] = children[better, top[better]]
            best_key[idx] = torch.minimum(top_key, best_key[idx])
            active[idx] = ~stop.any(dim=1)
        found = best_key.isfinite()
        out = images.clone()
        out[found] = apply_pixels(out[found], best[found])
        return out.reshape(x.shape)
