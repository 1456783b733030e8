"""GGUF / Ollama export, checked by llama.cpp itself (llama-cpp-python built from source by `make llama-cpp`; the
`export` tests skip without it and run in `make test-export`): f32 GGUF logits equal transformers' (atol 1e-4 with an
f32 KV cache; gemma2 2e-3, see ARCHS) on the demo's model and tiny llama, mistral, qwen2, gemma2 and phi3 models,
greedy chat through llama.cpp's embedded template equals `tunelab generate` token for token, q8_0 perplexity within
2 % of f16's, the template and stop tokens embedded, unsupported architectures refused first.

The Modelfile TEMPLATE of each built-in family equals Ollama's published template (references below, unmarked)."""

from __future__ import annotations

import ctypes
import json
import math
import os
from pathlib import Path

import pytest

from tiny import config_dict, make_base_model, write_task_data
from tunelab.config import UserError, load_config

try:
    import llama_cpp
except ImportError:
    llama_cpp = None


def with_llama(test):
    """An `export` test that loads GGUFs with llama.cpp: skipped (before its fixtures build anything) without it."""
    skip = pytest.mark.skipif(llama_cpp is None, reason="llama_cpp not installed: make llama-cpp / make test-export")
    return pytest.mark.export(skip(test))

# Ollama's templates, from github.com/ollama/ollama template/<file> (the templates `ollama create` matches a GGUF's
# chat template against, and the ones its library's models carry) at the commits named.
OLLAMA = {
    "chatml": ("template/chatml.gotmpl @ 4a8e5e29421d505cb733648ae06e083316e5d663",
               "{{- if .Messages }}\n{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}\n{{- range "
               ".Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n{{ else }}\n"
               "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}{{ if .Prompt }}<|im_start|>user\n{{ "
               ".Prompt }}<|im_end|>\n{{ end }}<|im_start|>assistant\n{{ .Response }}<|im_end|>\n{{- end }}"),
    "llama3": ("template/llama3-instruct.gotmpl @ 19753c18c01183b4c974e36e89b0c7cbdcc3c38a",
               "{{- if .Messages }}\n{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>\n"
               "{{- end }}\n{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
               "\n{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ else -}}\n{{ if .System }}<|start_header_id|>"
               "system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}{{ if .Prompt }}<|start_header_id|>user<|end_header"
               "_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}"
               "<|eot_id|>\n{{- end -}}"),
    "gemma": ("template/gemma-instruct.gotmpl @ 19753c18c01183b4c974e36e89b0c7cbdcc3c38a",
              "{{- if .Messages }}\n{{- range $index, $_ := .Messages }}<start_of_turn>\n{{- if eq .Role \"user\" }}user\n"
              "{{- if and $.System (eq $index 0) }}\n{{ $.System }}\n{{- end }}\n{{- else if eq .Role \"assistant\" }}model"
              "\n{{- end }}\n{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n{{ else -}}\n<start_of_turn>user\n"
              "{{ if .System }}{{ .System }}\n{{ end }}{{ .Prompt }}<end_of_turn>\n<start_of_turn>model\n{{ .Response }}"
              "<end_of_turn>\n{{ end -}}"),
    "phi3": ("template/phi-3.gotmpl @ 4587734ec088baa35244cc596377ec8c7fee3494",
             "{{ if .System }}<|system|>\n{{ .System }}<|end|>\n{{ end }}{{ if .Prompt }}<|user|>\n{{ .Prompt }}<|end|>\n"
             "{{ end }}<|assistant|>\n{{ .Response }}<|end|>"),
    "mistral": ("template/mistral-instruct.gotmpl @ 45743828f41094c71a01bc04f52aaaf1ab82ccc0",
                "{{- if .Messages }}\n{{- range $index, $_ := .Messages }}\n{{- if eq .Role \"user\" }}[INST] {{ if and "
                "$.System (eq (len (slice $.Messages $index)) 1) }}{{ $.System }}\n{{ end }}{{ .Content }}\n{{- else if eq "
                ".Role \"assistant\" }}[/INST] {{ .Content }}</s>\n{{- end }}\n{{- end }}[/INST]\n{{- else -}}\n[INST] {{ if "
                ".System }}{{ .System }} {{ end }}{{ .Prompt }}[/INST] {{ .Response }}</s>\n{{- end -}}"),
    "alpaca": ("template/alpaca.gotmpl @ 040a8e85eeead2b9a9ec21734f436b97a343866a",
               "{{- $system := \"\" }}\n{{- range .Messages }}\n{{- if eq .Role \"system\" }}\n{{- if not $system }}{{ "
               "$system = .Content }}\n{{- else }}{{ $system = printf \"%s\\n\\n%s\" $system .Content }}\n{{- end }}\n{{- "
               "else if eq .Role \"user\" }}\n{{- if $system }}{{ $system }}\n\n{{ $system = \"\" }}\n{{- end }}### "
               "Instruction:\n{{ .Content }}\n\n{{ else if eq .Role \"assistant\" }}### Response:\n{{ .Content }}\n\n{{ end "
               "}}\n{{- end }}### Response:\n"),
}


