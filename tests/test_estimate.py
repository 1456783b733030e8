"""tunelab.estimate: the pure maths, and predicted vs measured peak memory of real training steps on CPU.

Measuring: RSS is no use here (glibc keeps freed blocks, the profiler and torch's runtime add hundreds of
MB, and it measured 20-50 % above the tensors), so the peak is counted from torch's own allocator events:
`torch.profiler` with `profile_memory=True` reports every CPU tensor allocation and free with its size.
The profiled window is the second training step (the first creates the optimizer state); the bytes alive
when it starts (weights, quantization constants, adapter, optimizer state) are summed from the tensors.

`python tests/test_estimate.py` prints the predicted and measured peaks of all cases.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings

import pytest
import torch

from tunelab.config import Config
from tunelab.estimate import (
    GIB,
    NF4_BITS,
    NF4_DQ_BITS,
    ModelShape,
    count_tokens,
    cpu_device,
    estimate,
    flops_per_token,
    format_estimate,
    get_device,
    lora_params,
    lora_targets,
    model_shape,
)
from tunelab.estimate.counting import memory_breakdown
from tunelab.estimate.devices import get_device

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def tiny_llama(h=256, layers=4, heads=4, kv=None, inter=688, vocab=8192, tied=True):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv or heads, intermediate_size=inter, vocab_size=vocab,
                       max_position_embeddings=1024, tie_word_embeddings=tied)


def shape_of(hf) -> ModelShape:
    return ModelShape(hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads,
                      hf.intermediate_size, hf.vocab_size, hf.tie_word_embeddings)


def run_config(mode="full", mb=2, seq=256, accum=1, gc=False, bf16=False, dropout=0.05, r=16, optimizer="adamw",
               path="tiny") -> Config:
    model = {"path": path, "dtype": "bfloat16" if bf16 else "float32"}
    if mode == "qlora":
        model["quantize"] = "nf4"
    data = {
        "model": model,
        "data": {"train": [{"path": "absent.jsonl"}], "max_length": seq},
        "train": {"micro_batch_size": mb, "grad_accum": accum, "gradient_checkpointing": gc,
                  "precision": "bf16" if bf16 else "fp32", "optimizer": optimizer},
    }
    if mode != "full":
        data["adapter"] = {"r": r, "alpha": 2 * r, "dropout": dropout}
    return Config.model_validate(data)


# ---------------------------------------------------------------- pure maths

@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_bits_per_param_are_what_bitsandbytes_stores(double_quant):
    """The 4-bit codes, the absmax per block of 64 and (double quantization) the absmax of those per 256 blocks, as
    bitsandbytes lays them out; the code table and offset are per tensor, not per parameter."""
    bnb = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(256, 1024)
    packed, state = bnb.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    stored = [packed, state.absmax] + ([state.state2.absmax] if double_quant else [])
    bits = sum(t.numel() * t.element_size() for t in stored) * 8 / w.numel()
    assert bits == pytest.approx(NF4_DQ_BITS if double_quant else NF4_BITS)


@pytest.mark.parametrize("targets,dora", [("all-linear", False), (["q_proj", "v_proj"], False), ("all-linear", True)])
def test_param_counts_match_transformers_and_peft(targets, dora):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    hf = tiny_llama(h=128, layers=2, heads=4, kv=2, inter=352, vocab=1000, tied=False)
    shape = shape_of(hf)
    model = LlamaForCausalLM(hf)
    assert shape.params == sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=targets, use_dora=dora))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert lora_params(shape, lora_targets(shape, targets), 8, dora) == trainable


def test_flops_6n_full_4n_frozen_plus_attention():
    s = ModelShape(512, 8, 8, 8, 1376, 8192)
    n = s.linear_params + s.vocab * s.hidden  # matmul weights, the head included
    assert flops_per_token(s, seq=0, train_base=True) == 6 * n
    assert flops_per_token(s, seq=0, train_base=False) == 4 * n
    assert flops_per_token(s, seq=0, train_base=False, adapter_params=1000) == 4 * n + 6 * 1000
    assert flops_per_token(s, seq=256, train_base=True) - 6 * n == 6 * 8 * 256 * 512


def test_shape_from_model_dir_and_init(tmp_path):
    hf = tiny_llama(h=128, layers=3, heads=4, kv=2, inter=352, vocab=1000, tied=False)
    hf.save_pretrained(tmp_path)  # config.json only: no weights are needed
    cfg = Config.model_validate({"model": {"path": str(tmp_path)}, "data": {"train": [{"path": "x.jsonl"}]}})
    assert model_shape(cfg) == ModelShape(128, 3, 4, 2, 352, 1000, False, head_dim=32, name=tmp_path.name)
    cfg = Config.model_validate({"model": {"init": {"hidden_size": 512, "layers": 8, "heads": 8}},
                                 "tokenizer": {"train": True, "vocab_size": 8192}, "data": {"train": [{"path": "x"}]}})
    s = model_shape(cfg)
    assert (s.hidden, s.layers, s.intermediate, s.vocab, s.tied) == (512, 8, 1408, 8192, True)


@pytest.mark.parametrize("method,vocab", [("sft", 300), ("sft", 70000), ("dpo", 70000)])
def test_logits_term_counts_the_rows_the_loss_runs_at_once(method, vocab):
    """The estimator's chunk of logits is the largest number of rows the objective's loss puts through the head in
    one call (recorded by a hook on the head), for a vocabulary under and over the 32k where chunks shrink."""
    from tunelab.objectives import forward

    from transformers import LlamaForCausalLM

    hf = tiny_llama(h=32, layers=1, heads=2, kv=2, inter=64, vocab=vocab, tied=False)
    model = LlamaForCausalLM(hf)
    ids = torch.randint(0, vocab, (4, 600), generator=torch.Generator().manual_seed(0))  # 2396 labelled positions
    rows = []
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    if method == "sft":  # a hooked head is not a plain linear: the loss takes the checkpointed-chunks path
        forward.causal_lm_loss(model, {"input_ids": ids, "labels": ids})
    else:
        forward.response_logprobs(model, {"input_ids": ids, "labels": ids})
    cfg = Config.model_validate({"model": {"path": "x"}, "method": method, "data": {"train": [{"path": "x"}],
                                 "max_length": 600}, "train": {"micro_batch_size": 4 // (2 if method == "dpo" else 1)}})
    memory = memory_breakdown(cfg, shape_of(hf), get_device("h100"))
    assert memory.labels["logits"] == f"chunked CE: {max(rows)} positions at a time"


def test_tokens_from_data_files(tmp_path):
    rows = tmp_path / "train.jsonl"
    rows.write_text("".join(json.dumps({"text": "x" * 387}) + "\n" for _ in range(10)))  # 400 bytes a row
    cfg = Config.model_validate({"model": {"path": "llama-7b"}, "data": {"train": [{"path": str(rows)}]}})
    tokens, how = count_tokens(cfg)
    assert tokens == 10 * 100 and "10 rows" in how  # 400 bytes / 4 bytes per token
    cfg = Config.model_validate({"model": {"path": "llama-7b"}, "data": {"train": [{"path": "missing.jsonl"}]}})
    assert count_tokens(cfg)[0] is None
    est = estimate(cfg, "h100", tokens=1_000_000)
    # 1M tokens x 6N (N = 6.6 B with the head) at 40 % of 989 TFLOP/s: about 100 s
    assert 90 < est.seconds_per_epoch < 120


def test_cpu_rate_is_measured_in_under_a_second():
    """`--device cpu` times fp32 matmuls at torch's thread count; the rate is that of a directly timed larger matmul
    (within a factor of 3: other processes share the machine) and the device says it was measured, on how many
    threads."""
    import time

    start = time.perf_counter()
    dev = get_device("cpu")
    probe_seconds = time.perf_counter() - start
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    seconds = []
    for _ in range(3):
        t = time.perf_counter()
        a @ b
        seconds.append(time.perf_counter() - t)
    direct = 2 * n**3 / min(seconds) / 1e12
    assert probe_seconds < 1.0
    assert direct / 3 < dev.tflops < 3 * direct, f"probe {dev.tflops * 1e3:.1f} GFLOP/s, direct {direct * 1e3:.1f}"
    assert dev.rate_source == f"measured by a fp32 matmul probe on {torch.get_num_threads()} threads"


def test_time_says_where_the_rate_comes_from():
    """Time per epoch = tokens x FLOPs per token / (rate x MFU), whichever rate: a given CPU rate (deterministic),
    a datasheet GPU; the printout says which it used."""
    cfg = readme_config("llama-7b", "lora")
    for device, source in ((cpu_device(0.05), "given, not measured"), (get_device("a10"), "datasheet bf16 peak")):
        est = estimate(cfg, device=device, tokens=1_000_000, suggest=False)
        rate = device.tflops * 1e12 * device.mfu
        assert est.seconds_per_epoch == pytest.approx(1_000_000 * est.flops_per_token / rate, rel=1e-9)
        assert f"{device.mfu:.0%} of {device.tflops:.3g} TFLOP/s, {source})" in format_estimate(est)


def readme_config(path, mode, mb=1, seq=512, gc=True, optimizer="adamw", **model) -> Config:
    data = {"model": {"path": path, **model}, "data": {"train": [{"path": "x.jsonl"}], "max_length": seq},
            "train": {"micro_batch_size": mb, "grad_accum": 16, "gradient_checkpointing": gc, "optimizer": optimizer}}
    if mode != "full":
        data["adapter"] = {"r": 16}
    if mode == "qlora":
        data["model"]["quantize"] = "nf4"
    return Config.model_validate(data)


def test_readme_scale_sanity():
    # The QLoRA paper's headline: a 65B model fine-tuned on one 48 GB GPU.
    qlora = estimate(readme_config("llama-65b", "qlora", optimizer="paged_adamw_8bit"), "l40s", tokens=0)
    assert qlora.fits and 30 < qlora.total_bytes / GIB < 48
    # Full fine-tuning of 7B with mixed precision (fp32 weights and AdamW state, bf16 autocast): 16 bytes/param.
    mixed = estimate(readme_config("llama-7b", "full", dtype="float32"), "h100", tokens=0)
    assert not mixed.fits and mixed.total_bytes / GIB > 100
    # Our default keeps weights and AdamW state in bf16 (8 bytes/param): it fits at micro-batch 1, not at 4 x 2048.
    assert estimate(readme_config("llama-7b", "full"), "h100", tokens=0).fits
    assert not estimate(readme_config("llama-7b", "full", mb=4, seq=2048, gc=False), "h100", tokens=0).fits


def test_switches_say_what_fits():
    est = estimate(readme_config("llama-7b", "full", mb=4, seq=1024, gc=False), "rtx4090", tokens=0)
    assert not est.fits
    assert all(total < est.total_bytes / GIB for _, total in est.switches)
    fitting = [name for name, total in est.switches if total <= 24]
    assert fitting and all("LoRA" in name for name in fitting)
    text = format_estimate(est)
    assert "fits in 24 GiB: NO" in text and "QLoRA" in text


# ---------------------------------------------------------------- predicted vs measured peak memory

def live_bytes(model, optimizer) -> int:
    """Bytes of the tensors a step starts with: params, buffers, 4-bit quantization state, optimizer state."""
    storages = {}

    def add(t):
        if isinstance(t, torch.Tensor):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    for t in [*model.parameters(), *model.buffers()]:
        add(t)
        qs = getattr(t, "quant_state", None)
        if qs is not None:
            for q in (qs.absmax, qs.code, qs.offset, *((qs.state2.absmax, qs.state2.code) if qs.state2 else ())):
                add(q)
    for state in optimizer.state.values():
        for v in state.values():
            add(v)
    return sum(storages.values())


def build_model(hf, mode, gc, bf16, dropout, r, tmp_path):
    """The model as modeling/build.py makes it (4-bit linears, the rest in the load dtype; peft LoRA; gated MLPs
    that recompute act(gate); checkpointing)."""
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    from tunelab.modeling.gated_mlp import keep_less_in_gated_mlps
    from tunelab.modeling.lora_dropout import fuse_lora_dropout
    from tunelab.modeling.load import keep_4bit_layout

    dtype = torch.bfloat16 if bf16 else torch.float32
    torch.manual_seed(0)
    if mode == "qlora":
        LlamaForCausalLM(hf).save_pretrained(tmp_path)
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=dtype)
        model = LlamaForCausalLM.from_pretrained(tmp_path, dtype=dtype, quantization_config=quant,
                                                 device_map={"": "cpu"})
        keep_4bit_layout(model)  # as tunelab.modeling.build.load_model: the gated-MLP probe below is a no-grad forward
    else:
        model = LlamaForCausalLM(hf).to(dtype)
    if mode != "full":
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
        fuse_lora_dropout(model)
    assert keep_less_in_gated_mlps(model, dtype) == hf.num_hidden_layers
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    return model.train()


def profiled_peak(model, optimizer, step) -> int:
    """Peak bytes of CPU tensors while `step()` runs: those alive at its start + the allocator's high mark."""
    from torch.profiler import ProfilerActivity, profile

    start = live_bytes(model, optimizer)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return start + peak


