"""What the estimate knows of a model: its shape, read from its config alone (no weights are loaded)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tunelab.config import Config, InitConfig, UserError


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a decoder model (biases are not counted)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool = False
    head_dim: int | None = None
    gated_mlp: bool = True  # SwiGLU (gate, up, down); False: a plain two-matrix MLP (GPT-2, BERT)
    name: str = ""

    @property
    def q_dim(self) -> int:
        return self.heads * (self.head_dim or self.hidden // self.heads)

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.head_dim or self.hidden // self.heads)

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one block, by Llama's leaf names."""
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}
        if self.gated_mlp:
            shapes["gate_proj"] = (h, i)
        shapes.update(up_proj=(h, i), down_proj=(i, h))
        return shapes

    @property
    def linear_params(self) -> int:
        """Weights of all blocks' linear layers: what NF4 quantizes and what the matmul FLOPs scale with."""
        return self.layers * sum(a * b for a, b in self.linears().values())

    @property
    def params(self) -> int:
        norms = (2 * self.layers + 1) * self.hidden
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.linear_params + norms + embeddings


def _llama(h, layers, heads, kv, i, vocab, tied=False, name=""):
    return ModelShape(h, layers, heads, kv, i, vocab, tied, name=name)


# Well-known shapes, so the README table (and configs naming a hub id) need no download.
KNOWN_SHAPES: dict[str, ModelShape] = {
    "llama-7b": _llama(4096, 32, 32, 32, 11008, 32000, name="Llama-2-7B"),
    "llama-13b": _llama(5120, 40, 40, 40, 13824, 32000, name="Llama-2-13B"),
    "llama-65b": _llama(8192, 80, 64, 64, 22016, 32000, name="Llama-65B"),
    "llama-3-8b": _llama(4096, 32, 32, 8, 14336, 128256, name="Llama-3-8B"),
    "llama-3-70b": _llama(8192, 80, 64, 8, 28672, 128256, name="Llama-3-70B"),
    "llama-3.2-1b": _llama(2048, 16, 32, 8, 8192, 128256, tied=True, name="Llama-3.2-1B"),
    "llama-3.2-3b": _llama(3072, 28, 24, 8, 8192, 128256, tied=True, name="Llama-3.2-3B"),
    "mistral-7b": _llama(4096, 32, 32, 8, 14336, 32000, name="Mistral-7B"),
}
KNOWN_SHAPES.update({
    "meta-llama/Llama-2-7b-hf": KNOWN_SHAPES["llama-7b"],
    "meta-llama/Llama-2-13b-hf": KNOWN_SHAPES["llama-13b"],
    "huggyllama/llama-65b": KNOWN_SHAPES["llama-65b"],
    "meta-llama/Meta-Llama-3-8B": KNOWN_SHAPES["llama-3-8b"],
    "meta-llama/Llama-3.1-8B": KNOWN_SHAPES["llama-3-8b"],
    "meta-llama/Meta-Llama-3-70B": KNOWN_SHAPES["llama-3-70b"],
    "meta-llama/Llama-3.1-70B": KNOWN_SHAPES["llama-3-70b"],
    "meta-llama/Llama-3.2-1B": KNOWN_SHAPES["llama-3.2-1b"],
    "meta-llama/Llama-3.2-3B": KNOWN_SHAPES["llama-3.2-3b"],
    "mistralai/Mistral-7B-v0.1": KNOWN_SHAPES["mistral-7b"],
})

# transformers model types whose MLP is two matrices with a plain activation (no gate).
PLAIN_MLP_TYPES = {"gpt2", "gpt_neox", "gptj", "opt", "bert", "roberta", "distilbert", "phi", "falcon",
                   "bloom", "gpt_bigcode", "starcoder2"}


def shape_from_hf_config(c, name: str = "") -> ModelShape:
    """A ModelShape from a transformers PretrainedConfig (only its numbers are read)."""
    c = c.get_text_config() if hasattr(c, "get_text_config") else c
    h, heads = c.hidden_size, c.num_attention_heads
    return ModelShape(
        hidden=h,
        layers=c.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(c, "num_key_value_heads", None) or heads,
        intermediate=getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * h,
        vocab=c.vocab_size,
        tied=bool(getattr(c, "tie_word_embeddings", False)),
        head_dim=getattr(c, "head_dim", None),
        gated_mlp=c.model_type not in PLAIN_MLP_TYPES,
        name=name,
    )


def _init_shape(init: InitConfig, vocab: int) -> ModelShape:
    if init.architecture == "bert":
        return ModelShape(init.hidden_size, init.layers, init.heads, init.heads,
                          init.intermediate_size or 4 * init.hidden_size, vocab, True, gated_mlp=False, name="bert (init)")
    # Same default width as tunelab.modeling.scratch: 2/3 of 4·hidden, rounded up to a multiple of 64.
    width = init.intermediate_size or (int(8 * init.hidden_size / 3) + 63) // 64 * 64
    return ModelShape(init.hidden_size, init.layers, init.heads, init.kv_heads or init.heads, width, vocab,
                      init.tie_embeddings, name="llama (init)")


def model_shape(cfg: Config) -> ModelShape:
    """The model's shape from its config alone: model.init, a local model dir, a known name, or a hub config."""
    mc = cfg.model
    if mc.init is not None:
        vocab = cfg.tokenizer.vocab_size
        if cfg.tokenizer.path:
            from transformers import AutoTokenizer

            vocab = len(AutoTokenizer.from_pretrained(cfg.tokenizer.path))
        return _init_shape(mc.init, vocab)
    if mc.path in KNOWN_SHAPES and not Path(mc.path).exists():
        return KNOWN_SHAPES[mc.path]
    from transformers import AutoConfig

    try:
        hf = AutoConfig.from_pretrained(mc.path, trust_remote_code=mc.trust_remote_code)
    except (OSError, ValueError) as e:
        known = ", ".join(k for k in KNOWN_SHAPES if "/" not in k)
        raise UserError(f"{mc.path}: could not read a model config ({str(e).splitlines()[0]}); "
                        f"give a local model dir or one of: {known}") from None
    return shape_from_hf_config(hf, name=Path(mc.path).name)
