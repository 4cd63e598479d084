"""Image transformations T(x) for the destruction rate (Kurakin, Goodfellow & Bengio 2016).

Each transformation is registered in :data:`advbench.registry.TRANSFORMATIONS`, built with
``TRANSFORMATIONS.create(name, **params)``, and maps a batch of NCHW images in [0, 1] to a
batch of the same shape, clipped to [0, 1]. Random ones (``noise``, and the chains holding
it) draw from the ``torch.Generator`` passed in, so a seed fixes them; the others ignore it.

    identity     x
    jpeg         JPEG encode and decode at ``quality`` (Pillow / libjpeg, as the ``jpeg`` defense)
    blur         Gaussian blur with standard deviation ``sigma`` pixels
    noise        additive Gaussian noise of standard deviation ``std``
    brightness   x + delta
    contrast     m + factor (x - m), m the image's mean over channels and pixels
    rotation     rotation by ``degrees`` about the image centre, bilinear
    translation  shift by whole pixels (``dx`` right, ``dy`` down)
    quantize8    rounding to the 256 levels of 8 bits
    photo        a "print and photo" chain: rotation 1 deg, blur sigma 0.6, contrast 0.9,
                 brightness +0.03, noise std 0.02, JPEG quality 75 (in that order)
    chain        any sequence of the above, applied left to right

The chains clip after every step (each step is a transformation with [0, 1] output), as a
physical pipeline saturates at each stage.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from advbench import params
from advbench.defenses.transforms import JPEG as _JPEGDefense
from advbench.defenses.transforms import BitDepth, Quality
from advbench.errors import ConfigError
from advbench.registry import TRANSFORMATIONS

# The parameter types, shared by a transformation and the ``photo`` chain that holds it. Numbers
# are strict (a string such as "0.5" is refused, not parsed).
_strict = Field(strict=True)
Sigma = Annotated[params.NonNegativeNumber, _strict, Field(le=10)]
Std = Annotated[params.UnitInterval, _strict]
Delta = Annotated[params.Number, _strict, Field(ge=-1, le=1)]
Factor = Annotated[params.NonNegativeNumber, _strict, Field(le=10)]
Degrees = Annotated[params.Number, _strict, Field(ge=-180, le=180)]
Shift = Annotated[int, Field(strict=True, ge=-64, le=64)]


class Transformation(params.Configurable):
    """A parameterized, batched map of NCHW images in [0, 1]; call it as ``t(x, generator)``.

    Parameters are declared once, as a nested ``Params`` class (:mod:`advbench.params`);
    ``params()`` reads them back, in their declared order (the order of the label)."""

    plugin_kind: ClassVar[str] = "transformation"
    name: ClassVar[str] = ""
    random: ClassVar[bool] = False  # draws from the generator

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ConfigError(f"transformation {self.name!r} needs an NCHW image batch, got {shape}")
        with torch.no_grad():
            return self.apply(x.detach(), generator).clamp(0, 1)

    @property
    def label(self) -> str:
        """``name(param=value, ...)``, the column label of a destruction matrix."""
        inner = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.params().items())
        return f"{self.name}({inner})" if inner else self.name

    def __repr__(self) -> str:
        return self.label


@TRANSFORMATIONS.register("identity", description="T(x) = x (a baseline: destroys nothing)")
class Identity(Transformation):
    """T(x) = x: adversarial examples stay adversarial, so the destruction rate is 0."""

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return x.clone()


@TRANSFORMATIONS.register("jpeg", description="JPEG compression at a quality (Pillow / libjpeg)")
class JPEG(Transformation):
    """JPEG encode and decode at ``quality`` (1-100, default 75), the ``jpeg`` defense's codec:
    8-bit rounding, then Pillow (libjpeg) with 4:2:0 chroma subsampling for RGB. Kurakin et
    al. use qualities 10 to 90 (their "JPEG encoding" rows)."""

    class Params(params.Params):
        quality: Quality = 75

    def setup(self) -> None:
        self._codec = _JPEGDefense(quality=self.quality)

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return self._codec.transform(x)


@TRANSFORMATIONS.register("quantize8", description="Rounding to 8-bit levels (k / 255)")
class Quantize8(Transformation):
    """x' = round(255 x) / 255, what saving as an 8-bit image (PNG) does."""

    def setup(self) -> None:
        self._bits = BitDepth(bits=8)

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return self._bits.transform(x)


