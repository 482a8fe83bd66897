"""Built-in architectures, "package.module:factory" hooks, and safe checkpoint loading and saving.

Checkpoints load with `torch.load(weights_only=True)`; a pickled full model is refused unless
`model.trust_pickle: true`. Every failure names its config key (`model.arch`, `model.kwargs.<name>`,
`model.checkpoint`) or file: bad config -> ConfigError (exit 2), an unusable checkpoint or a
data shape the model cannot take -> DataError (exit 3). Weights are never downloaded.
"""

from __future__ import annotations

import difflib
import hashlib
import inspect
import json
import pickle
from collections.abc import Callable, Mapping
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ModelConfig
from .errors import ConfigError, DataError, InflError
from .files import write_atomic_bytes
from .sources import import_object

_KEYS_SHOWN = 5


class LogReg(nn.Module):
    """Multinomial (or, with num_classes 1, binary) logistic regression on the flattened input."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


class MLP(nn.Module):
    """`net` = Linear, act, ..., Linear on the flattened input (state_dict keys net.0.weight, ...)."""

    def __init__(self, in_features: int, hidden: list[int], num_classes: int, activation: str = "relu") -> None:
        super().__init__()
        act = {"relu": nn.ReLU, "tanh": nn.Tanh}[activation]
        sizes = [in_features, *hidden]
        layers: list[nn.Module] = []
        for a, b in pairwise(sizes):
            layers += [nn.Linear(a, b), act()]
        self.net = nn.Sequential(*layers, nn.Linear(sizes[-1], num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class LeNet(nn.Module):
    """LeNet-5 style: two 5x5 convolutions with max pooling, then 120 -> 84 -> num_classes."""

    def __init__(self, in_channels: int, num_classes: int, height: int, width: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        )
        flat = 16 * _lenet_side(height) * _lenet_side(width)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _lenet_side(size: int) -> int:
    return (size // 2 - 4) // 2  # conv(pad 2) keeps it, pool halves, conv 5 takes 4, pool halves


def logreg(*, in_features: int, num_classes: int) -> nn.Module:
    return LogReg(_count("in_features", in_features), _count("num_classes", num_classes))


def mlp(*, in_features: int, hidden: list[int], num_classes: int, activation: str = "relu") -> nn.Module:
    if not isinstance(hidden, (list, tuple)):
        hidden = [hidden]
    sizes = [_count(f"hidden[{i}]", h) for i, h in enumerate(hidden)]
    if activation not in ("relu", "tanh"):
        raise ConfigError(f"model.kwargs.activation: expected relu or tanh, got {activation!r}")
    return MLP(_count("in_features", in_features), sizes, _count("num_classes", num_classes), activation)


def cnn(*, in_channels: int, num_classes: int, image_size: int | list[int]) -> nn.Module:
    size = list(image_size) if isinstance(image_size, (list, tuple)) else [image_size]
    if len(size) not in (1, 2):
        raise ConfigError(f"model.kwargs.image_size: give one size or [height, width], got {image_size!r}")
    height, width = (_count("image_size", s) for s in (size[0], size[-1]))
    if min(_lenet_side(height), _lenet_side(width)) < 1:
        raise ConfigError(f"model.kwargs.image_size: {image_size!r} is too small for cnn; it needs at least 12 pixels",
                          hint="resize the images (data.<split>.resize) or use mlp")
    return LeNet(_count("in_channels", in_channels), _count("num_classes", num_classes), height, width)


def resnet18(*, num_classes: int, in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet-18 with random weights (never downloaded); conv1 replaced for in_channels != 3."""
    from torchvision.models import resnet18 as tv_resnet18

    model = tv_resnet18(weights=None, num_classes=_count("num_classes", num_classes))
    if _count("in_channels", in_channels) != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


ARCHS: dict[str, Callable[..., nn.Module]] = {"logreg": logreg, "mlp": mlp, "cnn": cnn, "resnet18": resnet18}