@pytest.mark.parametrize("template", sorted(OLLAMA))
def test_modelfile_template_is_ollamas(template):
    from tunelab.export.ollama import modelfile

    text = modelfile("m.gguf", template, ["<|im_end|>"])
    assert f'TEMPLATE """{OLLAMA[template][1]}"""' in text, OLLAMA[template][0]
    assert text.startswith("FROM ./m.gguf\n") and 'PARAMETER stop "<|im_end|>"' in text


TEXTS = [f"The number {i} follows {i - 1} and precedes {i + 1}. Ünïcödé {i}" for i in range(200)]


@with_llama
def test_unsupported_architecture_is_refused_before_any_work(tmp_path):
    import archs
    from tunelab.export import export

    model = archs.build("opt", tmp_path / "opt", TEXTS)  # OPT is not in llama.cpp's converter table
    with pytest.raises(UserError, match="llama.cpp cannot convert architecture OPTForCausalLM"):
        export(str(model), out=str(tmp_path / "out"), say=lambda *a: None)
    assert not (tmp_path / "out").exists()


# Per architecture: what its tiny model (tests/archs.py) changes so the comparison exercises what llama.cpp implements,
# and the logit tolerance. The test sequence (SEQUENCE) is over twice as long as every sliding window (16 tokens).
# - gemma2: queries scaled by 1/sqrt(head_dim) (query_pre_attn_scalar = head_dim, as Gemma 2 2B and 9B have it:
#   llama.cpp reads no query_pre_attn_scalar and assumes that, or hidden/heads for 27B; the config's default is 256),
#   soft-capping strong enough to matter at these logit sizes (archs' 50 / 30 barely bend logits near 1: without them
#   the reference moves by less than the GELU error below), a sliding window on every other layer, a SentencePiece
#   tokenizer.model (its converter reads no other). Tolerance 2e-3, not 1e-4: llama.cpp's CPU GELU reads an f16 table
#   (GGML_GELU_FP16, defined unconditionally in ggml-cpu/vec.h: input rounded to f16, output an f16), about 1e-3
#   relative error per activation; Gemma's MLP is GeGLU, the other families here use SiLU, which ggml computes in f32.
#   (With that table emulated in transformers' MLP the difference falls to ~1e-6 at most positions, ~1e-4 at a few whose
#   activations sit on an f16 rounding boundary.) The test also shows the tolerance sees each feature: without the
#   attention soft-cap, the final soft-cap or the sliding window, transformers' logits are over 10x the tolerance away.
# - phi3: SentencePiece tokenizer.model, no sliding window: llama.cpp turns Phi-3's off ("Phi SWA is currently
#   disabled", src/models/phi3.cpp, llama.cpp PR 13676), see the xfail below.
# - mistral: window beyond the sequence: llama.cpp runs Mistral as llama, which has no sliding window (xfail below).
ARCHS = {
    "llama": ({}, 1e-4),
    "mistral": (dict(sliding_window=4096), 1e-4),
    "qwen2": ({}, 1e-4),
    "gemma2": (dict(attn_logit_softcapping=0.2, final_logit_softcapping=2.0, query_pre_attn_scalar=8), 2e-3),
    "phi3": ({}, 1e-4),
    "phi3-window": (dict(sliding_window=16), 1e-4),
    "mistral-window": (dict(sliding_window=16), 1e-4),
}
NO_WINDOW = "llama.cpp applies no sliding window to {}: transformers masks keys 16+ tokens back, llama.cpp does not"
XFAIL = {"phi3-window": NO_WINDOW.format("Phi-3 (src/models/phi3.cpp: 'Phi SWA is currently disabled')"),
         "mistral-window": NO_WINDOW.format("Mistral (converted as llama, whose graph has no window)")}
