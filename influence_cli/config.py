"""The YAML config: frozen dataclasses, a strict loader, and `--set dotted.key=value` overrides.

No torch here. Every key has a default except `model.arch` and `data.train`. Unknown keys, wrong
types and out-of-range values raise `ConfigError` naming the dotted key. Relative paths are
resolved against the config file's folder; an input that does not exist there is also looked for
in the current directory (so `--set data.train.path=x.csv` works from the shell).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .config_build import build, plain, positive, resolve_paths
from .errors import ConfigError
from .safe_yaml import MAX_CONFIG_BYTES, parse_yaml

_REQUIRED = {"required": True}
MAX_SEED = 2**32 - 1  # what every seeded generator (torch, numpy) takes
_IN_PATH = {"path": "input"}
_OUT_PATH = {"path": "output"}


@dataclass(frozen=True)
class ModelConfig:
    arch: str = field(default="", metadata=_REQUIRED)
    kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: Path | None = field(default=None, metadata=_OUT_PATH)  # `infl train` writes it
    trust_pickle: bool = False
    path: Path | None = field(default=None, metadata=_IN_PATH)  # arch hf: a local save_pretrained folder

    def __post_init__(self) -> None:
        if self.arch == "hf" and self.path is None:
            raise ConfigError("path: model.arch hf needs model.path, a local save_pretrained folder",
                              hint="the folder holds config.json, model.safetensors and the tokenizer files")
        if self.arch != "hf" and self.path is not None:
            raise ConfigError(f"path: only model.arch hf reads model.path (arch is {self.arch})",
                              hint="drop model.path, or set model.arch: hf")
        if self.arch == "hf" and self.kwargs:
            raise ConfigError("kwargs: model.arch hf takes no kwargs (the folder's config.json describes the model)")


@dataclass(frozen=True)
class SplitConfig:
    format: Literal["csv", "parquet", "imagefolder", "torchvision", "tensors", "python"] = field(
        default="csv", metadata=_REQUIRED
    )
    path: Path | None = field(default=None, metadata=_IN_PATH)
    label: str = "label"  # csv/parquet column, or the key of the labels in a tensors file
    id: str | None = None  # column (csv/parquet) or key (tensors) holding each row's id
    features: tuple[str, ...] | None = None
    group: str | None = None
    carry: tuple[str, ...] = ()
    x_key: str = "x"  # tensors: key of the inputs
    # imagefolder / torchvision
    name: str | None = None  # torchvision dataset class, e.g. MNIST, CIFAR10
    split: str | None = None  # torchvision: train | test (default: this split's role)
    resize: tuple[int, ...] | None = None
    grayscale: bool = False
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    # python
    function: str | None = None  # "package.module:function" returning a torch Dataset
    kwargs: dict[str, Any] = field(default_factory=dict)
    # text (csv/parquet with model.arch hf): one column, or two for sentence pairs; tokens kept per row
    text: tuple[str, ...] | None = None
    max_length: int | None = None  # default: the tokenizer's limit, capped by the model's positions
    tokenizer: Path | None = field(default=None, metadata={"internal": True})  # model.path, set by load_config

    def __post_init__(self) -> None:
        if self.text is not None:
            if self.format not in ("csv", "parquet"):
                raise ConfigError(f"text: only csv and parquet data have text columns (format is {self.format})")
            if not 1 <= len(self.text) <= 2:
                raise ConfigError(f"text: give one column, or two for sentence pairs, got {len(self.text)}")
            if self.features is not None:
                raise ConfigError("features: text data has no feature columns (the tokens are the input)",
                                  hint="drop features, or drop text for numeric columns")
        elif self.max_length is not None:
            raise ConfigError("max_length: only text data (text: COLUMN) is tokenized")
        positive(self, "max_length")
        if self.format in ("csv", "parquet", "imagefolder", "torchvision", "tensors") and not self.path:
            raise ConfigError(f"path: required for format {self.format}", hint="give the file or folder")
        if self.format == "torchvision" and not self.name:
            raise ConfigError("name: required for format torchvision", hint="for example name: MNIST")
        if self.format == "python" and (not self.function or ":" not in self.function):
            raise ConfigError("function: format python needs function: package.module:function")
        if (self.mean is None) != (self.std is None):
            raise ConfigError("mean/std: give both or neither")
        if self.resize is not None and not 1 <= len(self.resize) <= 2:
            raise ConfigError("resize: give one size or [height, width]")


@dataclass(frozen=True)
class DataConfig:
    train: SplitConfig = field(default_factory=SplitConfig, metadata=_REQUIRED)
    test: SplitConfig | None = None


@dataclass(frozen=True)
class CGConfig:
    max_iter: int = 100  # data passes per solve (each applies H to every unconverged right-hand side)
    tol: float = 1e-6  # stop a solve at relative residual ||v - H x|| / ||v|| <= tol

    def __post_init__(self) -> None:
        positive(self, "max_iter", "tol")


@dataclass(frozen=True)
class LissaConfig:
    depth: int = 1000  # recursion steps per run (one minibatch HVP each)
    scale: float | Literal["auto"] = "auto"  # must exceed lambda_max(H + damping I) / 2; auto estimates it
    repeats: int = 1  # independent runs averaged (minibatches only)
    batch_size: int | None = None  # rows per minibatch; None = the loader's batch; >= n: full-data, deterministic
    tol: float = 1e-6  # full-data runs only: stop at relative residual <= tol (0: always the full depth)

    def __post_init__(self) -> None:
        positive(self, "depth", "repeats", "batch_size")
        if self.scale != "auto":
            positive(self, "scale")
        if self.tol < 0:
            raise ConfigError(f"tol: must be >= 0, got {self.tol}")


@dataclass(frozen=True)
class ArnoldiConfig:
    rank: int = 50  # eigenpairs kept (capped at the parameter count, where the solver is exact)
    oversample: int = 20  # extra vectors per Krylov block: block size = rank + oversample
    max_iter: int = 10  # block passes over the data (each applies H to rank + oversample vectors)
    tol: float = 1e-4  # stop when every kept Ritz residual <= tol * largest Ritz value
    complement: Literal["rayleigh", "ritz", "none"] = "rayleigh"  # the rest of H^-1; none = truncation
    start: Literal["gradients", "random"] = "gradients"  # Krylov start block
    refine: int = 2  # ihvp: CG steps on exact HVPs preconditioned by the low-rank inverse (refine + 1 data passes)

    def __post_init__(self) -> None:
        positive(self, "rank", "max_iter", "tol")
        if self.oversample < 0:
            raise ConfigError(f"oversample: must be >= 0, got {self.oversample}")
        if self.refine < 0:
            raise ConfigError(f"refine: must be >= 0, got {self.refine}",
                              hint="0 gives the plain low-rank + complement approximation")


@dataclass(frozen=True)
class EkfacConfig:
    correct_eigenvalues: bool = True  # re-estimate the diagonal in the Kronecker eigenbasis (EK-FAC, not K-FAC)
    output_factor: Literal["auto", "exact", "sample"] = "auto"  # auto: exact when the model has <= 64 outputs
    samples: int = 1  # output_factor sample: Monte-Carlo pseudo-gradients per row
    refine: int = 4  # ihvp: EK-FAC-preconditioned CG steps on HVPs of A (refine + 1 data passes); 0 = plain EK-FAC

    def __post_init__(self) -> None:
        positive(self, "samples")
        if self.refine < 0:
            raise ConfigError(f"refine: must be >= 0, got {self.refine}", hint="0 gives the plain EK-FAC approximation")


@dataclass(frozen=True)
class SolverConfig:
    name: Literal["direct", "cg", "lissa", "arnoldi", "ekfac", "auto"] = "direct"
    damping: float = 0.001
    hessian: Literal["exact", "gauss_newton"] = "exact"
    memory_limit_gb: float | None = None  # default: 80% of the memory available at run time
    cg: CGConfig = field(default_factory=CGConfig)
    lissa: LissaConfig = field(default_factory=LissaConfig)
    arnoldi: ArnoldiConfig = field(default_factory=ArnoldiConfig)
    ekfac: EkfacConfig = field(default_factory=EkfacConfig)

    def __post_init__(self) -> None:
        if self.damping < 0:
            raise ConfigError(f"damping: must be >= 0, got {self.damping}")
        if self.memory_limit_gb is not None:
            positive(self, "memory_limit_gb")


@dataclass(frozen=True)
class TrainConfig:
    optimizer: Literal["lbfgs", "adam", "sgd"] = "lbfgs"
    epochs: int = 100
    lr: float = 1.0
    momentum: float = 0.9  # sgd only
    tol: float = 1e-5  # stop when the full-objective gradient norm is below this
    polish: bool = True  # after adam/sgd: L-BFGS on the selected `params` until their gradient is ~0
    warmup: float = 0.1  # model.arch hf with adam: fraction of the steps the learning rate ramps up over

    def __post_init__(self) -> None:
        positive(self, "epochs", "lr", "tol")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"warmup: must be in [0, 1), got {self.warmup}")


@dataclass(frozen=True)
class LastBlocks:
    """`params: {last_blocks: K}`: the head and the last K transformer blocks (model.arch hf)."""

    last_blocks: int = field(default=0, metadata=_REQUIRED)
    linear_only: bool = False  # only their Linear layers' weights and biases (what solver ekfac factors)

    def __post_init__(self) -> None:
        if self.last_blocks < 0:
            raise ConfigError(f"last_blocks: must be >= 0, got {self.last_blocks}", hint="0 selects the head alone")


@dataclass(frozen=True)
class SelfcheckConfig:
    """Which rows `flagged` marks. See README, "How rows are flagged"."""

    flag_fraction: float | None = None  # if set: flag exactly this top fraction (by the sort key) instead
    flag_requires_mismatch: bool = False  # classification: flag only rows the model mislabels
    # out-of-fold outputs of K fresh models (crossfit.py) for suspicion and flags: auto = 5 folds when the model
    # memorized its labels and the 5 trainings are estimated to fit in cross_fit_budget seconds; 0 = never; K >= 2 =
    # always (the --cross-fit option overrides it)
    cross_fit: Literal["auto"] | int = "auto"
    cross_fit_budget: float = 600.0

    def __post_init__(self) -> None:
        if self.flag_fraction is not None and not 0 <= self.flag_fraction <= 1:
            raise ConfigError(f"flag_fraction: must be in [0, 1], got {self.flag_fraction}")
        if self.cross_fit != "auto" and (isinstance(self.cross_fit, bool) or self.cross_fit == 1 or self.cross_fit < 0):
            raise ConfigError(f"cross_fit: must be auto, 0 (never) or a number of folds >= 2, got {self.cross_fit}")
        if self.cross_fit_budget < 0:
            raise ConfigError(f"cross_fit_budget: must be >= 0 seconds, got {self.cross_fit_budget}")


@dataclass(frozen=True)
class RankConfig:
    """How `rank` scores its pairs. See README, "Performance" (the bfloat16 screen)."""

    # auto: a screen with exact float32 rescoring of the pairs that can reach a top K: low rank (lowrank.py) where the
    # held solves allow it, else bfloat16 when that is faster on this device; true: always try them (float32 runs);
    # false: the plain float32 product
    screen: Literal["auto"] | bool = "auto"
    # groups.csv: auto = retrain without each group whose Newton estimate is not trusted, largest |estimate| first,
    # while the retrains are estimated to fit in group_retrain_budget seconds; true = retrain every group (no budget);
    # false = estimates only (commands/rank_groups.py)
    group_retrain: Literal["auto"] | bool = "auto"
    group_retrain_budget: float = 600.0

    def __post_init__(self) -> None:
        if self.group_retrain_budget < 0:
            raise ConfigError(f"group_retrain_budget: must be >= 0 seconds, got {self.group_retrain_budget}")


@dataclass(frozen=True)
class OutputConfig:
    dir: Path = field(default=Path("reports"), metadata=_OUT_PATH)


@dataclass(frozen=True)
class CacheConfig:
    """Fitted curvature and finished shards, keyed by content (README, "Caching and resuming")."""

    enabled: bool = True  # the CLI's --no-cache turns it off for one run
    dir: Path | None = field(default=None, metadata=_OUT_PATH)  # default: <report folder>/.infl-cache
    max_gb: float = 10.0  # least recently used entries go beyond this
    shard_rows: int = 8192  # rows per committed shard (rounded up to a multiple of batch_size)

    def __post_init__(self) -> None:
        positive(self, "max_gb", "shard_rows")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig, metadata=_REQUIRED)
    data: DataConfig = field(default_factory=DataConfig, metadata=_REQUIRED)
    seed: int = 0
    device: str = "auto"
    dtype: Literal["float32", "float64"] = "float32"  # model and gradients; curvature is always float64
    batch_size: int = 256
    task: Literal["classification", "binary", "regression"] = "classification"
    params: Literal["all", "last_layer"] | tuple[str, ...] | LastBlocks = "all"
    weight_decay: float = 0.001
    solver: SolverConfig = field(default_factory=SolverConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    selfcheck: SelfcheckConfig = field(default_factory=SelfcheckConfig)
    rank: RankConfig = field(default_factory=RankConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    source: Path | None = field(default=None, metadata={"internal": True})  # the YAML file

    def __post_init__(self) -> None:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"device: {self.device!r} is not auto, cpu, cuda or cuda:N")
        positive(self, "batch_size")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"seed: must be a whole number in [0, {MAX_SEED}], got {self.seed}",
                              hint="any value in that range works; it seeds torch and numpy")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay: must be >= 0, got {self.weight_decay}")
        if isinstance(self.params, tuple) and not self.params:
            raise ConfigError("params: the list of parameter-name prefixes is empty")
        _check_text(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON-able form (paths as strings, tuples as lists), for the manifest."""
        return plain(dataclasses.asdict(self))


