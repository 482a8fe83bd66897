"""A local Hugging Face sequence classifier (`model.arch: hf`, `model.path: DIR`), loaded offline.

`transformers` is an optional extra (`pip install -e '.[hf]'`), imported only here and only when a config
uses it. Loading never reaches a hub: `local_files_only=True` with HF_HUB_OFFLINE=1 set for the call;
weights come from safetensors only (`use_safetensors=True`, never a pickle); a fine-tuned `model.checkpoint`
goes through models.load_checkpoint (weights_only=True).

The batch input is one integer tensor x (B, C, L) (text.py packs it): channel 0 the token ids, 1 the
attention mask, 2 the token type ids when the tokenizer makes them. The loaded model's `forward(x)` unpacks
it and returns the logits (B, num_labels), so gradients.py (vmap over grad), EK-FAC and kNN see an ordinary
nn.Module. The attention mask goes in as a 4-D additive mask built here, which transformers passes through
unchanged: its own mask builder branches on the mask's values (`mask.all()`), which vmap cannot batch.
Attention runs `eager` for the same reason. `position_mask(x)` tells EK-FAC which positions are real tokens.
Parameter names are the folder's own (bert.encoder.layer.11...., classifier.weight).
"""

from __future__ import annotations

import os
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ConfigError, DataError

EXTRA_HINT = "install the extra: pip install -e '.[hf]' (transformers, tokenizers, safetensors)"
MAX_TOKENS = 512  # default max_length cap when neither the tokenizer nor the config gives a smaller one


def transformers() -> Any:
    """The transformers module, or ConfigError (exit 2) naming the extra."""
    try:
        import transformers as tf
    except ImportError as e:
        raise ConfigError(f"model.arch: hf needs the transformers package, which is not installed ({e})",
                          hint=EXTRA_HINT) from None
    major = str(getattr(tf, "__version__", "0")).split(".")[0]
    if not major.isdigit() or int(major) < 5:
        raise ConfigError(f"model.arch: hf needs transformers >= 5 (found {getattr(tf, '__version__', '?')}): "
                          "infl passes the attention mask in 4-D (its mask builder branches on the values, which vmap "
                          "cannot batch), which earlier versions do not take",
                          hint=EXTRA_HINT)
    return tf


@contextmanager
def offline() -> Iterator[Any]:
    """transformers with the hub switched off and its logging and progress bars quiet, restored after."""
    tf = transformers()
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    logging = tf.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield tf
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def folder(path: Path | None, key: str = "model.path") -> Path:
    """The save_pretrained folder, checked: it exists, has config.json and (for the model) safetensors."""
    if path is None or not Path(path).is_dir():
        raise ConfigError(f"{key}: folder not found: {path}",
                          hint="set model.path to a local save_pretrained folder (nothing is downloaded)")
    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"{key}: {path} has no config.json; it is not a save_pretrained folder",
                          hint="save the model with model.save_pretrained(DIR) and the tokenizer with "
                               "tokenizer.save_pretrained(DIR)")
    return Path(path)


def load_tokenizer(path: Path | None) -> Any:
    transformers()  # the missing extra first: it is the fix the user needs before any other
    where = folder(path)
    with offline() as tf:
        try:
            return tf.AutoTokenizer.from_pretrained(str(where), local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"model.path: no usable tokenizer in {where} ({type(e).__name__}: {_first_line(e)})",
                              hint="save it there with tokenizer.save_pretrained(DIR)") from e


def max_positions(path: Path | None, tokenizer: Any) -> int:
    """The default max_length: the tokenizer's limit, the model's position embeddings and MAX_TOKENS, the least."""
    with offline() as tf:
        config = tf.AutoConfig.from_pretrained(str(folder(path)), local_files_only=True)
    limits = [MAX_TOKENS, getattr(tokenizer, "model_max_length", MAX_TOKENS),
              getattr(config, "max_position_embeddings", MAX_TOKENS)]
    return int(min(v for v in limits if isinstance(v, int) and v > 0))


def load_model(path: Path | None) -> nn.Module:
    """AutoModelForSequenceClassification from the folder (safetensors, offline, eager attention), with
    forward(x) over the packed batch and position_mask(x)."""
    transformers()
    where = folder(path)
    if not any(where.glob("*.safetensors")):
        pickles = [p.name for p in where.glob("*.bin")]
        raise ConfigError(f"model.path: {where} has no .safetensors weights"
                          + (f" (only {', '.join(pickles)}, a pickle, which infl never loads)" if pickles else ""),
                          hint="resave with model.save_pretrained(DIR, safe_serialization=True)")
    with offline() as tf:
        try:
            model = tf.AutoModelForSequenceClassification.from_pretrained(
                str(where), local_files_only=True, use_safetensors=True, attn_implementation="eager")
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
            raise DataError(f"model.path: cannot load a sequence classifier from {where} ({type(e).__name__}: "
                            f"{_first_line(e)})", hint="the folder must hold a model for sequence classification "
                                                      "(AutoModelForSequenceClassification)") from e
    model.forward = types.MethodType(_packed_forward, model)
    model.position_mask = types.MethodType(_position_mask, model)
    return model.eval()


def _packed_forward(self: nn.Module, x: Tensor) -> Tensor:
    """x (B, C, L) -> logits (B, num_labels). A float x (a caller cast it) holds whole numbers: rounded back."""
    if x.is_floating_point():
        x = x.round().long()
    dtype = self.get_input_embeddings().weight.dtype
    additive = (1.0 - x[:, 1].to(dtype))[:, None, None, :] * torch.finfo(dtype).min  # (B, 1, 1, L)
    kwargs = {"input_ids": x[:, 0], "attention_mask": additive}
    if x.shape[1] > 2:
        kwargs["token_type_ids"] = x[:, 2]
    return type(self).forward(self, **kwargs).logits


def _position_mask(_self: nn.Module, x: Tensor) -> Tensor:
    """(B, L) bool: the real tokens of the packed batch x (not padding)."""
    return x[:, 1] > 0.5


def is_hf(model: nn.Module) -> bool:
    return isinstance(getattr(model, "forward", None), types.MethodType) and \
        getattr(model.forward, "__func__", None) is _packed_forward


def blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, ModuleList) of the transformer blocks: the longest ModuleList whose items are all of one type
    (bert.encoder.layer, distilbert.transformer.layer, ...)."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise ConfigError("params.last_blocks: the model has no list of transformer blocks (an nn.ModuleList)",
                          hint="use params: last_layer or a list of parameter-name prefixes")
    return best


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else "no message"