def adamw(model):
    """tunelab's CPU optimizer: foreach AdamW, norms and biases in their own group."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2]}, {"params": [p for p in params if p.ndim < 2]}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=1e-4, foreach=True)


def measure_peak(hf, mode="full", mb=2, seq=256, accum=1, gc=False, bf16=False, dropout=0.05, r=16,
                 tmp_path=None) -> int:
    """Peak tensor bytes of a training step like tunelab's loop: forward with labels and backward over
    grad_accum micro-batches, gradient clipping, AdamW step, zero_grad."""
    warnings.filterwarnings("ignore", message=".*checkpointing.*", category=FutureWarning)
    model = build_model(hf, mode, gc, bf16, dropout, r, tmp_path)
    optimizer = adamw(model)
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    ids = torch.randint(0, hf.vocab_size, (mb, seq), generator=torch.Generator().manual_seed(0))

    def step(batch=ids, micro_batches=accum):
        for _ in range(micro_batches):
            with amp():
                loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(ids[:1, :8], 1)  # a short first step creates the optimizer state
    return profiled_peak(model, optimizer, step)


CASES = {  # name: (model shape, run settings); vocab 8192, seq 256 throughout
    "full h256": (dict(h=256), dict(mode="full")),
    "full h512 gqa ckpt accum2": (dict(h=512, heads=8, kv=4, inter=1376), dict(mode="full", gc=True, accum=2, mb=1)),
    "lora h256 8 layers": (dict(h=256, layers=8), dict(mode="lora", mb=1)),
    "lora h512 gqa ckpt": (dict(h=512, heads=8, kv=4, inter=1376), dict(mode="lora", gc=True, mb=1)),
    "qlora h256": (dict(h=256), dict(mode="qlora", mb=1)),
    "qlora h512 ckpt": (dict(h=512, heads=8, inter=1376), dict(mode="qlora", gc=True, mb=1)),
    # the GPU path: bf16 weights (QLoRA: bf16 compute) under bf16 autocast
    "full h256 bf16 autocast": (dict(h=256, layers=2), dict(mode="full", bf16=True, mb=1)),
    "qlora h256 bf16 autocast": (dict(h=256, layers=2), dict(mode="qlora", bf16=True, mb=1)),
}


def predicted_and_measured(name, tmp_path):
    shape_kw, run = CASES[name]
    hf = tiny_llama(**shape_kw)
    cfg = run_config(**run)
    est = estimate(cfg, device="cpu", chunked_ce=False, shape=shape_of(hf), tokens=0, suggest=False)
    return est.peak_bytes, measure_peak(hf, tmp_path=tmp_path, **run)


@pytest.mark.parametrize("name", list(CASES))
def test_predicted_peak_matches_measured(name, tmp_path):
    predicted, measured = predicted_and_measured(name, tmp_path)
    assert abs(predicted / measured - 1) < 0.15, f"predicted {predicted / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB"


def test_chunked_loss_of_the_sft_objective(tmp_path):
    """The chunked-CE prediction against tunelab's own SFT loss: 2 x 1280 tokens, logits in 2 chunks."""
    from tunelab.objectives.forward import causal_lm_loss

    hf = tiny_llama(layers=2)
    model = build_model(hf, "lora", False, False, 0.05, 16, tmp_path)
    optimizer = adamw(model)
    ids = torch.randint(0, hf.vocab_size, (2, 1280), generator=torch.Generator().manual_seed(0))

    def step(batch=ids):
        total, n = causal_lm_loss(model, {"input_ids": batch, "labels": batch})
        (total / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(ids[:1, :8])
    measured = profiled_peak(model, optimizer, step)
    cfg = run_config(mode="lora", mb=2, seq=1280)
    predicted = estimate(cfg, device="cpu", chunked_ce=True, shape=shape_of(hf), tokens=0, suggest=False).peak_bytes
    assert abs(predicted / measured - 1) < 0.15


if __name__ == "__main__":
    import tempfile

    for case in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            p, m = predicted_and_measured(case, tmp)
        print(f"{case:28s} predicted {p / 2**20:7.1f} MiB  measured {m / 2**20:7.1f} MiB  {100 * (p / m - 1):+5.1f} %")


# ---------------------------------------------------------------- the estimate against a real run

@pytest.mark.parametrize("padding_free", ["auto", False], ids=["default-padding-free", "padded"])
def test_estimate_of_a_run_matches_the_run(padding_free, tiny_tokenizer, tmp_path):
    """`estimate` on a real run's config (a local model and tokenizer, rows of very uneven length) against that run
    through tunelab's Trainer: the tokens it trained, and its steps' peak tensor bytes counted by the allocator (the
    same accounting as above; the CPU process baseline that the estimate adds on top is not a tensor and not
    compared). The default config takes padding-free batches; `false` pads, and SDPA keeps its float mask."""
    from tunelab.config import InitConfig, load_config
    from tunelab.estimate import Device
    from tunelab.modeling.scratch import save_tiny_model
    from tunelab.training.loop import Trainer

    torch.manual_seed(0)
    shape = InitConfig(hidden_size=128, layers=2, heads=4, intermediate_size=352, max_position=512)
    model_dir = save_tiny_model(tmp_path / "base", tiny_tokenizer, shape)
    words = "the quick brown fox jumps over a lazy dog and then sleeps".split()
    rows = [{"instruction": " ".join(words[: 3 + i % 5]), "output": " ".join(words[i % 11:] + words * n)}
            for i, n in enumerate([1, 40, 3, 9, 2, 25, 5, 14])]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(data={
        "model": {"path": str(model_dir)}, "adapter": {"r": 8},
        "data": {"train": [{"path": str(data), "format": "alpaca"}], "max_length": 512, "padding_free": padding_free},
        "train": {"epochs": 1, "micro_batch_size": 4, "grad_accum": 1, "eval_every": None, "save_every": None, "progress": False},
        "log": {"tensorboard": False, "plot": False}, "output_dir": str(tmp_path / "run"),
    })
    est = estimate(cfg, device=Device("cpu", 1.0, 24, cuda=False), suggest=False)
    assert est.padding_free is (padding_free == "auto")
    assert "tokenized with the model's tokenizer" in est.tokens_source

    class Measured(Trainer):
        peak = 0

        def _step(self, batches):
            out = {}

            def step():
                out["metrics"] = Trainer._step(self, batches)

            self.peak = max(self.peak, profiled_peak(self.module, self.optimizer, step))
            return out["metrics"]

    trainer = Measured(cfg, say=lambda *a: None)
    trainer.run()
    assert trainer.objective.padding_free is est.padding_free
    assert trainer.state.tokens == est.tokens_per_epoch
    assert abs(est.peak_bytes / trainer.peak - 1) < 0.15, \
        f"predicted {est.peak_bytes / 2**20:.2f} MiB, measured {trainer.peak / 2**20:.2f} MiB"
    text = format_estimate(est)
    assert ("padding-free" if est.padding_free else "padded") + " micro-batches" in text
    assert "baseline" in text
