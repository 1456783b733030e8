"""torchtune pieces for the bench's custom Llama: a LoRA model builder of its size and a tokenizer adapter for a
tokenizer without a chat template (torchtune's HF wrapper needs one). Imported by torchtune.yaml's _component_s."""

from tokenizers import Tokenizer
from torchtune.models.llama2 import lora_llama2


def bench_lora_llama(lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, lora_rank, lora_alpha,
                     lora_dropout):  # the recipe reads the first three from the config too
    return lora_llama2(lora_attn_modules=lora_attn_modules, apply_lora_to_mlp=apply_lora_to_mlp,
                       apply_lora_to_output=apply_lora_to_output,
                       vocab_size=8192, num_layers=8, num_heads=8, num_kv_heads=8, embed_dim=512,
                       intermediate_dim=1376, max_seq_len=1024, norm_eps=1e-6,
                       lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout)


class BenchTokenizer:
    """Plain text in, ids out: prompt then reply, no special tokens but EOS after the reply (like the others)."""

    def __init__(self, path: str, eos_id: int, pad_id: int, max_seq_len: int = 1024):
        self.tok = Tokenizer.from_file(path)
        self.eos_id, self.pad_id, self.max_seq_len = eos_id, pad_id, max_seq_len
        self.special_tokens = {}

    def encode(self, text, add_bos=False, add_eos=False, **kw):
        return self.tok.encode(text, add_special_tokens=False).ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids, **kw):
        return self.tok.decode(ids)

    def tokenize_messages(self, messages, **kw):
        tokens, mask = [], []
        for m in messages:
            ids = self.encode(m.text_content)
            if m.role == "assistant":
                ids.append(self.eos_id)
            tokens += ids
            mask += [m.masked] * len(ids)
        return tokens[: self.max_seq_len], mask[: self.max_seq_len]

    def __call__(self, sample, inference=False):
        sample["tokens"], sample["mask"] = self.tokenize_messages(sample.pop("messages"))
        return sample