SENTENCEPIECE = ("gemma2", "phi3", "phi3-window")
FAMILY_TEMPLATE = {"gemma2": "gemma", "phi3": "phi3"}  # the tunelab templates of these architectures' families
SEQUENCE = " ".join(TEXTS[5:9])


@pytest.fixture(scope="module")
def arch_exports(tmp_path_factory):
    """family -> (model dir, its f32 GGUF written with --format ollama), built on first use. A family with a chat
    template in tunelab's family templates has it installed (as prepare_tokenizer does for a run)."""
    import archs
    from tunelab.data.templates import prepare_tokenizer
    from tunelab.export import export
    from tunelab.modeling.load import load_tokenizer

    root, built = tmp_path_factory.mktemp("archs"), {}

    def get(family):
        if family not in built:
            arch = family.split("-")[0]  # named after the architecture: llama.cpp keys Phi-3's token handling on it
            # seed 1: tied embeddings make a random model repeat its input token; this one's greedy replies vary
            model_dir = archs.build(arch, root / family / arch, TEXTS, sentencepiece=family in SENTENCEPIECE,
                                    config=ARCHS[family][0], seed=1)
            if family in FAMILY_TEMPLATE:
                tokenizer = load_tokenizer(str(model_dir))
                prepare_tokenizer(FAMILY_TEMPLATE[family], tokenizer)
                tokenizer.save_pretrained(model_dir)
            built[family] = model_dir, export(str(model_dir), "ollama", "f32", str(root / f"{family}-out"),
                                              say=lambda *a: None)
        return built[family]

    return get


