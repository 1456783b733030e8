"""Data: read files into rows, convert formats to messages, render chat templates, tokenize with loss masks,
pack and collate. See each module's docstring; the end-of-turn rule is in templates.py."""

from .batch import Packed, collate, collate_padding_free, pack_examples, pack_stream
from .formats import Message, PreferencePair, PromptRow, UnpairedRow, to_messages, to_preference, to_prompt, to_unpaired
from .readers import Row, Rows, load_rows, read_rows
from .split import RunRows, run_rows, split_eval
from .templates import choose_template, prepare_tokenizer, render, resolve_template, stop_token_ids
from .tokenize import IGNORE, Example, build_sft_examples, encode, num_loss_tokens, preview, tokenize_example

__all__ = [
    "IGNORE", "Example", "Message", "Packed", "PreferencePair", "PromptRow", "Row", "Rows",
    "build_sft_examples", "choose_template", "collate", "collate_padding_free", "encode", "load_rows", "num_loss_tokens",
    "pack_examples", "pack_stream",
    "prepare_tokenizer", "preview", "read_rows", "render", "resolve_template", "RunRows", "run_rows", "split_eval",
    "stop_token_ids", "to_messages",
    "to_preference", "to_prompt", "to_unpaired", "tokenize_example", "UnpairedRow",
]
