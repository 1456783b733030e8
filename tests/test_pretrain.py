"""method: pretrain and method: mlm, and the from-scratch pieces (tokenizer training, model.init).

References: data.pack_stream + data.collate for the vectorised blocks; the closed-form facts of BERT masking for
the MLM statistics; encode -> decode identity for the tokenizer; document isolation by perturbation (changing one
document leaves another's loss bit-identical, and the same perturbation without isolation does change it)."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from tiny import with_sections

from tunelab.config import load_config
from tunelab.tasks import WORDS

UNICODE = ["naïve café — “quotes” ½", "日本語のテキスト、中文字符", "emoji 🙂👍🏽 and ZWJ 👩‍👩‍👧", "tabs\tand\r\nCRLF",
           "  leading and trailing spaces  ", "combining e\u0301 vs é", "control \x00\x1b bytes", "Ελληνικά, русский, עברית"]


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """40 .txt documents of task words (some long enough to span blocks), with unicode sprinkled in."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for i in range(40):
        extra = f" {UNICODE[i % len(UNICODE)]}" if i % 5 == 0 else ""
        (root / f"doc{i:02d}.txt").write_text(_words(rng, rng.randint(5, 60)) + extra + "\n", encoding="utf-8")
    return root


def _cfg(corpus, out, method="pretrain", arch="llama", **sections) -> dict:
    init = {"architecture": arch, "hidden_size": 32, "layers": 2, "heads": 2, "intermediate_size": 64,
            "max_position": 64}
    cfg = {
        "model": {"init": init},
        "tokenizer": {"train": True, "vocab_size": 320},
        "data": {"train": [{"path": str(corpus / "*.txt"), "format": "text"}], "max_length": 32},
        "method": method,
        "train": {"max_steps": 4, "micro_batch_size": 8, "grad_accum": 1, "lr": 3e-3, "eval_every": None,
                  "save_every": None, "progress": False, "scheduler": "constant"},
        "log": {"tensorboard": False, "plot": False},
        "output_dir": str(out),
    }
    return with_sections(cfg, **sections)


@pytest.fixture(scope="module")
def tokenizers(corpus, tmp_path_factory):
    """The trained tokenizers of a llama (decoder) run and a bert (encoder) run."""
    from tunelab.modeling.scratch import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    return {arch: train_tokenizer(load_config(data=_cfg(corpus, out / arch, "pretrain" if arch == "llama" else "mlm", arch)))
            for arch in ("llama", "bert")}


def _train(cfg: dict, resume: bool = False):
    from tunelab.training.loop import Trainer

    trainer = Trainer(load_config(data=cfg), resume=resume, say=lambda *a: None)
    trainer.run()
    return trainer


def _metrics(run_dir):
    from tunelab.training.tracking import read_metrics

    return read_metrics(run_dir / "metrics.jsonl")


# ---------------------------------------------------------------- tokenizer


def test_trained_tokenizer_round_trips_text_and_has_the_special_tokens(tokenizers, tmp_path):
    from transformers import AutoTokenizer

    tok = tokenizers["llama"]
    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    specials = {"<pad>": 0, "<s>": 1, "</s>": 2, "<mask>": 3, "<|im_start|>": 4, "<|im_end|>": 5}
    texts = UNICODE + ["plain words apple river", "a <|im_end|> inside </s> text <s>", "", " ", "\n\n\n"]
    for t in (tok, reloaded):
        assert {k: t.convert_tokens_to_ids(k) for k in specials} == specials
        assert (t.pad_token_id, t.bos_token_id, t.eos_token_id, t.mask_token_id) == (0, 1, 2, 3)
        assert set(specials) <= set(t.all_special_tokens)
        for text in texts:
            ids = t.encode(text, add_special_tokens=False)
            assert t.decode(ids) == text, text
            as_text = t(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            assert t.decode(as_text) == text and not set(as_text) & set(specials.values()), text
        # special tokens in text are single ids; BOS leads an encoded text (Llama layout)
        assert t.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)[0] == 4
        with_bos = t.encode("apple river")
        assert with_bos[0] == 1 and t.decode(with_bos, skip_special_tokens=True) == "apple river"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    enc = tokenizers["bert"]  # encoder layout: <s> A </s>, and CLS / SEP are named
    assert (enc.cls_token, enc.sep_token, enc.mask_token) == ("<s>", "</s>", "<mask>")
    ids = enc.encode("apple river")
    assert ids[0] == 1 and ids[-1] == 2 and enc.decode(ids[1:-1]) == "apple river"


