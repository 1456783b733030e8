"""From scratch: train a byte-level BPE tokenizer on the run's text and build a model from an architecture."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from tunelab.config import Config, InitConfig, UserError

BOS, EOS, PAD, MASK = "<s>", "</s>", "<pad>", "<mask>"
# The chat turn markers go in as special tokens so the templates' markers are single, unsplittable ids.
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _texts(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _texts(v)
    elif isinstance(value, list):
        for v in value:
            yield from _texts(v)


def training_text(cfg: Config) -> Iterator[str]:
    """Every string in the training rows, whatever their format."""
    from tunelab.data import load_rows

    for row in load_rows(cfg.data.train, skip_bad_rows=cfg.data.skip_bad_rows):
        yield from _texts(row.data)


def train_tokenizer(cfg: Config):
    """Train (or reload, on resume) a byte-level BPE tokenizer of `tokenizer.vocab_size`, saved in the run dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    saved = cfg.run_dir / "tokenizer"
    if (saved / "tokenizer.json").is_file():
        from tunelab.model import load_tokenizer

        return load_tokenizer(str(saved))
    if not cfg.tokenizer.train:
        raise UserError("model.init builds a model without a tokenizer: set tokenizer.train: true "
                        "(train one on the data) or tokenizer.path (use an existing one)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.tokenizer.vocab_size,
        special_tokens=[PAD, BOS, EOS, MASK, *CHAT_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_text(cfg), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, mask_token=MASK,
        additional_special_tokens=CHAT_TOKENS,
    )
    fast.chat_template = CHATML_TEMPLATE
    saved.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(saved)
    return fast


def build_model(init: InitConfig, tokenizer, kind: str = "causal_lm"):
    """A freshly initialised model of the given shape, sized to the tokenizer's vocabulary."""
    if tokenizer is None:
        raise UserError("model.init needs a tokenizer (tokenizer.train: true or tokenizer.path)")
    vocab = len(tokenizer)
    if init.architecture == "llama":
        if kind != "causal_lm" and kind != "sequence_classification":
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
    from transformers import AutoModelForMaskedLM, BertConfig

    config = BertConfig(
        vocab_size=vocab,
        hidden_size=init.hidden_size,
        num_hidden_layers=init.layers,
        num_attention_heads=init.heads,
        intermediate_size=init.intermediate_size or 4 * init.hidden_size,
        max_position_embeddings=init.max_position,
        pad_token_id=tokenizer.pad_token_id,
    )
    return AutoModelForMaskedLM.from_config(config)


def _swiglu_width(hidden: int) -> int:
    """Llama's MLP width: 2/3 of 4·hidden, rounded up to a multiple of 64."""
    width = int(8 * hidden / 3)
    return (width + 63) // 64 * 64


def save_tiny_model(out: Path, tokenizer, init: InitConfig) -> Path:
    """Build and save a model + tokenizer dir (used by tests and the demo to make a local base model)."""
    from tunelab.model import quiet_imports

    quiet_imports()
    model = build_model(init, tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
