"""Regenerate this folder: a templated three-topic corpus with 10% of the training labels flipped
(true_label says which), and model/: a tiny BERT (hidden 32, 2 blocks, WordPiece trained on the corpus)
fine-tuned on the noisy labels with AdamW outside infl. Then `infl train -c configs/text_topics.yaml`
writes head.pt (the head polished by L-BFGS). Needs the [hf] extra.

    OMP_NUM_THREADS=1 .venv/bin/python sample_data/text_topics/make.py
"""

import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "tests"))
import textgen  # noqa: E402

frame, _ = textgen.corpus(2300, seed=7)
train, test = frame.iloc[:2000], frame.iloc[2000:].assign(label=lambda f: f.true_label)  # test labels are clean
train.to_csv(HERE / "train.csv", index=False)
test.to_csv(HERE / "test.csv", index=False)
shutil.rmtree(HERE / "model", ignore_errors=True)
folder = textgen.tiny_bert(HERE / "model", frame.text.tolist())
classes = sorted(set(train.label))
textgen.fine_tune(folder, train.text.tolist(), [classes.index(c) for c in train.label])
