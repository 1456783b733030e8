"""Run llama.cpp's own convert_hf_to_gguf.py (from llama-cpp-python's source distribution, with the gguf-py it
vendors), telling it the pre-tokenizer of a byte-level BPE tokenizer its table does not know.

The converter recognises a BPE pre-tokenizer by hashing the token ids of a probe text, so a tokenizer trained here
(tunelab.modeling.scratch) is never in its table even though its pre-tokenizer is GPT-2's plain ByteLevel split. The
converter has no option for this; its documented extension point is TextModel.get_vocab_base_pre (the table
itself). We wrap that method: the converter's own answer when it has one, else the name we were given (only when
export checked that the tokenizer's pre-tokenizer really is a plain ByteLevel one).

Usage: python -m tunelab.export.llama_convert LLAMA_DIR SCRIPT PRE_TOKENIZER|- CONVERTER_ARGS...
(SCRIPT: convert_hf_to_gguf.py, or convert_lora_to_gguf.py for an adapter alone)"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    llama_dir, script, pre, args = Path(argv[0]), argv[1], argv[2], argv[3:]
    sys.path[:0] = [str(llama_dir), str(llama_dir / "gguf-py")]  # the vendored gguf-py, never PyPI's
    if pre != "-":
        from conversion.base import TextModel

        known = TextModel.get_vocab_base_pre

        def vocab_base_pre(self, tokenizer) -> str:
            try:
                return known(self, tokenizer)
            except NotImplementedError:  # the hash is not in the table: use the pre-tokenizer export checked
                return pre

        TextModel.get_vocab_base_pre = vocab_base_pre
    sys.argv = [str(llama_dir / script), *args]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
