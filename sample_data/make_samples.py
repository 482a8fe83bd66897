"""Regenerate the sample datasets shipped in ``sample_data/``.

Run from the repository root (scikit-learn is needed only by this script)::

    python sample_data/make_samples.py

Everything is deterministic (fixed seeds), so re-running reproduces the
same bytes. The script writes, next to itself:

* ``digits/``          8x8 UCI digits as CSV (features / 16 -> [0, 1]),
                       ``train.csv``, ``test.csv``, ``answer_key.csv``
* ``breast_cancer/``   Wisconsin diagnostic breast cancer as CSV (z-scored with
                       train statistics), plus ``features.txt``
* ``wine/``            UCI wine as CSV (z-scored with train statistics), plus
                       ``features.txt``
* ``digits_images/``   the same digits split as 8x8 grayscale PNGs in
                       ``train/<label>/<id>.png`` and ``test/<label>/<id>.png``
* ``digits_tensors/``  the same digits split as ``train.npz`` / ``test.npz``
                       (keys ``x`` float32 n x 1 x 8 x 8, ``y`` int64, ``ids``)

Recipe (identical for every dataset): stratified 80/20 train/test split
(``train_test_split(..., test_size=0.2, stratify=y, random_state=SPLIT_SEED)``),
then exactly round(10% of n_train) TRAIN labels are flipped to a different
class chosen uniformly among the other classes. Test labels are never flipped.
Each ``answer_key.csv`` lists every train row with
``id,given_label,true_label,flipped`` (flipped is 0/1).

The sources are scikit-learn's bundled copies (``load_digits``,
``load_breast_cancer``, ``load_wine``); nothing is downloaded. After writing,
the script runs a sanity check and prints a short summary.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.datasets import load_breast_cancer, load_digits, load_wine
from sklearn.model_selection import train_test_split

OUT = Path(__file__).resolve().parent
SPLIT_SEED = 0          # train/test split (all datasets)
FLIP_SEED = 1           # which train rows get flipped, and to what
SOURCE_SEED = 2         # fake annotator column (digits only)
FLIP_FRACTION = 0.10
TEST_SIZE = 0.20
FLOAT_FMT = "%.6g"
ANNOTATORS = np.array(["annotator_a", "annotator_b", "annotator_c", "annotator_d"])

# Per-dataset offset so datasets do not share random streams.
DATASET_OFFSET = {"digits": 0, "breast_cancer": 100, "wine": 200}
ID_PREFIX = {"digits": "d", "breast_cancer": "b", "wine": "w"}


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def make_ids(prefix: str, n: int) -> np.ndarray:
    """Stable ids from the row's position in the sklearn array (1-based)."""
    return np.array([f"{prefix}{i + 1:04d}" for i in range(n)])


def split_and_flip(name: str, y: np.ndarray):
    """Return sorted train/test index arrays and the given (flipped) train labels."""
    idx = np.arange(len(y))
    tr, te = train_test_split(
        idx, test_size=TEST_SIZE, stratify=y, random_state=SPLIT_SEED
    )
    tr, te = np.sort(tr), np.sort(te)
    classes = np.unique(y)
    rng = np.random.default_rng(FLIP_SEED + DATASET_OFFSET[name])
    n_flip = int(np.floor(FLIP_FRACTION * len(tr) + 0.5))  # round half up
    flip_pos = np.sort(rng.choice(len(tr), size=n_flip, replace=False))
    y_true = y[tr].copy()
    y_given = y_true.copy()
    for p in flip_pos:
        others = classes[classes != y_true[p]]
        y_given[p] = rng.choice(others)
    flipped = np.zeros(len(tr), dtype=np.int64)
    flipped[flip_pos] = 1
    return tr, te, y_given, y_true, flipped


def write_csv(df: pd.DataFrame, path: Path) -> None:
    df.to_csv(path, index=False, float_format=FLOAT_FMT, lineterminator="\n")


