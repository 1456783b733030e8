"""Shared test fixtures: everything is built locally, nothing is downloaded."""

import pytest


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A byte-level BPE tokenizer trained here on a few sentences, Llama-style: adds <s> on encode, </s> is EOS,
    <pad> pads, and <|im_start|>/<|im_end|> are special tokens (ChatML). Saved and reloaded like a real one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    specials = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    sentences = ["The quick brown fox jumps over the lazy dog.", "Hello, how are you today? I am fine, thanks!",
                 "Write a short poem about the sea and the sky.", "What is two plus two? Two plus two is four."]
    tok.train_from_iterator(sentences * 10, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    wrapped.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)
