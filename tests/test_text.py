"""Text data without transformers (these run in CI): config validation, the error naming the [hf] extra,
`params: {last_blocks: K}` selection, and padding invariance of per-example gradients and EK-FAC on a small
masked sequence model (pure torch, with the position_mask hf.py's models have)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import ListLoader
from conftest import run_cli as run
from torch import nn

from influence_cli.config import LastBlocks, SolverConfig, load_config
from influence_cli.errors import ConfigError
from influence_cli.gradients import GradientSource
from influence_cli.objective import Objective, ParamSpace, Problem
from influence_cli.solvers import make_solver

TEXT_CONFIG = """model: {{arch: hf, path: model}}
data:
  train: {{format: csv, path: train.csv, text: sentence, label: label}}
{extra}"""


def _config(tmp_path: Path, extra: str = "", body: str = TEXT_CONFIG) -> Path:
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "train.csv").write_text("sentence,label\nNA,0\nnull,1\n")
    path = tmp_path / "config.yaml"
    path.write_text(body.format(extra=extra))
    return path


def test_text_config_resolves_and_links_the_tokenizer(tmp_path):
    cfg = load_config(_config(tmp_path, "  test: {format: csv, path: train.csv, label: label}\n"
                                        "params: {last_blocks: 2}\n"))
    assert cfg.data.train.text == ("sentence",) and cfg.data.test.text == ("sentence",)  # inherited
    assert cfg.data.train.tokenizer == cfg.data.test.tokenizer == (tmp_path / "model").resolve()
    assert cfg.params == LastBlocks(last_blocks=2)
    assert cfg.to_dict()["params"] == {"last_blocks": 2, "linear_only": False}


@pytest.mark.parametrize(("override", "message"), [
    ("model.arch=mlp", "model.path: only model.arch hf reads model.path"),
    ("model.path=null", "model.path: model.arch hf needs model.path"),
    ("data.train.text=null", "data.train.text: model.arch hf reads text"),
    ("data.train.features=[a]", "data.train.features: text data has no feature columns"),
    ("data.train.max_length=0", "data.train.max_length: must be > 0"),
    ("data.train.text=[a, b, c]", "data.train.text: give one column, or two"),
    ("params={last_block: 1}", "params.last_block: unknown key"),
    ("params={last_blocks: -1}", "params.last_blocks: must be >= 0"),
    ("model.kwargs={num_classes: 2}", "model.kwargs: model.arch hf takes no kwargs"),
])
def test_text_config_errors_name_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError) as e:
        load_config(_config(tmp_path), [override])
    assert message in str(e.value)


def test_text_needs_hf_and_last_blocks_needs_hf(tmp_path):
    body = "model: {{arch: mlp, kwargs: {{in_features: 1, hidden: [2], num_classes: 2}}}}\ndata:\n" \
           "  train: {{format: csv, path: train.csv, label: label{extra}}}\n"
    with pytest.raises(ConfigError, match="data.train.text: text data needs model.arch: hf"):
        load_config(_config(tmp_path, ", text: sentence", body))
    with pytest.raises(ConfigError, match="params.last_blocks: selects transformer blocks of model.arch hf"):
        load_config(_config(tmp_path, "", body), ["params={last_blocks: 1}"])


def test_without_transformers_exit_2_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    code, _, err = run(capsys, "check", "-c", str(_config(tmp_path)))
    assert code == 2
    assert "model.arch: hf needs the transformers package" in err and "pip install -e '.[hf]'" in err


# ---- a masked sequence model: embeddings, a Linear run per token, a masked mean, a Linear head


class MaskedSeq(nn.Module):
    """x (B, 2, L): token ids and the attention mask, as text.py packs them."""

    def __init__(self, vocab: int = 12, dim: int = 4, classes: int = 3, blocks: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(nn.Linear(dim, dim) for _ in range(blocks))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.round().long() if x.is_floating_point() else x
        h, mask = self.emb(x[:, 0]), x[:, 1].to(self.head.weight.dtype)
        for block in self.blocks:
            h = torch.tanh(block(h))
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return self.head(self.norm(pooled))

    def position_mask(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 1] > 0.5


def _tokens(n: int, width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (n, 2, width) right-padded with id 0 and mask 0, y); rows 1..width tokens long."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (n,), generator=g)
    x = torch.zeros(n, 2, width, dtype=torch.int64)
    for i, length in enumerate(lengths.tolist()):
        x[i, 0, :length] = torch.randint(1, 12, (length,), generator=g)
        x[i, 1, :length] = 1
    return x, torch.randint(0, 3, (n,), generator=g)


def _problem(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: object = "all") -> Problem:
    for p in model.parameters():
        p.requires_grad_(False)
    return Problem(model=model, objective=Objective("classification", 0.01), params=ParamSpace.select(model, spec),
                   train_loader=ListLoader(x, y, 8), n=len(x), damping=1e-3)


def _padded(x: torch.Tensor, extra: int) -> torch.Tensor:
    return torch.cat([x, torch.zeros(len(x), 2, extra, dtype=x.dtype)], dim=2)


def test_padding_changes_no_per_example_gradient():
    torch.manual_seed(0)
    model = MaskedSeq().double().eval()
    x, y = _tokens(24, 6)
    grads = [torch.cat([b.grads for b in GradientSource(_problem(model, xx, y)).per_example(ListLoader(xx, y, 8))])
             for xx in (x, _padded(x, 9))]
    alone = torch.cat([b.grads for b in GradientSource(_problem(model, x[3:4, :, :2], y[3:4])).per_example(
        ListLoader(x[3:4, :, : int(x[3, 1].sum())], y[3:4], 1))])
    assert grads[0].abs().max() > 1e-3
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(alone[0], grads[0][3], rtol=1e-12, atol=1e-12)


def _ekfac(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[dict, torch.Tensor]:
    problem = _problem(model, x, y, ("blocks", "head"))
    solver = make_solver(SolverConfig(name="ekfac"), problem).fit(problem)
    return solver.describe(), solver.self_influence_fast(ListLoader(x, y, 8), len(x))


def test_ekfac_covariances_skip_padded_tokens():
    """A = mean a a^T over real tokens only: self-influence and eigenvalues do not move with the padding;
    the same model without position_mask (every position counted) does move: the test can fail."""
    torch.manual_seed(0)
    model = MaskedSeq().double().eval()
    x, y = _tokens(40, 5)
    (info, si), (info_pad, si_pad) = _ekfac(model, x, y), _ekfac(model, _padded(x, 7), y)
    torch.testing.assert_close(si_pad, si, rtol=1e-9, atol=0)
    real = int(x[:, 1].sum())
    assert [layer["positions_per_row"] for layer in info["layers"]][:2] == [real // 40] * 2
    assert [layer["eig_max"] for layer in info_pad["layers"]] == pytest.approx(
        [layer["eig_max"] for layer in info["layers"]], rel=1e-9)
    unmasked = MaskedSeq().double().eval()
    unmasked.load_state_dict(model.state_dict())
    unmasked.position_mask = None  # not callable: every position counts
    _, si_plain = _ekfac(unmasked, x, y)
    _, si_plain_pad = _ekfac(unmasked, _padded(x, 7), y)
    assert (si_plain_pad - si_plain).abs().max() / si_plain.abs().max() > 1e-3


def test_last_blocks_selects_the_head_and_the_last_k_blocks():
    model = MaskedSeq(blocks=3)
    names = lambda spec: list(ParamSpace.select(model, spec).names)  # noqa: E731
    head = ["norm.weight", "norm.bias", "head.weight", "head.bias"]
    assert names(LastBlocks(0)) == head
    assert names(LastBlocks(1)) == ["blocks.2.weight", "blocks.2.bias", *head]
    assert names(LastBlocks(3)) == [f"blocks.{i}.{w}" for i in range(3) for w in ("weight", "bias")] + head
    assert names(LastBlocks(1, linear_only=True)) == ["blocks.2.weight", "blocks.2.bias", "head.weight", "head.bias"]
    assert names("last_layer") == ["head.weight", "head.bias"]
    with pytest.raises(ConfigError, match="params.last_blocks: 4 is more than the model's 3 blocks"):
        ParamSpace.select(model, LastBlocks(4))


def test_an_old_transformers_is_refused_naming_the_extra(tmp_path, capsys, monkeypatch):
    import types

    monkeypatch.setitem(sys.modules, "transformers", types.SimpleNamespace(__version__="4.46.0"))
    code, _, err = run(capsys, "check", "-c", str(_config(tmp_path)))
    assert code == 2 and "needs transformers >= 5 (found 4.46.0)" in err and "pip install -e '.[hf]'" in err


def test_selected_parameters_by_module():
    model = MaskedSeq(dim=4, classes=3, blocks=2)
    assert ParamSpace.select(model, LastBlocks(1)).by_module() == {"blocks.1": 20, "norm": 8, "head": 15}


def test_terminal_shows_text_cut_to_a_readable_width_and_the_csv_keeps_it_whole():
    from types import SimpleNamespace

    from influence_cli.cli import _text_columns
    from influence_cli.render import TEXT_WIDTH, fmt

    long = "a very long review\nthat goes on " + "and on " * 30
    shown = fmt(long)
    assert len(shown) == TEXT_WIDTH and shown.endswith("…") and "\n" not in shown
    assert fmt("short text") == "short text" and fmt(0.123456) == "0.1235"
    assert _text_columns(SimpleNamespace(data=SimpleNamespace(train=SimpleNamespace(text="review")))) == ["review"]
    pair = SimpleNamespace(data=SimpleNamespace(train=SimpleNamespace(text=["premise", "hypothesis"])))
    assert _text_columns(pair) == ["premise", "hypothesis"]
    assert _text_columns(SimpleNamespace(data=SimpleNamespace(train=SimpleNamespace(text=None)))) == []
