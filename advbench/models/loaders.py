"""Load models from files, import paths, torchvision, timm and RobustBench, ready for [0, 1] input.

Every loader returns an ``nn.Module`` in eval mode that maps a float NCHW batch in [0, 1] to
logits. Checkpoints are always read with ``torch.load(..., weights_only=True)``, with no unsafe
fallback, and a ``torch.export`` program's pickled parts too (:func:`weights_only_loads`): a file
of weights never runs code. TorchScript files are read by TorchScript's own loader, which builds
TorchScript modules only (no Python objects). Nothing here downloads unless the caller asks for it explicitly
(``pretrained=True`` in :func:`load_torchvision` / :func:`load_timm`); RobustBench models are
only loaded from checkpoints already on disk.

Problems the user can fix (a missing or unreadable file, an unknown architecture, a bad import
path, weights that do not fit) raise :class:`~advbench.errors.ConfigError`,
:class:`~advbench.errors.DataError` or :class:`~advbench.errors.UnknownNameError` with a
one-line message.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
import logging
import os
import pickle
import sys
import threading
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advbench.errors import ConfigError, DataError, UnknownNameError
from advbench.models.layers import IMAGENET_MEAN, IMAGENET_STD, with_normalization
from advbench.models.robustbench_compat import import_robustbench

FILE_FORMATS = (
    "a torch.export program (torch.export.save, usually .pt2) or a TorchScript module "
    "(torch.jit.save / torch.jit.script / torch.jit.trace)"
)


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    if not text:
        return type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ============================================================================ saved model files
def load_model_file(path: str | os.PathLike[str]) -> nn.Module:
    """A model saved as a torch.export program or as TorchScript, in eval mode, on the CPU.

    The format is read from the file's contents, not its name: a torch.export archive holds an
    ``archive_format`` record, a TorchScript archive its ``code/`` and ``constants.pkl``. A plain
    ``torch.save`` checkpoint (a state dict) is refused with a hint: weights need an architecture
    (``load_torchvision``/``load_timm`` with ``weights=``, or an import path).

    An exported program is wrapped in :class:`ExportedModel`, which makes ``.eval()``/``.train()``
    work (exported graph modules refuse them) and accepts any batch size even if the program was
    exported with a fixed one.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"model file {p} not found; expected {FILE_FORMATS}")
    if p.is_dir():
        raise DataError(f"model file {p} is a folder; expected a file holding {FILE_FORMATS}")
    kind = _sniff_model_file(p)
    if kind == "export":
        return _load_exported(p)
    if kind == "torchscript":
        return _load_torchscript(p)
    if kind == "checkpoint":
        raise DataError(
            f"{p} is a torch.save checkpoint (a state dict or pickled object), not a saved model program; "
            f"load its weights into an architecture (torchvision/timm with weights=..., or an import path), "
            f"or save the model with torch.export.save or torch.jit.save"
        )
    if kind == "zip":  # a zip of unknown layout: let the loaders decide, quietly
        for loader in (_load_exported, _load_torchscript):
            with contextlib.suppress(DataError):
                return loader(p)
    raise DataError(f"cannot read {p} as a model: it is not {FILE_FORMATS}")