def answer_key(ids, y_given, y_true, flipped) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": ids,
            "given_label": y_given.astype(np.int64),
            "true_label": y_true.astype(np.int64),
            "flipped": flipped.astype(np.int64),
        }
    )


def fresh_dir(name: str) -> Path:
    d = OUT / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    return d


# --------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------
def make_digits():
    bunch = load_digits()
    raw = bunch.data.astype(np.int64)  # n x 64, integers 0..16
    y = bunch.target.astype(np.int64)
    ids = make_ids(ID_PREFIX["digits"], len(y))
    tr, te, y_given, y_true, flipped = split_and_flip("digits", y)

    rng = np.random.default_rng(SOURCE_SEED + DATASET_OFFSET["digits"])
    source = ANNOTATORS[rng.integers(0, len(ANNOTATORS), size=len(y))]

    x01 = raw / 16.0
    cols = [f"p{j}" for j in range(64)]

    def frame(rows, labels):
        df = pd.DataFrame(x01[rows], columns=cols)
        df.insert(0, "source", source[rows])
        df.insert(0, "label", labels)
        df.insert(0, "id", ids[rows])
        return df

    # (1) CSV
    d = fresh_dir("digits")
    write_csv(frame(tr, y_given), d / "train.csv")
    write_csv(frame(te, y[te]), d / "test.csv")
    write_csv(answer_key(ids[tr], y_given, y_true, flipped), d / "answer_key.csv")

    # (4) PNG images, class folder = given label
    d = fresh_dir("digits_images")
    pix = np.floor(raw * 255.0 / 16.0 + 0.5).astype(np.uint8)  # round half up
    rel_ids = []
    for split, rows, labels in (("train", tr, y_given), ("test", te, y[te])):
        for r, lab in zip(rows, labels):
            rel = f"{lab}/{ids[r]}.png"
            p = d / split / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pix[r].reshape(8, 8), mode="L").save(p, optimize=True)
            if split == "train":
                rel_ids.append(rel)
    write_csv(
        answer_key(np.array(rel_ids), y_given, y_true, flipped), d / "answer_key.csv"
    )

    # (5) tensors
    d = fresh_dir("digits_tensors")
    for split, rows, labels in (("train", tr, y_given), ("test", te, y[te])):
        np.savez_compressed(
            d / f"{split}.npz",
            x=x01[rows].reshape(-1, 1, 8, 8).astype(np.float32),
            y=np.asarray(labels, dtype=np.int64),
            ids=ids[rows].astype("<U5"),
        )
    write_csv(answer_key(ids[tr], y_given, y_true, flipped), d / "answer_key.csv")


def make_tabular(name: str, loader):
    bunch = loader()
    x = bunch.data.astype(np.float64)
    y = bunch.target.astype(np.int64)
    ids = make_ids(ID_PREFIX[name], len(y))
    tr, te, y_given, y_true, flipped = split_and_flip(name, y)

    mean = x[tr].mean(axis=0)
    std = x[tr].std(axis=0)  # population std (ddof=0)
    std[std == 0] = 1.0
    z = (x - mean) / std
    cols = [f"f{j}" for j in range(x.shape[1])]

    def frame(rows, labels):
        df = pd.DataFrame(z[rows], columns=cols)
        df.insert(0, "label", labels)
        df.insert(0, "id", ids[rows])
        return df

    d = fresh_dir(name)
    write_csv(frame(tr, y_given), d / "train.csv")
    write_csv(frame(te, y[te]), d / "test.csv")
    write_csv(answer_key(ids[tr], y_given, y_true, flipped), d / "answer_key.csv")

    lines = ["# column\toriginal_name\ttrain_mean\ttrain_std"]
    lines += [
        f"{c}\t{n}\t{m:.10g}\t{s:.10g}"
        for c, n, m, s in zip(cols, bunch.feature_names, mean, std)
    ]
    lines.append(
        "# labels: "
        + ", ".join(f"{i}={t}" for i, t in enumerate(bunch.target_names))
    )
    (d / "features.txt").write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------