def build_model(cfg: ModelConfig) -> nn.Module:
    """A built-in by name, "package.module:factory" called with `model.kwargs` (user code, on purpose), or
    hf: the sequence classifier saved in `model.path` (hf.py; its own weights, from safetensors)."""
    if cfg.arch == "hf":
        from . import hf

        return hf.load_model(cfg.path)
    if ":" in cfg.arch:
        factory = import_object(cfg.arch, "model.arch")
    elif cfg.arch in ARCHS:
        factory = ARCHS[cfg.arch]
    else:
        close = difflib.get_close_matches(cfg.arch, list(ARCHS), n=1)
        hint = f"did you mean {close[0]}?" if close else f"built-ins: {', '.join(ARCHS)}"
        raise ConfigError(f"model.arch: unknown architecture {cfg.arch!r}",
                          hint=f"{hint} Or give package.module:factory")
    if factory in ARCHS.values():
        _check_size(factory, cfg)
    try:
        model = factory(**cfg.kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.kwargs: {e} (model.arch: {cfg.arch})", hint=_kwargs_hint(factory, cfg.kwargs)) from e
    except (RuntimeError, MemoryError) as e:  # the allocator: "can't allocate memory", CUDA out of memory
        if isinstance(e, RuntimeError) and not _is_allocation_failure(e):
            raise
        raise ConfigError(f"model.kwargs: a model of this size cannot be allocated here (model.arch: {cfg.arch}; "
                          f"{type(e).__name__}: {_first_line(e) or 'out of memory'})",
                          hint="make the model smaller (model.kwargs) or run on a machine with more memory") from e
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.arch: {cfg.arch} returned a {type(model).__name__}, not a torch nn.Module")
    return model


def _check_size(factory: Callable[..., nn.Module], cfg: ModelConfig) -> None:
    """The memory guard: count a built-in's parameters on the meta device (nothing allocated)
    and refuse one whose float32 weights alone exceed the memory available now."""
    try:
        with torch.device("meta"):
            model = factory(**cfg.kwargs)
    except InflError:
        raise
    except Exception:  # noqa: BLE001 - the real build below reports bad kwargs with their own message
        return
    count = sum(p.numel() for p in model.parameters())
    need, free = 4 * count, _available_bytes()
    if need > free:
        raise ConfigError(f"model.kwargs: model.arch={cfg.arch} with these kwargs has {count:,} parameters "
                          f"({need / 2**30:.1f} GiB in float32), more than the {free / 2**30:.1f} GiB of memory "
                          "available", hint="make the model smaller (hidden, in_features, num_classes)")


def _available_bytes() -> int:
    from .solvers.base import available_memory

    return available_memory(torch.device("cpu"))


def _is_allocation_failure(e: RuntimeError) -> bool:
    text = str(e).lower()
    return any(s in text for s in ("allocate", "out of memory", "alloc_cpu", "not enough memory"))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else ""


def load_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Build, load `model.checkpoint` (required, but for hf: the folder's weights when not set), move to
    `device`/`dtype`, and set eval mode."""
    model = build_model(cfg)
    if cfg.arch == "hf" and cfg.checkpoint is None:
        return model.to(device=device, dtype=dtype).eval()
    if cfg.checkpoint is None or not Path(cfg.checkpoint).is_file():
        where = "is not set" if cfg.checkpoint is None else f"{cfg.checkpoint} not found"
        raise ConfigError(f"model.checkpoint: {where}; run `infl train -c CONFIG` to create it",
                          hint="or set model.checkpoint to an existing state_dict file")
    check_architecture(cfg)
    state = load_checkpoint(Path(cfg.checkpoint), trust_pickle=cfg.trust_pickle)
    _check_fits(model, state, Path(cfg.checkpoint), cfg.arch)
    model.load_state_dict(state, strict=True)
    return model.to(device=device, dtype=dtype).eval()


def load_checkpoint(path: Path, *, trust_pickle: bool) -> dict[str, torch.Tensor]:
    """Read a state_dict: plain, nested under "state_dict" or "model", "module."-prefixed (DataParallel)
    or "_orig_mod."-prefixed (torch.compile). Non-finite values are a DataError naming the tensor."""
    if not path.is_file():
        raise ConfigError(f"model.checkpoint: {path} not found; run `infl train -c CONFIG` to create it")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = _not_a_checkpoint(path)
        if found:
            raise DataError(f"model.checkpoint: {path} is not a readable torch checkpoint: {found}",
                            hint=_NOT_A_CHECKPOINT_HINT) from e
        if not trust_pickle:
            raise DataError(f"model.checkpoint: {path} holds a pickled Python object, not a state_dict; "
                            "loading it would run arbitrary code",
                            hint="save model.state_dict() instead, or set model.trust_pickle: true if you trust "
                                 "the file") from e
        obj = _load(path, weights_only=False)
    except Exception as e:
        raise _unreadable(path, e) from e
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    for nest in ("state_dict", "model"):
        if isinstance(obj, Mapping) and nest in obj and isinstance(obj[nest], (Mapping, nn.Module)):
            obj = obj[nest].state_dict() if isinstance(obj[nest], nn.Module) else obj[nest]
            break
    if not isinstance(obj, Mapping) or not obj:
        what = f"an empty {type(obj).__name__}" if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
        raise DataError(f"model.checkpoint: {path} holds {what}, not a state_dict",
                        hint="save it with torch.save(model.state_dict(), path)")
    state = dict(obj)
    for prefix in ("module.", "_orig_mod."):
        if all(str(k).startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise DataError(f"model.checkpoint: {path} entry {name!r} is a {type(value).__name__}, not a tensor",
                            hint="save model.state_dict(), or nest it under a 'state_dict' key")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise DataError(f"model.checkpoint: {path} tensor {name!r} holds NaN or inf values",
                            hint="the training diverged; retrain with a smaller train.lr")
    return state


def save_checkpoint(model: nn.Module, path: Path, cfg: ModelConfig | None = None) -> None:
    """Write the state_dict (on cpu) atomically (files.write_atomic_bytes: temp file, fsync, os.replace),
    and, given the model config, `<checkpoint>.infl.json` beside it recording the arch and kwargs it
    was built with (the checkpoint stays a plain state_dict for weights_only=True)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    write_atomic_bytes(path, lambda f: torch.save(state, f))
    if cfg is not None:
        record = {"arch": cfg.arch, "kwargs": _plain_kwargs(cfg.kwargs)}
        write_atomic_bytes(architecture_record(path), json.dumps(record, indent=2, sort_keys=True) + "\n")


def architecture_record(checkpoint: Path) -> Path:
    """Where `infl train` records the arch and kwargs of a checkpoint."""
    return Path(checkpoint).with_name(Path(checkpoint).name + ".infl.json")


def check_architecture(cfg: ModelConfig) -> None:
    """DataError when the checkpoint's recorded arch/kwargs differ from the config's (no record: nothing
    to check). A checkpoint loads into any model with the same parameter shapes, so a changed
    activation would otherwise load silently into the wrong model."""
    record_path = architecture_record(Path(cfg.checkpoint))  # type: ignore[arg-type]
    if not record_path.is_file():
        return
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"model.checkpoint: {record_path} is not readable JSON ({e})",
                        hint="delete it if the checkpoint was not written by `infl train`") from None
    ours = {"arch": cfg.arch, "kwargs": _plain_kwargs(cfg.kwargs)}
    theirs = {"arch": record.get("arch"), "kwargs": record.get("kwargs")}
    if json.dumps(ours, sort_keys=True) != json.dumps(theirs, sort_keys=True):
        raise DataError(f"model.checkpoint: {cfg.checkpoint} does not fit the config: it was trained as arch={theirs['arch']}"
                        f" kwargs={json.dumps(theirs['kwargs'], sort_keys=True)}, but the config says"
                        f" arch={ours['arch']} kwargs={json.dumps(ours['kwargs'], sort_keys=True)}",
                        hint=f"make model.arch/model.kwargs match, or retrain (`infl train`); record: {record_path}")


def _plain_kwargs(kwargs: Any) -> Any:
    return json.loads(json.dumps(kwargs, default=list))


def weights_sha256(cfg: ModelConfig) -> str:
    """sha256 of model.checkpoint; for hf without one, of the folder's config.json and safetensors files."""
    if cfg.checkpoint is not None or cfg.arch != "hf":
        return sha256_file(Path(cfg.checkpoint))  # type: ignore[arg-type]
    digest = hashlib.sha256()
    root = Path(cfg.path)  # type: ignore[arg-type]
    for path in [root / "config.json", *sorted(root.glob("*.safetensors"))]:
        digest.update(path.name.encode() + b"\0" + sha256_file(path).encode())
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def resolve_device(spec: str) -> torch.device:
    """"auto" -> cuda if available else cpu; "cuda" / "cuda:N" must exist (ConfigError naming `device`)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {spec} requested but CUDA is not available here",
                              hint="set device: cpu or device: auto")
        index = spec.partition(":")[2]
        count = torch.cuda.device_count()
        if index and (not index.isdigit() or int(index) >= count):
            raise ConfigError(f"device: {spec} does not exist; this machine has {count} CUDA device(s)",
                              hint=f"use cuda:0 .. cuda:{count - 1}")
        return torch.device(spec)
    raise ConfigError(f"device: {spec!r} is not auto, cpu, cuda or cuda:N")


def output_width(model: nn.Module, example_x: torch.Tensor) -> int:
    """Outputs per example, from one forward pass of `example_x`, a small batch (B, ...) such as
    `split.dataset[0][0].unsqueeze(0)`, in eval mode and without grad. The model must return (B, k)
    or (B,) (width 1). A data shape that does not fit the model is a DataError naming both shapes."""
    param = next(model.parameters(), None)
    x = example_x if param is None else example_x.to(device=param.device, dtype=(
        param.dtype if example_x.is_floating_point() else example_x.dtype))  # token ids stay integers
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            out = model(x)
    except (RuntimeError, ValueError, IndexError) as e:
        raise DataError(f"the data shape {tuple(x.shape)} (a batch of {len(x)}) does not fit "
                        f"model.arch/model.kwargs{_first_layer(model)}: {str(e).splitlines()[0]}",
                        hint="match model.kwargs (in_features, in_channels, image_size) to the data") from e
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.ndim not in (1, 2) or out.shape[0] != len(x):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise DataError(f"the model output for input {tuple(x.shape)} has shape {shape}; expected "
                        f"({len(x)}, k) or ({len(x)},)", hint="the model must return one row of outputs per example")
    return 1 if out.ndim == 1 else int(out.shape[1])


# ---- helpers


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"model.kwargs.{name}: expected a whole number >= 1, got {value!r}")
    return value


def _kwargs_hint(factory: Callable[..., Any], given: Mapping[str, Any]) -> str | None:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return None
    names = [p for p in params if params[p].kind in (params[p].KEYWORD_ONLY, params[p].POSITIONAL_OR_KEYWORD)]
    unknown = [k for k in given if k not in names]
    close = difflib.get_close_matches(unknown[0], names, n=1) if unknown else []
    if close:
        return f"did you mean model.kwargs.{close[0]}?"
    return f"it takes: {', '.join(names)}" if names else None


def _first_layer(model: nn.Module) -> str:
    for module in model.modules():
        for attr in ("in_features", "in_channels"):
            if isinstance(getattr(module, attr, None), int):
                return f" (its first layer takes {attr}={getattr(module, attr)})"
    return ""


def _check_fits(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path, arch: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
    parts = [f"{what} {_shorten(keys)}" for what, keys in
             (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", mismatched)) if keys]
    if parts:
        raise DataError(f"checkpoint {path} does not fit model.arch={arch}: {'; '.join(parts)}",
                        hint="use the model.arch and model.kwargs the checkpoint was trained with")


def _shorten(items: list[str]) -> str:
    shown = ", ".join(items[:_KEYS_SHOWN])
    return shown + (f" ... and {len(items) - _KEYS_SHOWN} more" if len(items) > _KEYS_SHOWN else "")


def _load(path: Path, *, weights_only: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:
        raise _unreadable(path, e) from e


_NOT_A_CHECKPOINT_HINT = "point model.checkpoint at a file written by torch.save, or rerun `infl train`"


def _not_a_checkpoint(path: Path) -> str | None:
    """What the file is when it is plainly not a torch checkpoint nor a pickle (read, never
    unpickled: pickletools only parses the opcodes), else None."""
    import pickletools
    import zipfile

    try:
        with open(path, "rb") as f:
            head = f.read(4096)
            if not head:
                return "the file is empty"
            if head.startswith(b"PK\x03\x04"):
                try:
                    with zipfile.ZipFile(path) as z:
                        names = z.namelist()
                except (zipfile.BadZipFile, OSError):
                    return "a damaged or truncated zip archive"
                if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
                    return f"a zip archive without data.pkl (holds {', '.join(names[:3]) or 'nothing'})"
                return None
            f.seek(0)
            try:
                for _ in pickletools.genops(f):
                    pass
                return None  # parses as a pickle: torch's own error stands
            except Exception:  # noqa: BLE001 - anything genops rejects is not a pickle
                pass
    except OSError:
        return None
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the weights (run `git lfs pull`)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"binary data that is neither a zip archive nor a pickle (starts {head[:8]!r})"
    return f"the file is text (starts {text.strip().splitlines()[0][:40]!r})" if text.strip() else "the file is blank text"


def _unreadable(path: Path, e: Exception) -> DataError:
    found = _not_a_checkpoint(path)
    if found:
        return DataError(f"model.checkpoint: {path} is not a readable torch checkpoint: {found}",
                         hint=_NOT_A_CHECKPOINT_HINT)
    return DataError(f"model.checkpoint: {path} is not a readable torch checkpoint "
                     f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'truncated?'})",
                     hint="point model.checkpoint at a file written by torch.save, or rerun `infl train`")
