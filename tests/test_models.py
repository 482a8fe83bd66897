"""models.py: built-ins, factory hooks, checkpoint loading (nested, prefixed, pickled, corrupt), devices."""

from __future__ import annotations

import hashlib
import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from influence_cli.config import ModelConfig
from influence_cli.errors import ConfigError, DataError
from influence_cli.models import (
    ARCHS,
    build_model,
    load_checkpoint,
    load_model,
    output_width,
    resolve_device,
    save_checkpoint,
    sha256_file,
)

MLP_KW = {"in_features": 4, "hidden": [8, 6], "num_classes": 3}


def mlp_cfg(checkpoint: Path | None = None, **kw) -> ModelConfig:
    return ModelConfig(arch="mlp", kwargs={**MLP_KW, **kw}, checkpoint=checkpoint)


# ---- built-ins and hooks


@pytest.mark.parametrize(("arch", "kwargs", "x_shape", "width"), [
    ("logreg", {"in_features": 12, "num_classes": 1}, (2, 3, 4), 1),
    ("mlp", {"in_features": 12, "hidden": [5], "num_classes": 4, "activation": "tanh"}, (2, 12), 4),
    ("mlp", {"in_features": 12, "hidden": [], "num_classes": 2}, (2, 12), 2),
    ("cnn", {"in_channels": 1, "num_classes": 10, "image_size": 28}, (2, 1, 28, 28), 10),
    ("cnn", {"in_channels": 3, "num_classes": 5, "image_size": [16, 24]}, (2, 3, 16, 24), 5),
    ("resnet18", {"num_classes": 7, "in_channels": 1}, (2, 1, 32, 32), 7),
    ("resnet18", {"num_classes": 2}, (2, 3, 32, 32), 2),
])
def test_builtins_build_and_run(arch: str, kwargs: dict, x_shape: tuple, width: int) -> None:
    model = build_model(ModelConfig(arch=arch, kwargs=kwargs)).eval()
    assert model(torch.randn(x_shape)).shape == (x_shape[0], width)
    assert output_width(model, torch.randn(x_shape[1:]).unsqueeze(0)) == width
    assert set(ARCHS) == {"logreg", "mlp", "cnn", "resnet18"}


def test_builtin_layouts() -> None:
    assert list(build_model(ModelConfig(arch="logreg", kwargs={"in_features": 3, "num_classes": 2})).state_dict()) \
        == ["linear.weight", "linear.bias"]
    assert list(build_model(mlp_cfg()).state_dict()) == [
        "net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias", "net.4.weight", "net.4.bias"]
    cnn = build_model(ModelConfig(arch="cnn", kwargs={"in_channels": 1, "num_classes": 10, "image_size": 28}))
    assert cnn.classifier[1].in_features == 16 * 5 * 5 and isinstance(cnn.features[0], nn.Conv2d)