def _sniff_model_file(p: Path) -> str:
    """``export``, ``torchscript``, ``checkpoint``, ``zip`` (unknown layout) or ``unknown``."""
    try:
        if zipfile.is_zipfile(p):
            with zipfile.ZipFile(p) as z:
                names = z.namelist()
            base = [n.split("/", 1)[1] if "/" in n else n for n in names]
            if "archive_format" in base:
                return "export"
            if "constants.pkl" in base or any(b.startswith("code/") for b in base):
                return "torchscript"
            if "data.pkl" in base:
                return "checkpoint"
            return "zip"
        with open(p, "rb") as f:
            head = f.read(2)
    except (OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read model file {p}: {_one_line(exc)}") from None
    if head[:1] == b"\x80":  # a pickle protocol header: the legacy (pre-zip) torch.save format
        return "checkpoint"
    return "unknown"


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """Silence torch's deprecation warnings and the export loader's logged tracebacks."""
    logger = logging.getLogger("torch.export")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


def _load_torchscript(p: Path) -> nn.Module:
    try:
        with _quiet_torch():
            model = torch.jit.load(str(p), map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, ValueError, ... for bad files
        raise DataError(f"cannot load TorchScript file {p}: {_one_line(exc)}") from None
    return model.eval()


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` in the block unpickles tensors and plain containers only.

    ``torch.export.load`` unpickles the archive's weights and constants with
    ``weights_only=False`` when the archive says they are pickled, and retries a failed safe load
    unsafely: a crafted ``.pt2`` would run code. torch honours ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``
    over an explicit ``weights_only=False``, so with it set there is no path to the unsafe
    unpickler, and a payload that needs one fails to load instead."""
    with _SAFE_LOAD_LOCK:
        before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
        unsafe = os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
        os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
        try:
            yield
        finally:
            if before is None:
                os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
            else:
                os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before
            if unsafe is not None:
                os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = unsafe


_SAFE_LOAD_LOCK = threading.Lock()


def _load_exported(p: Path) -> nn.Module:
    try:
        # a file object: torch.export.load insists on '.pt2' names
        with _quiet_torch(), weights_only_loads(), open(p, "rb") as f:
            program = torch.export.load(f)
        module = program.module()
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"cannot load torch.export program {p}: {_one_line(exc)}") from None
    user_inputs = list(program.graph_signature.user_inputs)
    if len(user_inputs) != 1:
        raise DataError(
            f"{p}: the exported program takes {len(user_inputs)} inputs; an advbench model takes one image batch"
        )
    batch: int | None = None
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name == user_inputs[0]:
            val = node.meta.get("val")
            shape = getattr(val, "shape", None)
            if shape is not None and len(shape) >= 1 and isinstance(shape[0], int):
                batch = int(shape[0])
    return ExportedModel(module, batch_size=batch, source=str(p)).eval()


# aten ops whose "training" flag decides train- or eval-mode behaviour, with the flag's position
_TRAINING_FLAG_ARG = {
    "aten.batch_norm.default": 5,
    "aten.dropout.default": 2,
    "aten.feature_dropout.default": 2,
    "aten.alpha_dropout.default": 2,
    "aten.feature_alpha_dropout.default": 2,
}


class ExportedModel(nn.Module):
    """A ``torch.export`` program's module made usable as an ordinary classifier.

    * ``train()``/``eval()``: an exported graph module raises ``NotImplementedError`` for them.
      Here they set the ``training`` flag of the graph's batch-norm and dropout calls (the ops
      ``torch.export`` records with an explicit flag), so a program exported in training mode
      still evaluates in eval mode.
    * A program exported with a fixed batch size ``B`` (no ``dynamic_shapes``) is fed in chunks
      of ``B`` (the last one padded by repeating its final row and the padding dropped from the
      output); gradients flow through. Export with a dynamic batch dimension to avoid it.
    """

    def __init__(self, module: nn.Module, *, batch_size: int | None = None, source: str = "") -> None:
        super().__init__()
        self.program = module
        self.batch_size = batch_size
        self.source = source
        self.training = self._graph_training() is not False

    def _graph_training(self) -> bool | None:
        flags = [bool(node.args[i]) for node, i in self._flag_nodes() if len(node.args) > i]
        return any(flags) if flags else None

    def _flag_nodes(self) -> list[tuple[Any, int]]:
        graph = getattr(self.program, "graph", None)
        if graph is None:
            return []
        out = []
        for node in graph.nodes:
            if node.op == "call_function":
                i = _TRAINING_FLAG_ARG.get(str(node.target))
                if i is not None:
                    out.append((node, i))
        return out

    def train(self, mode: bool = True) -> ExportedModel:
        nodes = self._flag_nodes()
        changed = False
        for node, i in nodes:
            if len(node.args) > i and bool(node.args[i]) != mode:
                args = list(node.args)
                args[i] = mode
                node.args = tuple(args)
                changed = True
        if changed:
            self.program.recompile()  # type: ignore[operator]
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.batch_size
        if b is None or x.shape[0] == b:
            return self.program(x)
        n = x.shape[0]
        if n == 0:
            pad = torch.zeros((b, *x.shape[1:]), dtype=x.dtype, device=x.device)
            return self.program(pad)[:0]
        outs = []
        for chunk in x.split(b):
            k = chunk.shape[0]
            if k < b:
                chunk = torch.cat([chunk, chunk[-1:].expand(b - k, *chunk.shape[1:])])
            outs.append(self.program(chunk)[:k])
        return torch.cat(outs)

    def extra_repr(self) -> str:
        return f"source={self.source!r}, batch_size={self.batch_size}"


# ============================================================================ import paths
def load_import_path(spec: str, **params: Any) -> nn.Module:
    """``"package.module:factory"`` (or ``"package.module:Class"``, ``"module:obj.attr"``) called with ``params``.

    The named object may also be an ``nn.Module`` instance (then ``params`` must be empty). The
    current working directory is searched too, so ``mymodels:build`` finds ``./mymodels.py``.
    Returns the module in eval mode.
    """
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ConfigError(f"an import path must look like 'package.module:factory', got {spec!r}")
    module_name, attr_path = (s.strip() for s in spec.split(":"))
    if not module_name or not attr_path or not all(part.isidentifier() for part in module_name.split(".")) or not all(
        part.isidentifier() for part in attr_path.split(".")
    ):
        raise ConfigError(f"an import path must look like 'package.module:factory', got {spec!r}")
    module = _import_module(module_name, spec)
    obj: Any = module
    for i, part in enumerate(attr_path.split(".")):
        if not hasattr(obj, part):
            owner = ".".join([module_name, *attr_path.split(".")[:i]])
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(f"{owner} has no attribute {part!r} (import path {spec!r}){hint}")
        obj = getattr(obj, part)
    if isinstance(obj, nn.Module):
        if params:
            raise ConfigError(f"{spec} is a module instance, not a factory: it takes no parameters ({', '.join(params)})")
        model = obj
    elif callable(obj):
        try:
            inspect.signature(obj).bind(**params)
        except TypeError as exc:
            raise ConfigError(f"{spec} does not accept the parameters {sorted(params)}: {_one_line(exc)}") from None
        except ValueError:  # no signature available (builtins): just call it
            pass
        model = obj(**params)
    else:
        raise ConfigError(f"{spec} is a {type(obj).__name__}, neither a factory nor an nn.Module")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def _import_module(module_name: str, spec: str) -> Any:
    cwd = os.getcwd()
    added = False
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)  # appended, so an installed package of the same name still wins
        added = True
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ConfigError(
                f"cannot import module {module_name!r} of import path {spec!r}: no module named {exc.name!r}"
            ) from None
        raise ConfigError(f"importing {module_name!r} (import path {spec!r}) failed: {_one_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - the user's module may raise anything at import time
        raise ConfigError(
            f"importing {module_name!r} (import path {spec!r}) failed: {type(exc).__name__}: {_one_line(exc)}"
        ) from None
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)


# ============================================================================ state-dict files
STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "net", "module")


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The state dict in a checkpoint file, read with ``weights_only=True`` on the CPU.

    Accepts a raw state dict, or a dict holding one under ``state_dict``, ``model``,
    ``model_state_dict``, ``net`` or ``module``. A ``module.`` prefix on every key
    (DataParallel) is removed.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"weights file {p} not found; expected a state dict saved with torch.save")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise DataError(
            f"{p} holds more than tensors and cannot be read with weights_only=True; save model.state_dict() instead "
            f"({_one_line(exc, 160)})"
        ) from None
    except Exception as exc:  # noqa: BLE001 - torch.load raises many kinds for bad files
        raise DataError(f"cannot read weights file {p}: {_one_line(exc)}") from None
    return _extract_state_dict(obj, str(p))


def _extract_state_dict(obj: Any, where: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and not _is_state_dict(obj):
        for key in STATE_DICT_KEYS:
            if key in obj and isinstance(obj[key], Mapping) and _is_state_dict(obj[key]):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not _is_state_dict(obj):
        what = f"a dict with keys {', '.join(map(str, list(obj)[:6]))}" if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
        raise DataError(
            f"{where} holds {what}, not a state dict (nor a dict with one under {', '.join(STATE_DICT_KEYS)})"
        )
    sd = {str(k): v for k, v in obj.items()}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _is_state_dict(obj: Mapping[Any, Any]) -> bool:
    return bool(obj) and all(isinstance(k, str) for k in obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _load_into(net: nn.Module, wrapped: nn.Module, sd: dict[str, torch.Tensor], where: str, hint: str = "") -> None:
    """Load ``sd`` into ``net``, or into ``wrapped`` (Normalize + net) if it was saved from that."""
    target = wrapped if set(sd) == set(wrapped.state_dict()) and set(sd) != set(net.state_dict()) else net
    expected = target.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [k for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            k = shapes[0]
            parts.append(
                f"{len(shapes)} shape mismatch(es) (e.g. {k}: file {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)})"
            )
        raise DataError(f"weights {where} do not fit the architecture: {'; '.join(parts)}{hint if shapes else ''}")
    target.load_state_dict(sd, strict=True)


def _close_matches(name: str, names: Sequence[str], n: int = 5) -> str:
    close = difflib.get_close_matches(name, list(names), n=n, cutoff=0.6)
    if not close:
        lowered = name.lower()
        close = [c for c in names if lowered in c.lower()][:n]
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def _check_norm(mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
    if (mean is None) != (std is None):
        raise ConfigError("give both mean and std (or neither)")


# ============================================================================ torchvision
def load_torchvision(
    arch: str,
    *,
    weights: str | os.PathLike[str] | None = None,
    num_classes: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    pretrained: bool = False,
) -> nn.Module:
    """A torchvision classification architecture by name, wrapped as ``Normalize(mean, std) -> net``.

    ``weights``: a local state-dict file (read with ``weights_only=True``; a raw state dict or a
    dict with a ``state_dict``/``model`` entry; a state dict of the wrapped model also works).
    ``pretrained=True`` asks torchvision to download its default ImageNet weights (needs the
    internet; never used by advbench itself). Without either, the weights are random.
    """
    _check_norm(mean, std)
    if weights is not None and pretrained:
        raise ConfigError("give either weights=<file> or pretrained=True, not both")
    try:
        from torchvision import models as tvm
    except ImportError as exc:
        raise ConfigError(f"torchvision is not importable: {_one_line(exc)}") from None
    names = tvm.list_models(module=tvm)
    if arch not in names:
        raise UnknownNameError(f"unknown torchvision architecture {arch!r}{_close_matches(arch, names)}")
    kwargs: dict[str, Any] = {}
    if num_classes is not None:
        kwargs["num_classes"] = int(num_classes)
    if pretrained:
        try:
            net = tvm.get_model(arch, weights="DEFAULT", **kwargs)
        except Exception as exc:  # noqa: BLE001 - network, hash and size errors
            raise DataError(f"torchvision could not provide pretrained weights for {arch!r}: {_one_line(exc)}") from None
    else:
        with _quiet_torch():
            net = tvm.get_model(arch, weights=None, **kwargs)
    model = with_normalization(net, mean, std)
    if weights is not None:
        sd = load_state_dict_file(weights)
        hint = "; pass num_classes= to match the file" if num_classes is None else ""
        _load_into(net, model, sd, f"{weights} for torchvision {arch!r}", hint)
    return model.eval()


# ============================================================================ timm
def load_timm(
    arch: str,
    *,
    weights: str | os.PathLike[str] | None = None,
    num_classes: int | None = None,
    in_chans: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    pretrained: bool = False,
) -> nn.Module:
    """A timm architecture by name, wrapped as ``Normalize(mean, std) -> net``.

    ``mean``/``std`` default to the architecture's ``pretrained_cfg`` values (ImageNet's for
    most); give them when ``in_chans`` is not 3 or the weights were trained with another
    normalization. ``weights`` and ``pretrained`` work as in :func:`load_torchvision`
    (``pretrained=True`` lets timm download from the Hugging Face hub).
    """
    _check_norm(mean, std)
    if weights is not None and pretrained:
        raise ConfigError("give either weights=<file> or pretrained=True, not both")
    try:
        with _quiet_torch():
            import timm
    except ImportError as exc:
        raise ConfigError(f"timm is not importable: {_one_line(exc)}") from None
    if not timm.is_model(arch):
        raise UnknownNameError(f"unknown timm architecture {arch!r}{_close_matches(arch, timm.list_models())}")
    kwargs: dict[str, Any] = {"in_chans": int(in_chans)}
    if num_classes is not None:
        kwargs["num_classes"] = int(num_classes)
    try:
        with _quiet_torch():
            net = timm.create_model(arch, pretrained=pretrained, **kwargs)
    except Exception as exc:  # noqa: BLE001
        what = "pretrained weights for" if pretrained else "the architecture"
        raise (DataError if pretrained else ConfigError)(f"timm could not create {what} {arch!r}: {_one_line(exc)}") from None
    if mean is None:
        cfg = getattr(net, "pretrained_cfg", None) or {}
        mean, std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
        if len(mean) != in_chans:
            raise ConfigError(f"timm {arch!r} with in_chans={in_chans}: give mean= and std= with {in_chans} values")
    model = with_normalization(net, mean, std)  # type: ignore[arg-type]
    if weights is not None:
        sd = load_state_dict_file(weights)
        hint = "; pass num_classes= to match the file" if num_classes is None else ""
        _load_into(net, model, sd, f"{weights} for timm {arch!r}", hint)
    return model.eval()


# ============================================================================ RobustBench
def robustbench_checkpoint_paths(
    model_name: str, *, dataset: str = "cifar10", threat_model: str = "Linf", model_dir: str | os.PathLike[str] = "./models"
) -> list[Path]:
    """The local files RobustBench's ``load_model`` reads for ``model_name``: ``model_dir/<dataset>/<threat>/<name>.pt``.

    Ensembles have one file per member, ``<name>.pt_m0.pt``, ``<name>.pt_m1.pt``, ...
    """
    entry, ds, tm = _robustbench_entry(model_name, dataset, threat_model)
    folder = Path(model_dir).expanduser() / ds.value / tm.value
    path = folder / f"{model_name}.pt"
    gid = entry.get("gdrive_id")
    if isinstance(gid, list):
        return [Path(f"{path}_m{i}.pt") for i in range(len(gid))]
    return [path]


def _robustbench_entry(model_name: str, dataset: str, threat_model: str) -> tuple[dict[str, Any], Any, Any]:
    import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    try:
        ds = BenchmarkDataset(dataset)
    except ValueError:
        raise ConfigError(
            f"unknown robustbench dataset {dataset!r}; choose one of {', '.join(d.value for d in BenchmarkDataset)}"
        ) from None
    try:
        tm = ThreatModel(ThreatModel(threat_model).value.replace("_3d", ""))  # robustbench keeps 3d models under corruptions
    except ValueError:
        raise ConfigError(
            f"unknown robustbench threat model {threat_model!r}; choose one of {', '.join(t.value for t in ThreatModel)}"
        ) from None
    models = model_dicts.get(ds, {}).get(tm, {})
    if model_name not in models:
        raise UnknownNameError(
            f"robustbench has no {ds.value}/{tm.value} model {model_name!r}{_close_matches(model_name, list(models))}"
        )
    return models[model_name], ds, tm


def load_robustbench(
    model_name: str, *, dataset: str = "cifar10", threat_model: str = "Linf", model_dir: str | os.PathLike[str] = "./models"
) -> nn.Module:
    """A RobustBench model-zoo entry, from a checkpoint already on disk, in eval mode.

    The checkpoint must be where RobustBench keeps it:
    ``model_dir/<dataset>/<threat_model>/<model_name>.pt`` (see
    :func:`robustbench_checkpoint_paths`). advbench never downloads it: a missing file is a
    :class:`~advbench.errors.DataError` naming the path. The loading itself is RobustBench's
    ``load_model`` (its prefix fixes and partial loads for known entries), with every
    ``torch.load`` made ``weights_only=True`` (see :mod:`advbench.models.robustbench_compat`).
    RobustBench models normalize inside and take [0, 1] input.

    Entries RobustBench serves through timm (``Debenedetti2022Light_XCiT-*``) are built by timm
    with the local file's state dict as their pretrained weights.
    """
    entry, ds, tm = _robustbench_entry(model_name, dataset, threat_model)
    from robustbench.utils import DATASET_CLASSES
    from robustbench.utils import load_model as rb_load_model

    paths = robustbench_checkpoint_paths(model_name, dataset=ds.value, threat_model=tm.value, model_dir=model_dir)
    gid = entry.get("gdrive_id")
    timm_name = f"{model_name.lower().replace('-', '_')}_{ds.value.lower()}_{tm.value.lower()}"
    import timm

    if not timm.is_model(timm_name):
        if ds.value == "imagenet" and "Standard" in model_name:
            raise ConfigError(
                f"robustbench {model_name!r} is torchvision's ImageNet model with downloaded weights; "
                f"use load_torchvision with a local weights file instead"
            )
        if gid is None:
            raise ConfigError(f"robustbench {model_name!r} has no checkpoint source; robustbench cannot load it either")
    missing = [p.absolute() for p in paths if not p.is_file()]
    if missing:
        what = (
            f"an ensemble: {len(paths)} files {model_name}.pt_m0.pt .. _m{len(paths) - 1}.pt, {len(missing)} missing"
            if len(paths) > 1
            else f"robustbench's layout model_dir/{ds.value}/{tm.value}/{model_name}.pt"
        )
        raise DataError(
            f"robustbench checkpoint for {model_name!r} not found at {missing[0]}; advbench never downloads: "
            f"put the file there ({what}) or pass model_dir="
        )
    try:
        with _quiet_torch():
            if timm.is_model(timm_name):
                sd = load_state_dict_file(paths[0])
                model = timm.create_model(
                    timm_name,
                    num_classes=DATASET_CLASSES[ds],
                    pretrained=True,
                    pretrained_cfg_overlay={"state_dict": sd},
                )
            else:
                model = rb_load_model(
                    model_name, model_dir=str(Path(model_dir).expanduser()), dataset=ds.value, threat_model=tm.value
                )
    except DataError:
        raise
    except pickle.UnpicklingError as exc:
        raise DataError(
            f"robustbench checkpoint {paths[0]} cannot be read with weights_only=True: {_one_line(exc, 160)}"
        ) from None
    except Exception as exc:  # noqa: BLE001 - torch.load / load_state_dict raise RuntimeError, KeyError, ...
        raise DataError(f"cannot load robustbench checkpoint {paths[0]} for {model_name!r}: {_one_line(exc)}") from None
    return model.eval()


__all__ = [
    "ExportedModel",
    "FILE_FORMATS",
    "load_import_path",
    "load_model_file",
    "load_robustbench",
    "load_state_dict_file",
    "load_timm",
    "load_torchvision",
    "robustbench_checkpoint_paths",
]