def test_tokenizer_is_reused_until_its_data_or_settings_change(corpus, tmp_path):
    from tunelab.modeling.scratch import STAMP, train_tokenizer

    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    cfg = _cfg(data, tmp_path / "run")
    first = train_tokenizer(load_config(data=cfg))
    saved = tmp_path / "run" / "tokenizer"
    stamp = (saved / STAMP).read_text()
    (saved / "marker").write_text("same dir")
    again = train_tokenizer(load_config(data=cfg))  # resume / rerun: reused, not retrained
    assert (saved / "marker").exists() and again.get_vocab() == first.get_vocab()
    (data / "doc00.txt").write_text("zebra zebra quartz " * 50)  # new data: retrained
    retrained = train_tokenizer(load_config(data=cfg))
    assert not (saved / "marker").exists() and (saved / STAMP).read_text() != stamp
    assert "Ġzebra" in retrained.get_vocab()
    smaller = train_tokenizer(load_config(data=_cfg(data, tmp_path / "run", tokenizer={"vocab_size": 280})))
    assert len(smaller) <= 280 < len(retrained)


# ---------------------------------------------------------------- blocks


def test_blocks_equal_pack_stream_and_collate():
    """The numpy blocks are data.pack_stream exactly (documents longer than a block, empty ones, a short tail)."""
    import numpy as np

    from tunelab.data import Packed, collate, pack_stream
    from tunelab.objectives.pretrain import Blocks, Corpus

    rng = random.Random(1)
    docs = [[rng.randrange(10, 99) for _ in range(n)] for n in (0, 3, 40, 1, 17, 16, 15, 0, 33, 2)]
    bos, eos, length = 1, 2, 16
    expected = list(pack_stream(([bos] + d for d in docs), length, eos))
    flat = [t for d in docs for t in [bos] + d + [eos]]
    starts = np.zeros(len(flat), dtype=bool)
    starts[np.cumsum([0] + [len(d) + 2 for d in docs[:-1]])] = True
    blocks = Blocks(Corpus(np.array(flat, dtype=np.int32), starts, None, len(docs)), length)
    got = [blocks.packed(i) for i in range(len(blocks))]
    assert len(got) == len(expected) == -(-len(flat) // length) and len(got[-1].input_ids) < length
    assert got == expected
    a, b = collate(got, 0), collate(expected, 0)
    assert all(torch.equal(a[k], b[k]) for k in a) and set(a) == set(b)
    assert isinstance(got[0], Packed)


def test_eval_split_holds_out_documents_or_the_last_blocks_of_one(tokenizers, corpus, tmp_path):
    from tunelab.objectives import make_objective

    tok = tokenizers["llama"]
    many = make_objective(load_config(data=_cfg(corpus, tmp_path, data={"eval_fraction": 0.1})), tok)
    train, evals = many.datasets()
    assert many.stats["documents"] == 36 and many.stats["eval_documents"] == 4  # whole documents
    single = tmp_path / "one"
    single.mkdir()
    (single / "book.txt").write_text(_words(random.Random(2), 400), encoding="utf-8")
    one = make_objective(load_config(data=_cfg(single, tmp_path, data={"eval_fraction": 0.25})), tok)
    train, evals = one.datasets()
    n = len(train) + len(evals)
    assert len(evals) == round(n * 0.25) and len(train) == n - len(evals)
    ids = [t for ref in [*train, *evals] for t in ref.blocks.packed(ref.index).input_ids]
    assert ids == [tok.bos_token_id] + tok.encode(_words(random.Random(2), 400), add_special_tokens=False) + [tok.eos_token_id]


def test_corpus_tokenization_matches_per_document_encoding(tokenizers):
    from tunelab.objectives.pretrain import tokenize_corpus

    tok = tokenizers["llama"]
    texts = ["apple river </s> stone", "", "日本語 🙂", "cloud green music"]
    corpus = tokenize_corpus(texts, tok, [1], [2], word_starts=True)
    expected = [t for text in texts for t in [1] + tok.encode(text, add_special_tokens=False, split_special_tokens=True) + [2]]
    assert corpus.ids.tolist() == expected and corpus.docs == 4
    assert corpus.doc_start.sum() == 4 and corpus.ids[corpus.doc_start].tolist() == [1] * 4
    # a word starts at every 'Ġ' token (space-separated words), at every document boundary, never inside a word
    tokens = tok.convert_ids_to_tokens(corpus.ids.tolist())
    for i, token in enumerate(tokens):
        if token.startswith("Ġ") or corpus.ids[i] in (1, 2):
            assert corpus.word_start[i], (i, token)
    pieces = tok.convert_ids_to_tokens(tok.encode("marble", add_special_tokens=False))
    word = tokenize_corpus(["marble"], tok, [1], [2], word_starts=True).word_start.tolist()
    assert word == [True, True] + [False] * (len(pieces) - 1) + [True]


# ---------------------------------------------------------------- document isolation


def _loss_on(objective, model, batch, positions: torch.Tensor) -> torch.Tensor:
    """The objective's loss restricted to label positions `positions` (a bool [B, T])."""
    masked = dict(batch, labels=batch["labels"].masked_fill(~positions, -100))
    with torch.no_grad():
        return objective.loss(model, masked)[0]


@pytest.mark.parametrize("method", ["pretrain", "mlm"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_documents_do_not_see_each_other(tokenizers, corpus, tmp_path, method, attn):
    """Document A then document B in one block: changing A's tokens leaves B's loss (through the objective)
    bit-identical; without the document mask the same change does move it (so the test can fail)."""
    import numpy as np

    from tunelab.modeling.scratch import build_model
    from tunelab.objectives import make_objective
    from tunelab.objectives.pretrain import BlockList, Blocks, tokenize_corpus

    arch = "llama" if method == "pretrain" else "bert"
    tok = tokenizers[arch]
    cfg = load_config(data=_cfg(corpus, tmp_path, method, arch, data={"max_length": 64}))
    torch.manual_seed(0)
    model = build_model(cfg.model.init, tok, "causal_lm" if arch == "llama" else "masked_lm").eval()
    model.set_attn_implementation(attn)
    objective = make_objective(cfg, tok)
    objective.setup(model)
    prefix, suffix = objective.wrap_ids()
    corpus_ = tokenize_corpus(["apple river stone cloud green music paper", "light table window garden silver"],
                              tok, prefix, suffix)
    doc = np.cumsum(corpus_.doc_start) - 1
    a, b = torch.from_numpy(doc == 0), torch.from_numpy(doc == 1)
    blocks = Blocks(corpus_, 64)
    assert len(blocks) == 1  # both documents in one block
    torch.manual_seed(1)
    batch = objective.collate(BlockList(blocks)[:1])
    if method == "mlm":  # deterministic selection: every non-special token of B carries a label
        special = objective.special[torch.from_numpy(corpus_.ids.astype("int64"))]
        batch["labels"] = torch.where(b & ~special, torch.from_numpy(corpus_.ids.astype("int64")), -100)[None]
        batch["input_ids"] = batch["input_ids"].masked_fill(batch["labels"] != -100, tok.mask_token_id)
    in_b = b[None] & (batch["labels"] != -100)
    assert in_b.sum() >= 4
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    changed["input_ids"][0, a & ~_special_positions(tok, corpus_)] = 100  # a plain byte token
    assert not torch.equal(changed["input_ids"], batch["input_ids"])
    before, after = _loss_on(objective, model, batch, in_b), _loss_on(objective, model, changed, in_b)
    assert before > 0 and torch.equal(before, after)
    # negative control: one shared (causal / bidirectional) attention over the block, positions running on
    T = batch["input_ids"].shape[1]
    shared = torch.ones(T, T, dtype=torch.bool)
    shared = (shared.tril() if method == "pretrain" else shared)[None, None]
    leaky = {k: dict(v, attention_mask=shared, position_ids=torch.arange(T)[None]) for k, v in
             (("before", batch), ("after", changed))}
    assert not torch.equal(_loss_on(objective, model, leaky["before"], in_b), _loss_on(objective, model, leaky["after"], in_b))


def _special_positions(tok, corpus_) -> torch.Tensor:
    ids = torch.from_numpy(corpus_.ids.astype("int64"))
    return torch.isin(ids, torch.tensor(tok.all_special_ids))


# ---------------------------------------------------------------- MLM masking


def test_mlm_masking_statistics_through_the_objective(tokenizers, tmp_path):
    """15 % of non-special tokens selected, 80/10/10, labels exactly at the selected positions; masks re-drawn
    on every visit from the global RNG (so seeding reproduces them); eval masks fixed; whole words together."""
    from tunelab.objectives import make_objective
    from tunelab.objectives.pretrain import BlockList, Blocks, tokenize_corpus

    tok = tokenizers["bert"]
    rng = random.Random(3)
    texts = [_words(rng, rng.randint(20, 80)) for _ in range(300)]
    corpus_dir = tmp_path / "c"
    corpus_dir.mkdir()
    (corpus_dir / "x.txt").write_text("x")
    cfg = load_config(data=_cfg(corpus_dir, tmp_path / "o", "mlm", "bert", data={"max_length": 64}))
    objective = make_objective(cfg, tok)
    prefix, suffix = objective.wrap_ids()
    corpus_ = tokenize_corpus(texts, tok, prefix, suffix, word_starts=True)
    items = BlockList(Blocks(corpus_, 64))[:]
    torch.manual_seed(0)
    batch = objective.collate(items)
    original = torch.full_like(batch["input_ids"], tok.pad_token_id)
    for r, ref in enumerate(items):
        ids = ref.blocks.piece(ref.index).ids
        original[r, :len(ids)] = torch.from_numpy(ids.astype("int64"))
    special = torch.isin(original, torch.tensor(tok.all_special_ids))
    sel = batch["labels"] != -100
    out = batch["input_ids"]
    assert not (sel & special).any() and (out[~sel] == original[~sel]).all()
    assert (batch["labels"][sel] == original[sel]).all() and batch["num_loss_tokens"] == sel.sum()
    n = sel.sum().item()
    assert abs(n / (~special).sum().item() - 0.15) < 0.015, n
    masked = (out[sel] == tok.mask_token_id).float().mean().item()
    same = (out[sel] == original[sel]).float().mean().item()
    assert abs(masked - 0.8) < 0.04 and abs(same - 0.1) < 0.04 and abs(1 - masked - same - 0.1) < 0.04
    # re-drawn on every visit, reproduced by the global seed
    again = objective.collate(items)
    assert not torch.equal(again["labels"], batch["labels"])
    torch.manual_seed(0)
    assert torch.equal(objective.collate(items)["labels"], batch["labels"])
    evals = BlockList(Blocks(corpus_, 64), eval=True)[:8]
    assert torch.equal(objective.collate(evals)["labels"], objective.collate(evals)["labels"])
    # whole words: 'Ġ' starts a word (space-separated words only here); all tokens of a word share the draw
    cfg_ww = load_config(data=_cfg(corpus_dir, tmp_path / "o", "mlm", "bert", data={"max_length": 64},
                                   mlm={"whole_word": True}))
    ww = make_objective(cfg_ww, tok)
    ww_batch = ww.collate(items)
    sel = ww_batch["labels"] != -100
    spaced = torch.tensor([t.startswith("Ġ") for t in tok.convert_ids_to_tokens(list(range(len(tok))))])
    after_special = torch.ones_like(special)
    after_special[:, 1:] = special[:, :-1]
    start = spaced[original] | after_special
    inside = ~start & ~special  # continues the word of the token before it
    inside[:, 0] = False
    prev_sel = torch.zeros_like(sel)
    prev_sel[:, 1:] = sel[:, :-1]
    assert (sel[inside] == prev_sel[inside]).all()
    words, chosen, multi = (start & ~special).sum().item(), (sel & start & ~special).sum().item(), inside.sum().item()
    assert multi > 500 and abs(chosen / words - 0.15) < 0.03


# ---------------------------------------------------------------- training runs


def test_pretraining_from_scratch_lowers_loss_then_continues_from_the_saved_model(corpus, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path / "scratch"
    _train(_cfg(corpus, run, train={"max_steps": 16, "lr": 5e-3}, data={"eval_fraction": 0.1}))
    rows = _metrics(run)
    losses = [r["loss"] for r in rows]
    assert losses[-1] < losses[0] - 1.0, losses  # 5.75 -> 4.22 nats when written
    assert "eval_perplexity" in rows[-1]
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    tok = AutoTokenizer.from_pretrained(run / "final")
    assert model.config.vocab_size == len(tok) and tok.mask_token == "<mask>"
    assert json.loads((run / "tokenizer" / "tunelab-tokenizer.json").read_text())["vocab_size"] == 320
    # continued pretraining: model.path, jsonl rows whose text sits in another column (format defaults to text)
    rows_path = tmp_path / "more.jsonl"
    rng = random.Random(5)
    rows_path.write_text("".join(json.dumps({"body": _words(rng, 30)}) + "\n" for _ in range(16)))
    cont = _cfg(corpus, tmp_path / "cont", model={"path": str(run / "final"), "init": None},
                tokenizer={"train": False}, data={"train": [{"path": str(rows_path), "text_field": "body"}]})
    del cont["model"]["init"]
    _train(cont)
    cont_losses = [r["loss"] for r in _metrics(tmp_path / "cont")]
    assert cont_losses[0] < losses[0] - 0.8, (cont_losses, losses)  # starts where scratch left off, not at random


def test_mlm_from_scratch_trains_saves_and_resumes_exactly(corpus, tmp_path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    run = tmp_path / "mlm"
    cfg = _cfg(corpus, run, "mlm", "bert", mlm={"whole_word": True},
               train={"micro_batch_size": 16, "lr": 1e-2, "max_steps": 8, "save_every": 4, "keep_checkpoints": 3})
    straight = _train(cfg)
    weights = {k: v.detach().clone() for k, v in straight.module.named_parameters()}
    losses = [r["loss"] for r in _metrics(run)]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.5, losses  # 5.77 -> 4.40 nats when written
    model = AutoModelForMaskedLM.from_pretrained(run / "final")
    tok = AutoTokenizer.from_pretrained(run / "final")
    assert (model.config.pad_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id) == (0, 1, 2, 3)
    # resume from step 4, as if the run had died there: masks come from the checkpointed RNG, so the resumed
    # run draws the same masks and ends on the same weights
    shutil.rmtree(run / "checkpoints" / "step-00000008")
    shutil.rmtree(run / "final")
    resumed = _train(cfg, resume=True)
    assert max((weights[k] - v).abs().max().item() for k, v in resumed.module.named_parameters()) < 1e-6
    assert [r["loss"] for r in _metrics(run)] == pytest.approx(losses, abs=1e-6)