@pytest.mark.parametrize(("arch", "kwargs", "pattern"), [
    ("mpl", MLP_KW, r"model\.arch: unknown architecture 'mpl'.*did you mean mlp\?"),
    ("mlp", {**MLP_KW, "hiden": [3]}, r"model\.kwargs: mlp\(\) got an unexpected keyword argument 'hiden' "
     r"\(model\.arch: mlp\)"
     r".*did you mean model\.kwargs\.hidden\?"),
    ("mlp", {"in_features": 4, "num_classes": 3}, r"model\.kwargs: mlp\(\) missing .*'hidden'"),
    ("mlp", {**MLP_KW, "num_classes": 0}, r"model\.kwargs\.num_classes: expected a whole number >= 1, got 0"),
    ("mlp", {**MLP_KW, "hidden": [8, True]}, r"model\.kwargs\.hidden\[1\]"),
    ("mlp", {**MLP_KW, "activation": "gelu"}, r"model\.kwargs\.activation: expected relu or tanh, got 'gelu'"),
    ("cnn", {"in_channels": 1, "num_classes": 2, "image_size": 8}, r"model\.kwargs\.image_size: 8 is too small"),
    ("resnet18", {"num_classes": 3, "in_channels": -1}, r"model\.kwargs\.in_channels"),
])
def test_bad_arch_or_kwargs(arch: str, kwargs: dict, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        build_model(ModelConfig(arch=arch, kwargs=kwargs))


@pytest.fixture
def factory_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "my_infl_models.py").write_text(textwrap.dedent("""
        import torch

        def tiny(width=2):
            return torch.nn.Linear(3, width)

        def not_a_model():
            return 42
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_infl_models"
    sys.modules.pop("my_infl_models", None)


def test_factory_hook(factory_module: str) -> None:
    model = build_model(ModelConfig(arch=f"{factory_module}:tiny", kwargs={"width": 5}))
    assert isinstance(model, nn.Linear) and model.out_features == 5
    with pytest.raises(ConfigError, match=r"model\.kwargs: .*unexpected keyword argument 'depth'"):
        build_model(ModelConfig(arch=f"{factory_module}:tiny", kwargs={"depth": 5}))
    with pytest.raises(ConfigError, match=r"model\.arch: .*returned a int, not a torch nn\.Module"):
        build_model(ModelConfig(arch=f"{factory_module}:not_a_model"))
    with pytest.raises(ConfigError, match=r"model\.arch: cannot import 'nowhere_xyz'"):
        build_model(ModelConfig(arch="nowhere_xyz:make"))
    with pytest.raises(ConfigError, match=r"model\.arch: module 'my_infl_models' has no 'huge'"):
        build_model(ModelConfig(arch=f"{factory_module}:huge"))


# ---- checkpoints


@pytest.fixture
def trained(tmp_path: Path) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    model = build_model(mlp_cfg())
    path = tmp_path / "ckpt" / "sub" / "mlp.pt"
    save_checkpoint(model, path)
    return model, path


def test_save_is_atomic_and_load_model_round_trips(trained: tuple[nn.Module, Path]) -> None:
    model, path = trained
    assert sorted(p.name for p in path.parent.iterdir()) == ["mlp.pt"]  # parent created, no temp file left
    loaded = load_model(mlp_cfg(path), torch.device("cpu"), torch.float64)
    assert not loaded.training and next(loaded.parameters()).dtype == torch.float64
    x = torch.randn(2, 4)
    torch.testing.assert_close(loaded(x.double()).float(), model(x), rtol=1e-5, atol=1e-6)
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_save_failure_leaves_previous_file(trained: tuple[nn.Module, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    model, path = trained
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, path)
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == ["mlp.pt"]


@pytest.mark.parametrize("wrap", [
    lambda sd: {"state_dict": sd, "epoch": 3},
    lambda sd: {"model": sd, "optimizer": {}},
    lambda sd: {f"module.{k}": v for k, v in sd.items()},
    lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
])
def test_nested_and_prefixed_checkpoints(trained: tuple[nn.Module, Path], tmp_path: Path, wrap) -> None:
    model, _ = trained
    torch.save(wrap(model.state_dict()), tmp_path / "w.pt")
    state = load_checkpoint(tmp_path / "w.pt", trust_pickle=False)
    assert list(state) == list(model.state_dict())
    load_model(mlp_cfg(tmp_path / "w.pt"), torch.device("cpu"))


def test_pickled_full_model_needs_trust(trained: tuple[nn.Module, Path], tmp_path: Path) -> None:
    model, _ = trained
    torch.save(model, tmp_path / "full.pt")
    with pytest.raises(DataError, match=r"model\.checkpoint: .*full\.pt holds a pickled Python object, not a "
                                        r"state_dict; loading it would run arbitrary code") as e:
        load_checkpoint(tmp_path / "full.pt", trust_pickle=False)
    assert "model.trust_pickle: true" in (e.value.hint or "") and "state_dict()" in (e.value.hint or "")
    state = load_checkpoint(tmp_path / "full.pt", trust_pickle=True)
    assert torch.equal(state["net.0.weight"], model.state_dict()["net.0.weight"])
    cfg = ModelConfig(arch="mlp", kwargs=MLP_KW, checkpoint=tmp_path / "full.pt", trust_pickle=True)
    load_model(cfg, torch.device("cpu"))


@pytest.mark.parametrize("content", [b"", b"hello, not a checkpoint", "truncate"])
def test_corrupt_checkpoint(trained: tuple[nn.Module, Path], tmp_path: Path, content) -> None:
    _, good = trained
    bad = tmp_path / "bad.pt"
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2] if content == "truncate" else content)
    with pytest.raises(DataError, match=r"model\.checkpoint: .*bad\.pt is not a readable torch checkpoint"):
        load_checkpoint(bad, trust_pickle=False)


def test_checkpoint_not_a_state_dict(tmp_path: Path) -> None:
    torch.save({"weights": [1, 2]}, tmp_path / "l.pt")
    with pytest.raises(DataError, match=r"entry 'weights' is a list, not a tensor"):
        load_checkpoint(tmp_path / "l.pt", trust_pickle=False)
    torch.save(torch.zeros(3), tmp_path / "t.pt")
    with pytest.raises(DataError, match=r"holds a Tensor, not a state_dict"):
        load_checkpoint(tmp_path / "t.pt", trust_pickle=False)
    torch.save({}, tmp_path / "e.pt")
    with pytest.raises(DataError, match=r"holds an empty dict, not a state_dict"):
        load_checkpoint(tmp_path / "e.pt", trust_pickle=False)


def test_non_finite_checkpoint(trained: tuple[nn.Module, Path], tmp_path: Path) -> None:
    state = trained[0].state_dict()
    state["net.2.bias"][1] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(DataError, match=r"tensor 'net\.2\.bias' holds NaN or inf"):
        load_checkpoint(tmp_path / "nan.pt", trust_pickle=False)


def test_checkpoint_mismatch_lists_keys_and_shapes(trained: tuple[nn.Module, Path], tmp_path: Path) -> None:
    _, path = trained
    with pytest.raises(DataError) as e:
        load_model(mlp_cfg(path, hidden=[8, 5]), torch.device("cpu"))
    assert e.value.message == (f"checkpoint {path} does not fit model.arch=mlp: shape mismatch "
                               "net.2.weight: checkpoint (6, 8) vs model (5, 8), net.2.bias: checkpoint (6,) vs "
                               "model (5,), net.4.weight: checkpoint (3, 6) vs model (3, 5)")
    with pytest.raises(DataError, match=r"fit model\.arch=mlp: missing keys net\.6\.weight, net\.6\.bias; shape "):
        load_model(mlp_cfg(path, hidden=[8, 6, 4]), torch.device("cpu"))
    with pytest.raises(DataError, match=r"fit model\.arch=mlp: unexpected keys net\.4\.weight, net\.4\.bias; shape "):
        load_model(mlp_cfg(path, hidden=[8]), torch.device("cpu"))
    many = {f"extra.{i}": torch.zeros(1) for i in range(9)}
    torch.save({**build_model(mlp_cfg()).state_dict(), **many}, tmp_path / "many.pt")
    with pytest.raises(DataError, match=r"unexpected keys extra\.0, .*extra\.4 \.\.\. and 4 more"):
        load_model(mlp_cfg(tmp_path / "many.pt"), torch.device("cpu"))


def test_missing_checkpoint_says_train(tmp_path: Path) -> None:
    for cfg in (mlp_cfg(tmp_path / "none.pt"), mlp_cfg(None)):
        with pytest.raises(ConfigError, match=r"model\.checkpoint: .*run `infl train -c CONFIG` to create it"):
            load_model(cfg, torch.device("cpu"))


# ---- devices and shapes


def test_resolve_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"device: cuda:0 requested but CUDA is not available"):
        resolve_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda") and resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ConfigError, match=r"device: cuda:3 does not exist; this machine has 1 CUDA device"):
        resolve_device("cuda:3")


def test_output_width_shape_error_names_both_shapes() -> None:
    model = build_model(ModelConfig(arch="mlp", kwargs={"in_features": 64, "hidden": [8], "num_classes": 3}))
    with pytest.raises(DataError, match=r"data shape \(1, 1, 28, 28\).*model\.arch/model\.kwargs.*in_features=64.*784"):
        output_width(model, torch.randn(1, 1, 28, 28))
    resnet = build_model(ModelConfig(arch="resnet18", kwargs={"num_classes": 4})).train()
    assert output_width(resnet, torch.randn(1, 3, 32, 32)) == 4 and resnet.training  # batch of one in eval mode
    assert output_width(nn.Sequential(nn.Linear(3, 1), nn.Flatten(0)), torch.randn(2, 3)) == 1
    with pytest.raises(DataError, match=r"output for input \(2, 3\) has shape \(2, 1, 1\)"):
        output_width(nn.Sequential(nn.Linear(3, 1), nn.Unflatten(1, (1, 1))), torch.randn(2, 3))
    assert output_width(build_model(mlp_cfg()).double(), torch.randn(2, 4)) == 3  # cast to the model's dtype


# ---- issue 14: say what was found; allocation failures name model.kwargs


@pytest.mark.parametrize(("content", "found"), [
    (b"", "the file is empty"),
    (b"hello, not a checkpoint\n", "the file is text (starts 'hello, not a checkpoint')"),
    (b'{"weights": [1, 2]}', "the file is text"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 12\n", "a Git LFS pointer"),
    (b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", "binary data that is neither a zip archive nor a pickle"),
    ("zip", "a zip archive without data.pkl"),
])
def test_not_a_checkpoint_says_what_was_found(tmp_path: Path, content, found: str) -> None:
    bad = tmp_path / "bad.pt"
    if content == "zip":
        import zipfile

        with zipfile.ZipFile(bad, "w") as z:
            z.writestr("weights/readme.txt", "x")
    else:
        bad.write_bytes(content)
    with pytest.raises(DataError) as e:
        load_checkpoint(bad, trust_pickle=False)
    assert found in str(e.value) and "arbitrary code" not in str(e.value) and "bad.pt" in str(e.value)


def test_protocol_0_pickle_is_still_called_a_pickle(tmp_path: Path) -> None:
    (tmp_path / "evil.pt").write_bytes(b"cos\nsystem\n(S'true'\ntR.")
    with pytest.raises(DataError, match="pickled Python object.*arbitrary code"):
        load_checkpoint(tmp_path / "evil.pt", trust_pickle=False)


def test_model_too_large_is_refused_before_allocation() -> None:
    with pytest.raises(ConfigError, match=r"model\.kwargs: .*parameters.*GiB") as e:
        build_model(ModelConfig(arch="mlp", kwargs={"in_features": 2**20, "hidden": [2**20], "num_classes": 2}))
    assert "hidden" in str(e.value) or "model.kwargs" in str(e.value)


def test_allocation_failure_in_a_factory_names_kwargs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "alloc_models.py").write_text(textwrap.dedent("""
        def oom(width):
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate memory")
        def mem(width):
            raise MemoryError()
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("oom", "mem"):
        with pytest.raises(ConfigError, match=r"model\.kwargs: .*cannot be allocated .*alloc_models:" + name):
            build_model(ModelConfig(arch=f"alloc_models:{name}", kwargs={"width": 10**9}))


def test_train_records_the_architecture_and_a_mismatch_is_refused(tmp_path, capsys):
    """A checkpoint loads into any model with the same shapes: the record beside it catches a changed activation."""
    from influence_cli import cli

    root = Path(__file__).resolve().parents[1]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"model: {{arch: mlp, kwargs: {{in_features: 64, hidden: [8], num_classes: 10, activation: tanh}},"
        f" checkpoint: {tmp_path / 'm.pt'}}}\n"
        f"data: {{train: {{format: csv, path: {root / 'sample_data/digits/train.csv'}, label: label, id: id,"
        f" carry: [source]}}}}\ntrain: {{epochs: 5}}\n")
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "-c", str(cfg), "--quiet"])
    assert exc.value.code == 0
    record = json.loads((tmp_path / "m.pt.infl.json").read_text())
    assert record == {"arch": "mlp", "kwargs": {"in_features": 64, "hidden": [8], "num_classes": 10,
                                                "activation": "tanh"}}
    torch.load(tmp_path / "m.pt", weights_only=True)  # still a plain state_dict
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli.main(["selfcheck", "-c", str(cfg), "-o", str(tmp_path / "r"), "--quiet",
                  "--set", "model.kwargs.activation=relu"])
    err = capsys.readouterr().err
    assert exc.value.code == 3 and "tanh" in err and "relu" in err
