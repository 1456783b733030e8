"""From scratch: train a byte-level BPE tokenizer on the run's text and build a model from an architecture.

The tokenizer is lossless (byte-level: every string encodes, and decode(encode(text)) == text, unicode included)
and carries the special tokens every method and template needs: <pad>, <s> (BOS / CLS), </s> (EOS / SEP), <mask>
and the ChatML turn markers, with a ChatML chat template. It is saved in `output_dir/tokenizer` with a stamp of
what it was trained from (recipe, vocab size, architecture, a digest of the data files), so a resumed or repeated
run reuses it, and a run whose data or settings changed trains a new one instead of silently reusing a stale one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

from tunelab.config import Config, InitConfig, UserError
from tunelab.data.templates import JINJA

BOS, EOS, PAD, MASK = "<s>", "</s>", "<pad>", "<mask>"
# The chat turn markers go in as special tokens so the templates' markers are single, unsplittable ids.
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
SPECIAL_TOKENS = [PAD, BOS, EOS, MASK, *CHAT_TOKENS]  # ids 0..5 in this order
RECIPE = 1  # bump when the way tokenizers are trained changes: cached ones are then retrained
STAMP = "tunelab-tokenizer.json"


def _texts(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _texts(v)
    elif isinstance(value, list):
        for v in value:
            yield from _texts(v)


def _train_sources(cfg: Config, text_only: bool):
    if text_only:
        from tunelab.data.readers import text_sources

        return text_sources(cfg.data.train, cfg.method, "data.train")
    return cfg.data.train


def training_text(cfg: Config, text_only: bool = False) -> Iterator[str]:
    """Every string in the training rows, whatever their format (eval data is left out)."""
    from tunelab.data import load_rows

    for row in load_rows(_train_sources(cfg, text_only), skip_bad_rows=cfg.data.skip_bad_rows):
        yield from _texts(row.data)


def _files(pattern: str) -> list[Path]:
    import glob

    paths = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    out = []
    for path in map(Path, paths):
        out += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return out


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError:
        return "missing"  # load_rows reports the missing file with its own message
    return h.hexdigest()


def _stamp(cfg: Config) -> dict:
    """What a trained tokenizer depends on. Files are hashed by content, so copying or touching them is harmless."""
    files = [[str(p), _digest(p)] for s in cfg.data.train for p in _files(s.path)]
    return {
        "recipe": RECIPE,
        "vocab_size": cfg.tokenizer.vocab_size,
        "architecture": cfg.model.init.architecture if cfg.model.init else "llama",
        "max_position": cfg.model.init.max_position if cfg.model.init else None,
        "sources": [s.model_dump() for s in cfg.data.train],
        "skip_bad_rows": cfg.data.skip_bad_rows,
        "files": files,
    }


def _read_stamp(saved: Path) -> dict | None:
    try:
        return json.loads((saved / STAMP).read_text())
    except (OSError, ValueError):
        return None


def train_tokenizer(cfg: Config, text_only: bool = False):
    """Train (or reuse, on resume) a byte-level BPE tokenizer of `tokenizer.vocab_size` on the training text
    (`text_only`: the objective reads its sources as raw text, Objective.text_only).

    Saved in `output_dir/tokenizer` (and with the final model). Under torchrun the trainer runs this on rank 0
    first (Dist.main_first); the other ranks then find the saved one and load it. The vocabulary can come out
    smaller than vocab_size on a small corpus (no pair is left to merge); the model is sized to the actual one.
    """
    from transformers import AutoTokenizer

    if not cfg.tokenizer.train:
        raise UserError("model.init builds a model without a tokenizer: set tokenizer.train: true "
                        "(train one on the data) or tokenizer.path (use an existing one)")
    saved = cfg.run_dir / "tokenizer"
    stamp = _stamp(cfg)
    if not (_read_stamp(saved) == stamp and (saved / "tokenizer.json").is_file()):
        _save_atomically(_train(cfg, text_only), stamp, saved)
    return AutoTokenizer.from_pretrained(str(saved))  # our own files, pad token included: nothing to check


def _train(cfg: Config, text_only: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # No normalizer: byte-level BPE is lossless only if the text reaches it untouched.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.tokenizer.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text encodes
        show_progress=False,
    )
    tok.train_from_iterator(training_text(cfg, text_only), trainer=trainer)
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    encoder = cfg.model.init is not None and cfg.model.init.architecture == "bert"
    if encoder:  # BERT layout: <s> A </s> (CLS ... SEP), segment B with token type 1
        template = processors.TemplateProcessing(
            single=f"{BOS} $A {EOS}", pair=f"{BOS} $A {EOS} $B:1 {EOS}:1", special_tokens=[(BOS, bos), (EOS, eos)])
    else:  # Llama layout: BOS first; EOS ends documents and replies, written by the data pipeline
        template = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos)])
    tok.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), template])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, mask_token=MASK,
        cls_token=BOS if encoder else None, sep_token=EOS if encoder else None,
        additional_special_tokens=CHAT_TOKENS, clean_up_tokenization_spaces=False,
    )
    fast.chat_template = JINJA["chatml"]
    return fast


def _save_atomically(tokenizer, stamp: dict, saved: Path) -> None:
    tmp = saved.with_name(f".{saved.name}-tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / STAMP).write_text(json.dumps(stamp, indent=1))
    try:
        if saved.exists():
            shutil.rmtree(saved)
        os.replace(tmp, saved)
    except OSError:  # another process (a rank not started through Dist.main_first) saved it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
        if _read_stamp(saved) != stamp:
            raise


def build_model(init: InitConfig, tokenizer, kind: str = "causal_lm"):
    """A freshly initialised model of the given shape, sized to the tokenizer's vocabulary.

    llama builds a causal LM (or a scalar-head classifier for reward models); bert builds a masked LM (or a
    classifier) whose pad / CLS / SEP ids are the tokenizer's.
    """
    if tokenizer is None:
        raise UserError("model.init needs a tokenizer (tokenizer.train: true or tokenizer.path)")
    vocab = len(tokenizer)
    if init.architecture == "llama":
        if kind not in ("causal_lm", "sequence_classification"):
            raise UserError(f"model.init.architecture: llama cannot build a {kind} model; use bert for mlm")
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig

        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=init.hidden_size,
            num_hidden_layers=init.layers,
            num_attention_heads=init.heads,
            num_key_value_heads=init.kv_heads or init.heads,
            intermediate_size=init.intermediate_size or _swiglu_width(init.hidden_size),
            max_position_embeddings=init.max_position,
            tie_word_embeddings=init.tie_embeddings,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            num_labels=1,
        )
        cls = AutoModelForCausalLM if kind == "causal_lm" else AutoModelForSequenceClassification
        return cls.from_config(config)
    if kind not in ("masked_lm", "sequence_classification"):
        raise UserError(f"model.init.architecture: bert is an encoder and cannot build a {kind} model; "
                        "use llama for pretrain / sft / distill")
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, BertConfig

    cls_id = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    sep_id = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=init.hidden_size,
        num_hidden_layers=init.layers,
        num_attention_heads=init.heads,
        intermediate_size=init.intermediate_size or 4 * init.hidden_size,
        max_position_embeddings=init.max_position,
        tie_word_embeddings=init.tie_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=cls_id,
        eos_token_id=sep_id,
        num_labels=1,
    )
    cls = AutoModelForMaskedLM if kind == "masked_lm" else AutoModelForSequenceClassification
    return cls.from_config(config)


def _swiglu_width(hidden: int) -> int:
    """Llama's MLP width: 2/3 of 4·hidden, rounded up to a multiple of 64."""
    width = int(8 * hidden / 3)
    return (width + 63) // 64 * 64


def save_tiny_model(out: Path, tokenizer, init: InitConfig, kind: str | None = None) -> Path:
    """Build and save a model + tokenizer dir (used by tests and the demo to make a local base model)."""
    kind = kind or ("masked_lm" if init.architecture == "bert" else "causal_lm")
    model = build_model(init, tokenizer, kind)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
