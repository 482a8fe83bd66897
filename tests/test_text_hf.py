"""A tiny BERT built offline (BertConfig, a WordPiece tokenizer trained on the corpus, save_pretrained), fine-tuned
outside infl on a templated corpus with 10% flipped labels, then audited through the CLI by config alone.
Skipped when transformers/tokenizers (the [hf] extra) are not installed."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import ListLoader
from conftest import run_cli as run

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import textgen  # noqa: E402

from influence_cli import hf  # noqa: E402
from influence_cli.config import load_config  # noqa: E402
from influence_cli.gradients import GradientSource  # noqa: E402
from influence_cli.objective import Objective, ParamSpace, Problem  # noqa: E402
from influence_cli.run import Run  # noqa: E402

N = 300


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("text")
    frame, _ = textgen.corpus(N, seed=1)
    frame.to_csv(root / "train.csv", index=False)
    folder = textgen.tiny_bert(root / "model", frame.text.tolist())
    classes = sorted(set(frame.label))
    textgen.fine_tune(folder, frame.text.tolist(), [classes.index(c) for c in frame.label], epochs=4)
    textgen.write_config(root / "config.yaml", folder, root / "train.csv")
    return root


def _cfg(work: Path) -> str:
    return str(work / "config.yaml")


def test_folder_loads_offline_with_its_own_names(work):
    model = hf.load_model(work / "model")
    assert hf.is_hf(model)
    names = [n for n, _ in model.named_parameters()]
    assert names[-2:] == ["classifier.weight", "classifier.bias"] and "bert.encoder.layer.1.output.dense.weight" in names
    assert hf.blocks(model)[0] == "bert.encoder.layer"


def test_no_safetensors_is_refused(tmp_path, capsys, work):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text((work / "model" / "config.json").read_text())
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(Exception, match="has no .safetensors weights .only pytorch_model.bin, a pickle"):
        hf.load_model(tmp_path / "m")


def test_bert_gradient_does_not_depend_on_padding(work):
    """A row's per-example gradient in every parameter, alone (no padding) and in a batch padded to the longest
    row (almost twice as long), in float64: equal to rounding."""
    cfg = load_config(_cfg(work), ["params=all"])
    model = hf.load_model(cfg.model.path).double()
    for p in model.parameters():
        p.requires_grad_(False)
    run_ = Run.open(cfg, "selfcheck", fresh_model=True)
    data = run_.train.dataset
    lengths = data.lengths
    short, long = int(lengths.argmin()), int(lengths.argmax())
    assert int(lengths[long]) >= int(lengths[short]) + 4
    pair = torch.stack([data.x[short], data.x[long]])[:, :, : int(lengths[long])]
    y = data.y[[short, long]]
    problem = Problem(model, Objective("classification", 0.0), ParamSpace.select(model, "all"), ListLoader(pair, y, 2),
                      2, 1e-3)
    padded = next(GradientSource(problem).per_example(ListLoader(pair, y, 2))).grads[0]
    alone = next(GradientSource(problem).per_example(ListLoader(data[short][0][None], y[:1], 1))).grads[0]
    assert alone.abs().max() > 1e-4
    torch.testing.assert_close(padded, alone, rtol=1e-9, atol=1e-12)


def test_check_train_selfcheck_rank_through_the_cli(work, capsys):
    code, out, err = run(capsys, "train", "-c", _cfg(work), "--set", "train.optimizer=lbfgs", "--json")
    assert code == 0, err
    trained = json.loads(out)
    assert trained["converged"] and trained["polished_parameters"] == ["classifier.weight", "classifier.bias"]
    code, out, err = run(capsys, "check", "-c", _cfg(work))
    assert code == 0, err
    assert "parameters: 99 selected of" in out  # classifier: 3 x 32 + 3
    recalls = {}
    for solver in ("ekfac", "arnoldi"):
        out_dir = work / f"r_{solver}"
        code, out, err = run(capsys, "selfcheck", "-c", _cfg(work), "--set", f"solver.name={solver}", "--out",
                             str(out_dir), "--json")
        assert code == 0, err
        table = pd.read_csv(out_dir / "selfcheck.csv", keep_default_na=False)
        assert list(table.columns[-2:]) == ["text", "true_label"]  # the whole text, then the carried column
        top = table.head(N // 10)
        recalls[solver] = (top.label != top.true_label).sum() / (table.label != table.true_label).sum()
        summary = json.loads(out)
        if solver == "ekfac":
            assert summary["exact_check"]["self_influence_spearman_vs_direct"] > 0.9  # EK-FAC: approximate for CE
    assert min(recalls.values()) >= 0.8, (recalls, trained["train_accuracy"])
    code, out, err = run(capsys, "rank", "-c", _cfg(work), "--set", "solver.name=ekfac", "--test-ids", "s0,s1",
                         "--out", str(work / "rank"))
    assert code == 0, err
    assert len(pd.read_csv(work / "rank" / "overall.csv")) == N
    code, out, err = run(capsys, "rank", "-c", _cfg(work), "--knn", "20", "--knn-metric", "cosine", "--test-ids", "s0",
                         "--out", str(work / "knn"), "--json")  # FastIF on the pooled representation
    assert code == 0, err
    assert len(pd.read_csv(work / "knn" / "helpful.csv")) > 0


def test_last_blocks_through_the_cli(work, capsys):
    code, out, err = run(capsys, "selfcheck", "-c", _cfg(work), "--set", "params={last_blocks: 1}", "--set",
                         "solver.name=arnoldi", "--set", "solver.arnoldi.rank=20", "--out", str(work / "b1"), "--json")
    assert code == 0, err
    assert json.loads(out)["n"] == N
    code, out, err = run(capsys, "selfcheck", "-c", _cfg(work), "--set", "params={last_blocks: 1, linear_only: true}",
                         "--set", "solver.name=ekfac", "--out", str(work / "b1e"), "--json")
    assert code == 0, err
    layers = {layer["module"]: layer for layer in json.loads(out)["solver_details"]["layers"]}
    query = layers["bert.encoder.layer.1.attention.self.query"]
    real_tokens = int(Run.open(load_config(_cfg(work)), "check").train.dataset.lengths.sum())
    assert query["positions_per_row"] == real_tokens // N  # padded tokens are not counted
    assert layers["classifier"]["positions_per_row"] == 1
    code, _, err = run(capsys, "selfcheck", "-c", _cfg(work), "--set", "params={last_blocks: 1}", "--set",
                       "solver.name=ekfac", "--out", str(work / "b1x"))
    assert code == 2 and "LayerNorm" in err


def test_adam_fine_tunes_the_selected_parameters(work, capsys, tmp_path):
    before = hf.load_model(work / "model").state_dict()
    code, out, err = run(capsys, "train", "-c", _cfg(work), "--set", "params={last_blocks: 1}", "--set",
                         f"model.checkpoint={tmp_path / 'ft.pt'}", "--set", "train.epochs=1", "--set", "train.lr=1e-3",
                         "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["optimizer"] == "adam" and summary["steps"] == 5 and summary["polished"]
    after = torch.load(tmp_path / "ft.pt", weights_only=True)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "bert.encoder.layer.1.output.dense.weight" in changed and "classifier.weight" in changed
    assert not any(k.startswith(("bert.embeddings", "bert.encoder.layer.0.")) for k in changed)


def test_sentence_pairs_carry_token_types(work, tmp_path):
    frame = pd.read_csv(work / "train.csv").head(20)
    frame.assign(second=frame.text.str.split().str[::-1].str.join(" ")).to_csv(tmp_path / "pairs.csv", index=False)
    cfg = load_config(_cfg(work), [f"data.train.path={tmp_path / 'pairs.csv'}", "data.train.text=[text, second]",
                                   "data.test=null", "model.checkpoint=null"])
    run_ = Run.open(cfg, "selfcheck")
    x = run_.train.dataset[0][0]
    words = len(frame.text[0].split())
    assert x.shape == (3, 2 * words + 3)  # [CLS] a [SEP] b [SEP]: ids, mask, token types
    assert x[2].tolist() == [0] * (words + 2) + [1] * (words + 1)
    assert run_.train.extra.columns[:2].tolist() == ["text", "second"]
