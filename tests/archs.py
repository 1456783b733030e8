"""Tiny random-weight models of many architectures, built from `transformers` config classes (nothing is downloaded),
each saved with a small local tokenizer that has no chat template (as a base model's often has none)."""

from __future__ import annotations

from pathlib import Path

# Small enough that a few optimizer steps take well under a second on a CPU, large enough that every architecture's
# features exist (grouped-query attention, a sliding window, soft-capping, several experts per token).
HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 32, 2, 4, 2, 64
DECODER_SHAPE = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                     num_key_value_heads=KV_HEADS, intermediate_size=FFN, max_position_embeddings=256)
MOE_SHAPE = dict(DECODER_SHAPE, num_experts_per_tok=2)
ENCODER_SHAPE = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
                     max_position_embeddings=256)

# family -> (transformers config class name, its keyword arguments beyond the vocabulary and special ids)
DECODERS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", DECODER_SHAPE),
    "mistral": ("MistralConfig", dict(DECODER_SHAPE, sliding_window=16)),
    "qwen2": ("Qwen2Config", DECODER_SHAPE),
    "qwen3": ("Qwen3Config", dict(DECODER_SHAPE, head_dim=8)),
    "gemma2": ("Gemma2Config", dict(DECODER_SHAPE, head_dim=8, sliding_window=16, final_logit_softcapping=30.0,
                                    attn_logit_softcapping=50.0)),
    "gemma3": ("Gemma3TextConfig", dict(DECODER_SHAPE, head_dim=8, sliding_window=16, final_logit_softcapping=30.0)),
    "phi3": ("Phi3Config", DECODER_SHAPE),
    "gpt2": ("GPT2Config", dict(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=256, n_inner=FFN)),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                       intermediate_size=FFN, max_position_embeddings=256)),
    "opt": ("OPTConfig", dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, ffn_dim=FFN,
                              word_embed_proj_dim=HIDDEN, max_position_embeddings=256)),
    "olmo2": ("Olmo2Config", DECODER_SHAPE),
    "mixtral": ("MixtralConfig", dict(MOE_SHAPE, num_local_experts=4)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(MOE_SHAPE, num_experts=4, moe_intermediate_size=FFN,
                                         shared_expert_intermediate_size=FFN, decoder_sparse_step=1)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(MOE_SHAPE, head_dim=8, num_experts=4, moe_intermediate_size=FFN,
                                         decoder_sparse_step=1)),
    "olmoe": ("OlmoeConfig", dict(MOE_SHAPE, num_experts=4)),
}
MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
ENCODERS: dict[str, tuple[str, dict]] = {
    "bert": ("BertConfig", ENCODER_SHAPE),
    "roberta": ("RobertaConfig", ENCODER_SHAPE),
    "modernbert": ("ModernBertConfig", dict(ENCODER_SHAPE, global_attn_every_n_layers=2, local_attention=16)),
}
SPECIALS = ["<pad>", "<s>", "</s>", "<mask>", "<unk>"]
# family -> (its transformers tokenizer class, SentencePiece's special pieces, its control pieces, whether a space is
# prepended, whether the control pieces eat the whitespace after them), laid out as the real Gemma 2 / Phi-3
# tokenizer.model and tokenizer.json are: llama.cpp's converter reads that file for them, and llama.cpp strips after
# every control token of a model it takes for Phi-3 (and requires its <|endoftext|>).
SENTENCEPIECE = {
    "gemma2": ("GemmaTokenizer", dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
                                      bos_piece="<bos>"), ["<mask>", "<start_of_turn>", "<end_of_turn>"], False, False),
    "phi3": ("LlamaTokenizer", dict(unk_id=0, bos_id=1, eos_id=2, pad_id=3, pad_piece="<|endoftext|>"),
             ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], True, True),
}


def tokenizer_for(texts: list[str], encoder: bool):
    """A byte-level BPE tokenizer trained on `texts`: Llama-style (BOS first, </s> ends documents) for decoders,
    BERT-style (<s> A </s> as CLS ... SEP, <mask>) for encoders. No chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    single = "<s> $A </s>" if encoder else "<s> $A"
    pair = "<s> $A </s> $B:1 </s>:1" if encoder else "<s> $A <s> $B"
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                       special_tokens=[("<s>", bos), ("</s>", eos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", mask_token="<mask>",
        unk_token="<unk>", cls_token="<s>" if encoder else None, sep_token="</s>" if encoder else None,
        clean_up_tokenization_spaces=False)


def sentencepiece_tokenizer(family: str, texts: list[str], out: Path):
    """A SentencePiece BPE model trained on `texts` (byte fallback, digits split, no normalization), written to
    out/tokenizer.model, and the `family`'s transformers tokenizer converted from that file, its control pieces
    marked special (as the real ones are). No chat template."""
    import io

    import sentencepiece
    import transformers
    from tokenizers import AddedToken

    class_name, ids, controls, space_prefix, rstrip = SENTENCEPIECE[family]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, model_type="bpe", vocab_size=300, character_coverage=1.0,
        byte_fallback=True, split_digits=True, add_dummy_prefix=space_prefix, remove_extra_whitespaces=False,
        normalization_rule_name="identity", user_defined_symbols=controls, minloglevel=2, **ids)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    # legacy: phi3 prepends a space after every control token too, as SentencePiece (and llama.cpp) do per piece of
    # text (Gemma prepends none)
    tokenizer = getattr(transformers, class_name).from_pretrained(out, legacy=True, pad_token=ids["pad_piece"])
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False, rstrip=rstrip) for t in controls],
                         special_tokens=True)
    return tokenizer


def build(family: str, out: Path, texts: list[str], kind: str | None = None, seed: int = 0,
          sentencepiece: bool = False, config: dict | None = None) -> Path:
    """Save a random-weight `family` model (causal LM for decoders, masked LM for encoders, or `kind`) with its
    tokenizer into `out`: byte-level BPE, or with `sentencepiece` (gemma2, phi3) a tokenizer.model and the
    transformers tokenizer converted from it. `config` overrides the family's config arguments."""
    import torch
    import transformers

    encoder = family in ENCODERS
    tokenizer = sentencepiece_tokenizer(family, texts, out) if sentencepiece else tokenizer_for(texts, encoder)
    class_name, shape = (ENCODERS if encoder else DECODERS)[family]
    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    if family == "modernbert":
        ids.update(cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id)
    config = getattr(transformers, class_name)(**{**shape, **(config or {})}, **ids)
    kind = kind or ("masked_lm" if encoder else "causal_lm")
    auto = {"causal_lm": transformers.AutoModelForCausalLM, "masked_lm": transformers.AutoModelForMaskedLM,
            "sequence_classification": transformers.AutoModelForSequenceClassification}[kind]
    torch.manual_seed(seed)
    model = auto.from_config(config)
    with torch.no_grad():  # a random model with std-0.02 weights gives near-uniform logits; widen them a little so
        for p in model.parameters():  # merge/reload comparisons see real differences
            if p.ndim >= 2:
                p.mul_(3.0)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