# sanity check
# --------------------------------------------------------------------------
def check():
    expected = {"digits": (1797, 10), "breast_cancer": (569, 2), "wine": (178, 3)}
    for name, (n_total, n_cls) in expected.items():
        d = OUT / name
        tr = pd.read_csv(d / "train.csv")
        te = pd.read_csv(d / "test.csv")
        ak = pd.read_csv(d / "answer_key.csv")
        assert len(tr) + len(te) == n_total, name
        assert len(te) == int(np.ceil(TEST_SIZE * n_total)), name
        ids = pd.concat([tr["id"], te["id"]])
        assert ids.is_unique, name
        assert list(ak["id"]) == list(tr["id"]), name
        assert (ak["given_label"].values == tr["label"].values).all(), name
        n_flip = int(ak["flipped"].sum())
        assert n_flip == int(np.floor(FLIP_FRACTION * len(tr) + 0.5)), name
        f = ak["flipped"] == 1
        assert (ak.loc[f, "given_label"] != ak.loc[f, "true_label"]).all(), name
        assert (ak.loc[~f, "given_label"] == ak.loc[~f, "true_label"]).all(), name
        assert set(tr["label"]) <= set(range(n_cls)), name
        assert set(te["label"]) == set(range(n_cls)), name
        feats = tr.drop(columns=["id", "label", "source"], errors="ignore")
        assert not feats.isna().any().any(), name
        if name == "digits":
            assert feats.shape[1] == 64 and feats.values.min() >= 0 and feats.values.max() <= 1
        else:
            assert np.allclose(feats.values.mean(0), 0, atol=1e-4), name
            assert np.allclose(feats.values.std(0), 1, atol=1e-3), name
        print(f"{name:14s} train={len(tr):5d} test={len(te):4d} flipped={n_flip:4d} "
              f"({n_flip / len(tr):.2%})")

    # digits variants agree with the CSV
    tr = pd.read_csv(OUT / "digits" / "train.csv")
    te = pd.read_csv(OUT / "digits" / "test.csv")
    ak_csv = pd.read_csv(OUT / "digits" / "answer_key.csv")
    ak_img = pd.read_csv(OUT / "digits_images" / "answer_key.csv")
    ak_npz = pd.read_csv(OUT / "digits_tensors" / "answer_key.csv")
    assert ak_npz.equals(ak_csv)
    assert (ak_img.drop(columns="id").values == ak_csv.drop(columns="id").values).all()
    pcols = [f"p{j}" for j in range(64)]
    for split, df in (("train", tr), ("test", te)):
        root = OUT / "digits_images" / split
        files = sorted(root.glob("*/*.png"))
        assert len(files) == len(df), split
        for row in df.itertuples(index=False):
            p = root / str(row.label) / f"{row.id}.png"
            im = Image.open(p)
            assert im.mode == "L" and im.size == (8, 8), p
            arr = np.asarray(im, dtype=np.float64)
            want = np.floor(np.asarray([getattr(row, c) for c in pcols]) * 255 + 0.5)
            assert (arr.ravel() == want).all(), p
        z = np.load(OUT / "digits_tensors" / f"{split}.npz")
        assert z["x"].dtype == np.float32 and z["x"].shape == (len(df), 1, 8, 8)
        assert z["y"].dtype == np.int64 and z["ids"].dtype.kind == "U"
        assert list(z["ids"]) == list(df["id"])
        assert (z["y"] == df["label"].values).all()
        assert np.allclose(z["x"].reshape(len(df), 64), df[pcols].values, atol=1e-7)
    assert list(ak_img["id"]) == [f"{l}/{i}.png" for l, i in zip(tr["label"], tr["id"])]
    print("digits_images / digits_tensors consistent with digits CSV")

    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"total size of sample_data: {total / 1e6:.2f} MB")


def main():
    make_digits()
    make_tabular("breast_cancer", load_breast_cancer)
    make_tabular("wine", load_wine)
    check()


if __name__ == "__main__":
    main()