def _reference_logits(model_dir, ids, **config):
    """transformers' logits (eager attention: the path that applies Gemma 2's attention soft-capping)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager",
                                                 **config).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@with_llama
@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.xfail(reason=XFAIL[f], strict=True))
                                    if f in XFAIL else f for f in ARCHS])
def test_f32_logits_match_transformers_per_architecture(family, arch_exports):
    from transformers import AutoTokenizer

    model_dir, gguf = arch_exports(family)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = [tokenizer.bos_token_id] + tokenizer(SEQUENCE, add_special_tokens=False)["input_ids"]
    llm = _llama(gguf)
    assert len(ids) > 32
    if family in SENTENCEPIECE:  # the fixture's tokenizer.model and its transformers twin split text alike
        assert llm.tokenize(SEQUENCE.encode(), add_bos=True) == ids
    llm.eval(ids)
    got, tolerance = llm.scores[: len(ids)].copy(), ARCHS[family][1]
    diff = abs(got - _reference_logits(model_dir, ids)).max()
    print(f"{family}: max |logit diff| {diff:.2g} (tolerance {tolerance:g})")
    assert diff < tolerance
    if family == "gemma2":
        for feature in (dict(attn_logit_softcapping=None), dict(final_logit_softcapping=None),
                        dict(sliding_window=4096)):
            without = abs(got - _reference_logits(model_dir, ids, **feature)).max()
            print(f"  reference with {feature}: {without:.2g} away")
            assert without > 10 * tolerance, feature


@with_llama
@pytest.mark.parametrize("family", list(FAMILY_TEMPLATE))
def test_family_template_chat_equals_tunelab_generate(family, arch_exports):
    """gemma2 / phi3 with their family's template: llama.cpp's chat handler renders the embedded template to the
    very prompt tokens tunelab trains and generates with; its greedy generation from them is tunelab's token for
    token, to the end-of-turn token (compared as ids: a random model writes byte-fallback pieces that are no valid
    UTF-8, which llama-cpp-python's text drops); the Modelfile carries Ollama's published template and the stop."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from tunelab.modeling.infer import Sampling, generate_ids, prompt_ids
    from tunelab.modeling.load import load_pretrained

    model_dir, gguf = arch_exports(family)
    model, tokenizer = load_pretrained(str(model_dir), dtype="float32")
    llm = _llama(gguf)
    formatter = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], tokenizer.eos_token, tokenizer.bos_token)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    for prompt in ("Add 2 and 3.", "Reverse the word cat."):
        messages = [{"role": "user", "content": prompt}]
        ours_prompt = prompt_ids(tokenizer, messages, "auto")
        # what llama-cpp-python's chat handler (chat_formatter_to_chat_completion_handler) tokenizes
        theirs_prompt = llm.tokenize(formatter(messages=messages).prompt.encode(), add_bos=False, special=True)
        assert theirs_prompt == ours_prompt
        ours = generate_ids(model, tokenizer, ours_prompt, Sampling(max_new_tokens=24))
        theirs = []
        for token in llm.generate(theirs_prompt, top_k=1, temp=0.0, reset=True):
            theirs.append(token)
            if llama_cpp.llama_vocab_is_eog(vocab, token) or len(theirs) == 24:
                break
        print(f"{family} {prompt!r}: {len(ours)} tokens, {len(set(ours))} distinct")
        assert len(set(ours)) > 2 and theirs == ours
    modelfile = (gguf.parent / "Modelfile").read_text()
    end_of_turn = {"gemma2": "<end_of_turn>", "phi3": "<|end|>"}[family]
    assert f'TEMPLATE """{OLLAMA[FAMILY_TEMPLATE[family]][1]}"""' in modelfile
    assert f'PARAMETER stop "{end_of_turn}"' in modelfile


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny LoRA run (chatml template, as the demo's byte-level BPE tokenizer has it) and its merged model."""
    from tunelab.modeling.merging import merge
    from tunelab.training.loop import train

    root = tmp_path_factory.mktemp("export")
    base = make_base_model(root)
    data = write_task_data(root / "train.jsonl", n=32)
    cfg = load_config(data=config_dict(base, data, root / "run", adapter={"r": 4, "alpha": 8},
                                       data={"template": "chatml"}, train={"max_steps": 2}))
    final = train(cfg, say=lambda *a: None)
    return final.parent, merge(str(final), str(root / "merged"))


def _llama(path: Path):
    return llama_cpp.Llama(str(path), n_ctx=256, logits_all=True, verbose=False, seed=0,
                           type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)


@pytest.fixture(scope="module")
def exported(run):
    from tunelab.export import export

    run_dir, _ = run
    quiet = lambda *a: None  # noqa: E731
    return {q: export(str(run_dir), "ollama" if q == "f32" else "gguf", q, str(run_dir / f"export-{q}"), say=quiet)
            for q in ("f32", "f16", "q8_0", "q4_k_m")}


@with_llama
def test_f32_logits_match_transformers(run, exported):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, merged = run
    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, torch_dtype=torch.float32).eval()
    ids = tokenizer("Sort these numbers: 3 1 2. Ünïcödé too.")["input_ids"]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    llm = _llama(exported["f32"])
    assert llm.tokenize("Sort these numbers: 3 1 2. Ünïcödé too.".encode(), add_bos=tokenizer.bos_token_id in ids[:1]) == ids
    llm.eval(ids)
    got = llm.scores[: len(ids)]
    assert abs(got - expected).max() < 1e-4


