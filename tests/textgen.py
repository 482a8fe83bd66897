"""Offline text fixtures: a templated corpus with known label flips, and a tiny BERT folder built from a config
with a WordPiece tokenizer trained on the corpus (no download). Used by tests/test_text*.py and
benchmarks/text_label_errors.py. Needs transformers and tokenizers (the [hf] extra)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

CLASSES = {
    "sports": ["goal", "match", "coach", "team", "league", "score", "striker", "season"],
    "food": ["recipe", "dinner", "spicy", "bread", "chef", "flavor", "soup", "bake"],
    "tech": ["laptop", "software", "chip", "battery", "update", "screen", "server", "app"],
}
FILLER = ["the", "a", "today", "really", "about", "new", "my", "this", "was", "and", "very", "with", "of", "we",
          "they", "love", "saw", "read", "talk", "week", "city", "friend", "old", "big", "quite"]
TEMPLATES = ["{f0} {k0} {f1} {f2} {k1}", "{f0} {f1} {k0} {f2} {f3} {k1} {f4}", "{k0} {f0} {f1} {k1}",
             "{f0} {f1} {f2} {k0} {d} {f3} {k1} {f4} {f5}", "{f0} {k0} {f1} {d} {f2} {f3}"]


def corpus(n: int, flip: float = 0.1, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """(frame with id, text, label, true_label; the flipped row numbers). Each sentence has two keywords of
    its class, filler words, and in some templates one distractor keyword of another class."""
    rng = np.random.default_rng(seed)
    names = list(CLASSES)
    true = rng.integers(0, len(names), n)
    texts = []
    for c in true:
        others = [k for j, ws in enumerate(CLASSES.values()) if j != c for k in ws]
        words = {f"f{i}": FILLER[rng.integers(len(FILLER))] for i in range(6)}
        keys = rng.choice(CLASSES[names[c]], 2, replace=False)
        words.update(k0=keys[0], k1=keys[1], d=others[rng.integers(len(others))])
        texts.append(TEMPLATES[rng.integers(len(TEMPLATES))].format(**words))
    flipped = np.sort(rng.choice(n, int(round(flip * n)), replace=False))
    given = true.copy()
    given[flipped] = (true[flipped] + rng.integers(1, len(names), len(flipped))) % len(names)
    frame = pd.DataFrame({"id": [f"s{i}" for i in range(n)], "text": texts,
                          "label": [names[c] for c in given], "true_label": [names[c] for c in true]})
    return frame, flipped


def tiny_bert(folder: Path, texts: list[str], num_labels: int = 3, hidden: int = 32, layers: int = 2,
              seed: int = 0) -> Path:
    """A BertForSequenceClassification (random weights from `seed`) and a WordPiece tokenizer whose vocabulary
    is `texts`' words, saved with save_pretrained (safetensors) into `folder`."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    # the vocabulary: the corpus's words and their characters (as word starts and ## pieces), in a fixed order
    # (WordPieceTrainer breaks frequency ties differently from run to run, and so would the model)
    normalizer, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(t))})
    chars = sorted({c for w in words for c in w})
    vocab = specials + words + [c for c in chars if c not in words] + [f"##{c}" for c in chars]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    fast = BertTokenizerFast(tokenizer_object=tok, model_max_length=64)
    config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=64,
                        num_labels=num_labels, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForSequenceClassification(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    fast.save_pretrained(str(folder))
    return folder


def write_config(path: Path, model_dir: Path, train_csv: Path, *, params: str = "last_layer",
                 solver: str = "ekfac", extra: str = "") -> Path:
    path.write_text(f"""model:
  arch: hf
  path: {model_dir}
  checkpoint: {path.parent / 'finetuned.pt'}
params: {params}
batch_size: 64
weight_decay: 0.01
solver: {{name: {solver}, damping: 0.001}}
train: {{optimizer: adam, lr: 0.003, epochs: 4}}
data:
  train: {{format: csv, path: {train_csv}, text: text, label: label, id: id, carry: [true_label]}}
  test: {{format: csv, path: {train_csv}, text: text, label: label, id: id, carry: [true_label]}}
output: {{dir: {path.parent / 'reports'}}}
{extra}""")
    return path


def fine_tune(folder: Path, texts: list[str], labels: list[int], epochs: int = 6, lr: float = 1e-3,
              batch_size: int = 16, seed: int = 0) -> Path:
    """Fine-tune every weight of the folder's model on (texts, labels) with AdamW, with the library's own
    tokenizer and padding (not infl's), and save it back: "a classifier fine-tuned elsewhere"."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(str(folder), local_files_only=True)
    y = torch.as_tensor(labels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(texts))
            for s in range(0, len(texts), batch_size):
                rows = order[s : s + batch_size].tolist()
                enc = tok([texts[i] for i in rows], padding=True, return_tensors="pt")
                loss = torch.nn.functional.cross_entropy(model(**enc).logits, y[rows])
                opt.zero_grad()
                loss.backward()
                opt.step()
    model.eval()
    model.save_pretrained(str(folder))
    return folder