@TRANSFORMATIONS.register("blur", description="Gaussian blur with standard deviation sigma (pixels)")
class Blur(Transformation):
    """Gaussian blur, separable, with standard deviation ``sigma`` pixels (0 to 10, default 1).

    The kernel spans ceil(3 sigma) pixels either side, its weights exp(-i^2 / (2 sigma^2))
    normalized to sum 1; edges are padded by repeating the border pixel. ``sigma`` 0 is the
    identity.
    """

    class Params(params.Params):
        sigma: Sigma = 1.0

    def kernel(self) -> torch.Tensor:
        radius = math.ceil(3 * self.sigma)
        i = torch.arange(-radius, radius + 1, dtype=torch.float64)
        w = torch.exp(-(i**2) / (2 * self.sigma**2))
        return w / w.sum()

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if self.sigma == 0:
            return x.clone()
        n, c, h, w = x.shape
        k = self.kernel().to(device=x.device, dtype=x.dtype)
        r = (len(k) - 1) // 2
        planes = x.reshape(n * c, 1, h, w)
        planes = F.conv2d(F.pad(planes, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
        planes = F.conv2d(F.pad(planes, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
        return planes.reshape(n, c, h, w)


@TRANSFORMATIONS.register("noise", description="Additive Gaussian noise of standard deviation std (seeded)")
class Noise(Transformation):
    """x + std * z, z standard normal per pixel and channel, drawn from the generator
    (``std`` 0 to 1, default 0.05; Kurakin et al.'s "Gaussian noise" rows use 5 to 20 out of 255)."""

    random: ClassVar[bool] = True

    class Params(params.Params):
        std: Std = 0.05

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        device = generator.device if generator is not None else x.device
        z = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
        return x + self.std * z.to(x.device)


@TRANSFORMATIONS.register("brightness", description="Additive brightness change x + delta")
class Brightness(Transformation):
    """x + delta (``delta`` -1 to 1, default 0.1)."""

    class Params(params.Params):
        delta: Delta = 0.1

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return x + self.delta


@TRANSFORMATIONS.register("contrast", description="Contrast change m + factor (x - m), m the image mean")
class Contrast(Transformation):
    """m + factor (x - m), m each image's mean over channels and pixels (``factor`` 0 to 10,
    default 1.2; below 1 lowers the contrast, 0 gives a flat image at the mean)."""

    class Params(params.Params):
        factor: Factor = 1.2

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        return m + self.factor * (x - m)


@TRANSFORMATIONS.register("rotation", description="Rotation by a small angle in degrees (bilinear)")
class Rotation(Transformation):
    """Rotation by ``degrees`` (-180 to 180, default 5; positive is counter-clockwise as
    displayed) about the image centre, bilinear, with ``affine_grid`` and ``grid_sample``
    (``align_corners=False``: the grid is the pixel centres, so 0 degrees is the identity).
    The rotation is rigid in pixels for non-square images too. Samples falling outside take
    the nearest border pixel (``padding="border"``, default), 0 (``"zeros"``) or a reflection.
    """

    class Params(params.Params):
        degrees: Degrees = 5.0
        padding: Literal["border", "zeros", "reflection"] = "border"

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        n, _, h, w = x.shape
        a = math.radians(self.degrees)
        cos, sin = math.cos(a), math.sin(a)
        # output pixel (u, v) (normalized, centre 0) samples the input at R (u, v), in pixel units
        theta = torch.tensor([[cos, -sin * h / w, 0.0], [sin * w / h, cos, 0.0]], dtype=x.dtype, device=x.device)
        grid = F.affine_grid(theta.expand(n, 2, 3), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode=self.padding, align_corners=False)


@TRANSFORMATIONS.register("translation", description="Shift by whole pixels (dx right, dy down)")
class Translation(Transformation):
    """Shift by ``dx`` pixels right and ``dy`` pixels down (whole numbers, -64 to 64; default
    dx 2, dy 0): x'[i, j] = x[i - dy, j - dx]. The uncovered band repeats the border pixel
    (``padding="border"``, default) or is 0 (``"zeros"``)."""

    class Params(params.Params):
        dx: Shift = 2
        dy: Shift = 0
        padding: Literal["border", "zeros"] = "border"

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        _, _, h, w = x.shape
        rows = torch.arange(h, device=x.device) - self.dy
        cols = torch.arange(w, device=x.device) - self.dx
        out = x.index_select(2, rows.clamp(0, h - 1)).index_select(3, cols.clamp(0, w - 1))
        if self.padding == "zeros":
            inside = ((rows >= 0) & (rows < h)).view(-1, 1) & ((cols >= 0) & (cols < w)).view(1, -1)
            out = out * inside.to(x.dtype)
        return out


def _step(spec: Any) -> Transformation:
    """One chain step: a Transformation, a registered name, or ``{"name": ..., **params}``."""
    if isinstance(spec, Transformation):
        return spec
    if isinstance(spec, str):
        return TRANSFORMATIONS.create(spec)
    if isinstance(spec, Mapping) and isinstance(spec.get("name"), str):
        values = {k: v for k, v in spec.items() if k != "name"}
        return TRANSFORMATIONS.create(spec["name"], **values)
    raise ConfigError(f"a chain step must be a transformation name, a mapping with 'name', or a Transformation, got {spec!r}")


@TRANSFORMATIONS.register("chain", description="A sequence of transformations applied left to right")
class Chain(Transformation):
    """The ``steps`` applied left to right, each clipping to [0, 1]; the random ones draw from
    the one generator in turn. A step is a name (``"quantize8"``), a mapping
    (``{"name": "blur", "sigma": 0.5}``) or a :class:`Transformation`."""

    class Params(params.Params):
        steps: Any

        @field_validator("steps")
        @classmethod
        def _a_list(cls, steps: Any) -> Any:
            if isinstance(steps, (str, Mapping)) or not isinstance(steps, Sequence) or not steps:
                raise ValueError("must be a non-empty list of transformations")
            return steps

    def setup(self) -> None:
        self.steps = [_step(s) for s in self.p.steps]

    @property
    def random(self) -> bool:  # type: ignore[override]
        return any(s.random for s in self.steps)

    def params(self) -> dict[str, Any]:
        return {"steps": [s.label for s in self.steps]}

    @property
    def label(self) -> str:
        return " > ".join(s.label for s in self.steps)

    def apply(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        for s in self.steps:
            x = s(x, generator)
        return x


@TRANSFORMATIONS.register("photo", description="'Print and photo' chain: rotation, blur, contrast, brightness, noise, JPEG")
class Photo(Chain):
    """A stand-in for Kurakin et al.'s print-photograph-crop pipeline, in this order:

    rotation ``degrees`` (default 1: the residual misalignment after cropping), blur ``sigma``
    (0.6: printer and camera optics), contrast ``factor`` (0.9: print contrast loss), brightness
    ``delta`` (+0.03: exposure), noise ``std`` (0.02: sensor noise), JPEG ``quality`` (75: the
    camera's encoder). Any of them may be changed; the values are ours, not measured from a
    printer and camera (the paper photographs real prints).
    """

    class Params(params.Params):  # in the order of the steps (and of the label)
        degrees: Degrees = 1.0
        sigma: Sigma = 0.6
        factor: Factor = 0.9
        delta: Delta = 0.03
        std: Std = 0.02
        quality: Quality = 75

    def setup(self) -> None:
        self.steps = [
            Rotation(degrees=self.degrees),
            Blur(sigma=self.sigma),
            Contrast(factor=self.factor),
            Brightness(delta=self.delta),
            Noise(std=self.std),
            JPEG(quality=self.quality),
        ]

    @property
    def label(self) -> str:
        return Transformation.label.fget(self)  # type: ignore[attr-defined]

    def params(self) -> dict[str, Any]:
        """The six parameters (not the steps' labels, as a plain chain gives)."""
        return params.Configurable.params(self)


def make_transformation(spec: Any) -> Transformation:
    """A :class:`Transformation` from a name, a mapping ``{"name": ..., **params}`` or an instance."""
    return _step(spec)