def load_config(path: Path | str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read, override, validate and resolve a config. Raises ConfigError naming the bad key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}", hint="pass --config PATH to a YAML file")
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: the config file is larger than {MAX_CONFIG_BYTES // 2**20} MiB ({size:,} bytes)",
                              hint="is it the right file? A config is a few dozen lines")
        raw = parse_yaml(path.read_text(encoding="utf-8"), str(path))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the config file ({e})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a YAML mapping (key: value), not {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    _inherit_test_settings(raw)
    cfg = build(Config, raw, "")
    cfg = resolve_paths(cfg, path.resolve().parent)
    return dataclasses.replace(link_tokenizer(cfg), source=path.resolve())


def _check_text(cfg: Config) -> None:
    """Text data and model.arch hf come together; `params: {last_blocks}` needs hf."""
    splits = [("train", cfg.data.train), ("test", cfg.data.test)]
    hf = cfg.model.arch == "hf"
    for role, split in splits:
        if split is not None and split.text is not None and not hf:
            raise ConfigError(f"data.{role}.text: text data needs model.arch: hf (its tokenizer comes from model.path)",
                              hint="set model.arch: hf and model.path: a local save_pretrained folder")
    if hf and cfg.data.train.text is None:
        raise ConfigError("data.train.text: model.arch hf reads text: name the text column",
                          hint="for example text: sentence, or text: [premise, hypothesis] for pairs")
    if isinstance(cfg.params, LastBlocks) and not hf:
        raise ConfigError("params.last_blocks: selects transformer blocks of model.arch hf",
                          hint="use params: last_layer or a list of parameter-name prefixes")


def link_tokenizer(cfg: Config) -> Config:
    """Give every text split the tokenizer of model.path (the data is tokenized as the model reads it)."""
    if cfg.model.arch != "hf":
        return cfg
    train = dataclasses.replace(cfg.data.train, tokenizer=cfg.model.path)
    test = cfg.data.test
    if test is not None and test.text is not None:
        test = dataclasses.replace(test, tokenizer=cfg.model.path)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train=train, test=test))


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one `dotted.key=value` (value parsed as a YAML scalar) to the raw mapping in place."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: expected dotted.key=value", hint="for example --set solver.damping=0.01")
    try:
        value = parse_yaml(text, f"--set {key}") if text.strip() else None
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a section", hint="check the key")
        node = child
    node[parts[-1]] = value


INHERITED = {"group": ("csv", "parquet", "tensors"), "carry": ("csv", "parquet", "tensors"),
             "features": ("csv", "parquet"), "text": ("csv", "parquet"), "max_length": ("csv", "parquet")}


def _inherit_test_settings(raw: dict[str, Any]) -> None:
    """data.test takes data.train's group, carry and features unless it sets them itself (and
    where its format has such columns), so a metadata column never becomes a test feature."""
    data = raw.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("train"), dict) or not isinstance(data.get("test"), dict):
        return
    train, test = data["train"], data["test"]
    for key, formats in INHERITED.items():
        if key in train and key not in test and test.get("format", "csv") in formats:
            test[key] = train[key]