@with_llama
def test_greedy_chat_equals_tunelab_generate(run, exported):
    """llama.cpp renders the prompt with the GGUF's embedded template and samples greedily; its reply, tokenized,
    is the token sequence tunelab's greedy generation produced (decoded without special tokens, unstripped)."""
    from tunelab.modeling.infer import Sampling, generate_ids, prompt_ids
    from tunelab.modeling.load import load_pretrained

    run_dir, _ = run
    model, tokenizer = load_pretrained(str(run_dir), dtype="float32")
    llm = _llama(exported["f32"])
    for prompt in ("Add 2 and 3.", "Reverse the word cat."):
        messages = [{"role": "user", "content": prompt}]
        new = generate_ids(model, tokenizer, prompt_ids(tokenizer, messages, "auto"), Sampling(max_new_tokens=24))
        ours = tokenizer.decode(new, skip_special_tokens=True)
        theirs = llm.create_chat_completion(messages, temperature=0.0, top_k=1, max_tokens=24)["choices"][0]["message"]
        assert ours and tokenizer.encode(theirs["content"], add_special_tokens=False) == tokenizer.encode(
            ours, add_special_tokens=False)


@with_llama
def test_gguf_lora_on_the_base_gguf_equals_the_merged_model(run, tmp_path):
    """The adapter alone (llama.cpp's convert_lora_to_gguf.py), applied at load time on the base's GGUF, gives the
    merged model's logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.export import export

    run_dir, merged = run
    base = json.loads((run_dir / "final" / "adapter_config.json").read_text())["base_model_name_or_path"]
    quiet = lambda *a: None  # noqa: E731
    base_gguf = export(base, "gguf", "f32", str(tmp_path / "base"), say=quiet)
    lora_gguf = export(str(run_dir), "gguf-lora", "f32", str(tmp_path / "lora"), say=quiet)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, torch_dtype=torch.float32).eval()
    ids = tokenizer("Reverse the word: apple")["input_ids"]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    llm = llama_cpp.Llama(str(base_gguf), lora_path=str(lora_gguf), n_ctx=256, logits_all=True, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    llm.eval(ids)
    assert abs(llm.scores[: len(ids)] - expected).max() < 1e-4
    plain = _llama(base_gguf)  # the adapter matters: without it the logits are off by far more than the tolerance
    plain.eval(ids)
    assert abs(plain.scores[: len(ids)] - expected).max() > 1e-2


@with_llama
def test_template_and_stop_tokens_are_embedded(run, exported):
    from tunelab.data.templates import stop_token_ids
    from tunelab.modeling.load import load_tokenizer

    _, merged = run
    tokenizer = load_tokenizer(str(merged))
    llm = _llama(exported["f32"])
    assert llm.metadata["tokenizer.chat_template"] == tokenizer.chat_template
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    stops = stop_token_ids("chatml", tokenizer)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stops
    assert all(llama_cpp.llama_vocab_is_eog(vocab, i) for i in stops)


@with_llama
def test_ollama_modelfile_and_card(run, exported):
    from huggingface_hub import ModelCard

    out = exported["f32"].parent
    text = (out / "Modelfile").read_text()
    assert text.startswith(f"FROM ./{exported['f32'].name}\n")
    assert f'TEMPLATE """{OLLAMA["chatml"][1]}"""' in text and 'PARAMETER stop "<|im_end|>"' in text
    card = ModelCard.load(out / "README.md")
    assert "gguf" in card.data.tags and "ollama create" in card.text


@with_llama
def test_q8_0_perplexity_within_two_percent_of_f16(run, exported):
    from tunelab import tasks

    _, merged = run
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged)
    _, held_out = tasks.split_items(64, 8, seed=1)
    texts = [tasks.to_alpaca(item)["instruction"] + " " + tasks.to_alpaca(item)["output"] for item in held_out]

    def perplexity(path):
        llm, nll, n = _llama(path), 0.0, 0
        for text in texts:
            ids = tokenizer(text)["input_ids"][:200]
            llm.reset()
            llm.eval(ids)
            logits = llm.scores[: len(ids)]
            for pos in range(len(ids) - 1):
                row = logits[pos]
                top = row.max()
                nll += top + math.log(sum(math.exp(v - top) for v in row)) - row[ids[pos + 1]]
                n += 1
        return math.exp(nll / n)

    f16, q8 = perplexity(exported["f16"]), perplexity(exported["q8_0"])
    assert abs(q8 / f16 - 1) < 0.02, (f16, q8)
    assert exported["q4_k_m"].stat().st_size < exported["f16"].stat().st_size
