"""The model pool behind the OpenAI-compatible routes: lazy loading, LoRA hot-swap, LRU eviction, batched generation.

- A tuned model is a base model dir plus, for LoRA runs, an adapter dir (`target_of`). Every adapter over one base
  is loaded into that base's single PeftModel under its own name (`load_adapter`) and picked per batch with
  `set_adapter`; the base itself runs with the adapters disabled. So many adapters keep one base in memory.
- `max_loaded` bounds the resident models, a base and each adapter counting one. When a request needs a model that is
  not resident, the least recently used ones that no running request holds are unloaded first (an adapter with
  `delete_adapter`, a base with all its adapters). Models held by running requests are never unloaded, so while
  they run the count can exceed the bound.
- Generation runs in worker threads, never on the event loop, one batch at a time per base (a lock per base:
  `set_adapter` mutates the model). Requests for the same model and adapter and of the same kind (chat or
  completion) that arrive within `window_s`, or while the base is busy, run as one left-padded `generate` call; each
  row keeps its own max_tokens, stop strings, temperature, top_p and seeded generator, and each row's answer is
  delivered as soon as that row ends. Greedy rows of a batch equal the same requests run one by one (tested).
- Prompt ids and stop tokens are tunelab generate's (`infer.prompt_ids`, `data.stop_token_ids`), so greedy output
  equals `tunelab generate` token for token.
"""

from __future__ import annotations

import asyncio
import gc
import json
import random
import threading
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.logits_process import TopPLogitsWarper

from tunelab.config import UserError

MAX_BATCH = 32  # rows per generate call; more waiting requests run in the next call


@dataclass(frozen=True)
class Target:
    """What serving one model needs: its base model dir, the LoRA adapter dir on it (None: the base itself), where
    its tokenizer is, and the chat template its run was trained with."""
    base: Path
    adapter: Path | None
    tokenizer: Path
    template: str


def target_of(path: Path) -> Target:
    """A run dir (its final/), an adapter dir or a model dir -> its Target, read from the files alone."""
    from tunelab.infer import run_template
    from tunelab.model import adapter_kind, is_adapter_dir, resolve_model_dir

    model_dir = resolve_model_dir(str(path)).resolve()
    if not is_adapter_dir(model_dir):
        return Target(model_dir, None, model_dir, run_template(model_dir))
    if adapter_kind(model_dir) != "causal_lm":
        raise UserError(f"{path}: a reward-model adapter scores text, it does not generate; it cannot be served")
    base = Path(json.loads((model_dir / "adapter_config.json").read_text())["base_model_name_or_path"])
    if not (base / "config.json").is_file():
        raise UserError(f"{path}: its base model {base} is not a local model dir")
    has_tokenizer = (model_dir / "tokenizer_config.json").is_file()
    return Target(base.resolve(), model_dir, model_dir if has_tokenizer else base.resolve(), run_template(model_dir))


@dataclass
class Request:
    """One completion: chat `messages`, or a raw-text `prompt` (completions, no template)."""
    messages: list[dict] | None = None
    prompt: str | None = None
    max_tokens: int = 128
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False


@dataclass
class Result:
    text: str
    finish_reason: str  # "stop" (end of turn or a stop string) | "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int  # tokens generated, the end-of-turn token included


class Job:
    """A submitted request: its events (text deltas when streamed, then the Result, or an exception) arrive on an
    asyncio queue filled from the worker thread."""

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop):
        self.request, self.loop = request, loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = False  # the client went away: its row stops at the next token

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    async def next(self) -> str | Result:
        item = await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    async def result(self) -> Result:
        while not isinstance(item := await self.next(), Result):
            pass
        return item


class _Base:
    """One resident base model, its adapters (adapter dir -> peft adapter name) and tokenizers."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()  # held while loading, swapping adapters and generating
        self.model = None  # the transformers model, a PeftModel once an adapter is loaded
        self.rows = 0  # its embedding rows now, and as saved: an adapter whose run added tokens grows the base
        self.saved_rows = 0
        self.adapters: dict[Path, str] = {}
        self.tokenizers: dict[Path, object] = {}


class Engine:
    """The pool: `submit(target, request)` from the event loop; batches run in worker threads (module docstring)."""

    def __init__(self, max_loaded: int = 4, window_s: float = 0.01, workers: int = 8):
        if max_loaded < 1:
            raise UserError(f"max_loaded must be at least 1, got {max_loaded}")
        self.max_loaded, self.window_s = max_loaded, window_s
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tunelab-generate")
        self._table = threading.Lock()  # guards _bases, _lru, _users and the accounting below
        self._bases: dict[Path, _Base] = {}
        self._lru: OrderedDict[tuple[Path, Path | None], None] = OrderedDict()  # (base, adapter or None), oldest first
        self._users: Counter = Counter()  # running requests per (base, adapter) key: never evicted while > 0
        self._open: dict[tuple[Target, str], list[Job]] = {}  # requests waiting for their batch
        self._open_lock = threading.Lock()
        self._names = 0
        self.loads: Counter = Counter()  # (base, adapter or None) -> times loaded
        self.batch_sizes: Counter = Counter()  # rows per generate call -> calls

    # ------------------------------------------------------------ submitting (event loop side)

    def submit(self, target: Target, request: Request) -> Job:
        """Queue a request; call from the event loop. The job's events tell what happens."""
        loop = asyncio.get_running_loop()
        job = Job(request, loop)
        key = (target, "chat" if request.messages is not None else "completion")
        with self._open_lock:
            waiting = self._open.setdefault(key, [])
            waiting.append(job)
            first = len(waiting) == 1
        if first:  # the batch of everything that arrives for this key until its base is free
            loop.call_later(self.window_s, self._pool.submit, self._drain, key)
        return job

    def resident(self) -> list[tuple[Path, Path | None]]:
        """The models in memory now: (base, None) per base, (base, adapter) per adapter."""
        with self._table:
            return [(b.path, a) for b in self._bases.values() if b.model is not None for a in [None, *list(b.adapters)]]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------ the worker side

    def _drain(self, key: tuple[Target, str]) -> None:
        """Run the waiting requests of `key` as one batch (in a worker thread)."""
        target, kind = key
        try:
            base = self._checkout(target)
        except BaseException as e:  # noqa: BLE001 - every waiting request gets the error
            self._fail(self._take(key), e)
            return
        try:
            with base.lock:
                jobs = self._take(key)
                if jobs:
                    try:
                        self._load(base, target)
                        self._run(base, target, kind, jobs)
                    except BaseException as e:  # noqa: BLE001
                        self._fail(jobs, e)
                        self._forget_unloaded(base, target)
                self._drop_evicted_adapters(base)
        finally:
            self._release(target)

    def _take(self, key) -> list[Job]:
        with self._open_lock:
            jobs = self._open.pop(key, [])
            if len(jobs) > MAX_BATCH:  # the rest go in the next call
                self._open[key] = jobs[MAX_BATCH:]
                self._pool.submit(self._drain, key)
                jobs = jobs[:MAX_BATCH]
        return [j for j in jobs if not j.cancelled]

    @staticmethod
    def _fail(jobs: list[Job], error: BaseException) -> None:
        for job in jobs:
            job.put(error)

    def _keys(self, target: Target) -> list[tuple[Path, Path | None]]:
        return [(target.base, None)] + ([(target.base, target.adapter)] if target.adapter else [])

    def _checkout(self, target: Target) -> _Base:
        """Mark the target's base (and adapter) in use and most recently used; unload LRU models over the bound."""
        with self._table:
            base = self._bases.setdefault(target.base, _Base(target.base))
            for key in self._keys(target):
                self._lru[key] = None
                self._lru.move_to_end(key)
                self._users[key] += 1
            self._evict()
        return base

    def _release(self, target: Target) -> None:
        with self._table:
            for key in self._keys(target):
                self._users[key] -= 1

    def _evict(self) -> None:
        """Unload least recently used models not in use until at most max_loaded are resident (under _table)."""
        while len(self._lru) > self.max_loaded:
            victim = next((k for k in self._lru if not self._users[k]), None)
            if victim is None:
                return  # everything left is in use
            base_path, adapter = victim
            if adapter is not None:  # deleted under the base's lock, by its next user if it is busy now
                del self._lru[victim]
                base = self._bases[base_path]
                if not self._users[(base_path, None)]:
                    with base.lock:
                        self._delete_adapter(base, adapter)
                continue
            for key in [k for k in self._lru if k[0] == base_path]:
                del self._lru[key]
            base = self._bases.pop(base_path)
            base.model, base.adapters, base.tokenizers = None, {}, {}  # nobody holds it: users == 0
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _forget_unloaded(self, base: _Base, target: Target) -> None:
        """After a failed load, stop counting what did not load (under base.lock)."""
        with self._table:
            if base.model is None:
                for key in [k for k in self._lru if k[0] == base.path]:
                    del self._lru[key]
            elif target.adapter is not None and target.adapter not in base.adapters:
                self._lru.pop((base.path, target.adapter), None)

    def _drop_evicted_adapters(self, base: _Base) -> None:
        """Delete the adapters evicted while this base was busy (under base.lock)."""
        with self._table:
            stale = [a for a in base.adapters if (base.path, a) not in self._lru]
        for adapter in stale:
            self._delete_adapter(base, adapter)

    def _delete_adapter(self, base: _Base, adapter: Path) -> None:
        name = base.adapters.pop(adapter, None)
        if name is None:
            return
        base.tokenizers.pop(adapter, None)
        if base.adapters:
            base.model.delete_adapter(name)
        else:  # the last one: back to the plain model, no LoRA layers left
            base.model = base.model.unload()

    def _load(self, base: _Base, target: Target) -> None:
        """Load what `target` needs into `base` (under base.lock)."""
        from tunelab.model import load_pretrained, load_tokenizer

        if base.model is None:
            try:
                base.model, base.tokenizers[base.path] = load_pretrained(str(base.path))
            except (OSError, ValueError) as e:
                raise UserError(f"{base.path}: could not load the model ({str(e).splitlines()[0]})") from None
            base.rows = base.saved_rows = base.model.get_input_embeddings().weight.shape[0]
            self._count_load((base.path, None))
        if target.tokenizer not in base.tokenizers:
            base.tokenizers[target.tokenizer] = load_tokenizer(str(target.tokenizer))
        if target.adapter is not None and target.adapter not in base.adapters:
            self._names += 1
            name = f"adapter{self._names}"  # unique per load: an evicted adapter's name is never reused
            tokenizer = base.tokenizers[target.tokenizer]
            grow = len(tokenizer) > base.rows  # its run added tokens (e.g. ChatML's): more rows, as load_pretrained
            # PEFT cannot add an adapter without token rows once another one's token rows wrap the embedding
            clash = not _trains_tokens(target.adapter) and any(map(_trains_tokens, base.adapters))
            if grow or clash:
                self._rebuild(base, target.adapter, name, tokenizer if grow else None)
            else:
                self._attach(base, target.adapter, name)
                base.adapters[target.adapter] = name
            self._count_load((base.path, target.adapter))

    @staticmethod
    def _attach(base: _Base, adapter: Path, name: str) -> None:
        try:
            if base.adapters:
                base.model.load_adapter(str(adapter), adapter_name=name)
            else:
                from peft import PeftModel

                base.model = PeftModel.from_pretrained(base.model, str(adapter), adapter_name=name)
        except (OSError, ValueError, RuntimeError) as e:
            raise UserError(f"{adapter}: could not load the adapter ({str(e).splitlines()[0]})") from None
        base.model.eval()

    def _rebuild(self, base: _Base, adapter: Path, name: str, grow_to) -> None:
        """Take the adapters off, give the base rows for every token of `grow_to` (tunelab.model.grow_to_tokenizer)
        if given, and put them back with the new one, those without trainable token rows first."""
        from tunelab.model import grow_to_tokenizer

        loaded = {**base.adapters, adapter: name}
        if base.adapters:
            base.model, base.adapters = base.model.unload(), {}
        if grow_to is not None:
            base.model = grow_to_tokenizer(base.model, grow_to)
            base.rows = base.model.get_input_embeddings().weight.shape[0]
        for path in sorted(loaded, key=_trains_tokens):
            self._attach(base, path, loaded[path])
            base.adapters[path] = loaded[path]

    def _count_load(self, key) -> None:
        with self._table:
            self.loads[key] += 1

    def _run(self, base: _Base, target: Target, kind: str, jobs: list[Job]) -> None:
        from tunelab.data import stop_token_ids
        from tunelab.infer import prompt_ids

        tokenizer = base.tokenizers[target.tokenizer]
        template = target.template if kind == "chat" else "none"  # completions: the raw prompt, as --template none
        stop_ids = stop_token_ids(template, tokenizer)
        context = getattr(base.model.config, "max_position_embeddings", None)
        rows = []
        for job in jobs:
            r = job.request
            try:
                messages = r.messages if kind == "chat" else [{"role": "user", "content": r.prompt}]
                ids = prompt_ids(tokenizer, messages, template)
                if context and len(ids) + r.max_tokens > context:
                    raise UserError(f"the prompt ({len(ids)} tokens) plus max_tokens ({r.max_tokens}) exceeds the "
                                    f"model's context of {context} tokens")
            except UserError as e:
                job.put(e)
                continue
            rows.append(_Row(job, ids, set(stop_ids), tokenizer, base.model.device))
        if not rows:
            return
        model = base.model
        if target.adapter is not None:
            model.set_adapter(base.adapters[target.adapter], inference_mode=True)
            adapters_off = nullcontext()
        else:
            adapters_off = model.disable_adapter() if base.adapters else nullcontext()
        with self._table:
            self.batch_sizes[len(rows)] += 1
        # Rows the base grew for another adapter's added tokens are no tokens of this model: never pick them
        vocab = max(base.saved_rows, len(tokenizer))
        with adapters_off, torch.inference_mode():
            _generate(model, rows, stop_ids, tokenizer.pad_token_id, vocab if base.rows > vocab else None)
        for row in rows:  # rows that generate ended without a verdict (it stops at the longest max_tokens)
            if not row.done:
                row.finish("length")


def _trains_tokens(adapter: Path) -> bool:
    """Whether the adapter carries embedding rows for tokens its run added (PEFT trainable tokens)."""
    return bool(json.loads((adapter / "adapter_config.json").read_text()).get("trainable_token_indices"))


# ---------------------------------------------------------------- one batch

class _Row:
    """One request in a batch: takes its tokens one by one, cuts at stop tokens or stop strings, streams text."""

    def __init__(self, job: Job, ids: list[int], stop_ids: set[int], tokenizer, device):
        r = job.request
        self.job, self.ids, self.stop_ids, self.tokenizer = job, ids, stop_ids, tokenizer
        self.max_tokens, self.stops, self.stream = r.max_tokens, r.stop, r.stream
        self.temperature, self.top_p = r.temperature, r.top_p
        self.generator = None
        if r.temperature > 0:  # each request its own random stream: the same seed gives the same sample
            self.generator = torch.Generator(device).manual_seed(r.seed if r.seed is not None else
                                                                 random.randrange(2**63))
        self.new: list[int] = []
        self.text, self.sent = "", 0
        self.done = False

    def push(self, token: int) -> None:
        if self.job.cancelled:
            self.done = True
            return
        if token in self.stop_ids:
            self.finish("stop", ended_turn=True)
            return
        self.new.append(token)
        self.text = self.tokenizer.decode(self.new, skip_special_tokens=True)
        cut = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            self.finish("stop")
        elif len(self.new) >= self.max_tokens:
            self.finish("length")
        elif self.stream:
            self._send(self._safe_end())

    def _safe_end(self) -> int:
        """How much of the text can be sent: not a partial UTF-8 character, not the start of a stop string, not
        trailing whitespace (a detokenizer may still join it to what follows)."""
        text = self.text
        end = len(text.rstrip("\ufffd").rstrip())
        for s in self.stops:
            for k in range(min(len(s) - 1, end), 0, -1):
                if text[:end].endswith(s[:k]):
                    end -= k
                    break
        return end

    def _send(self, end: int) -> None:
        if end > self.sent:
            self.job.put(self.text[self.sent:end])
            self.sent = end

    def finish(self, reason: str, ended_turn: bool = False) -> None:
        self.done = True
        if self.stream:
            self._send(len(self.text))
        tokens = len(self.new) + (1 if ended_turn else 0)
        self.job.put(Result(self.text, reason, len(self.ids), tokens))


class _Steps(StoppingCriteria):
    """Called by generate after every token: feeds each row its token and says which rows are done."""

    def __init__(self, rows: list[_Row]):
        self.rows = rows

    def __call__(self, input_ids, scores, **kwargs):
        for row, token in zip(self.rows, input_ids[:, -1].tolist()):
            if not row.done:
                row.push(token)
        return torch.tensor([row.done for row in self.rows], device=input_ids.device)


class _Mask(LogitsProcessor):
    def __init__(self, vocab: int):
        self.vocab = vocab

    def __call__(self, input_ids, scores):
        scores[:, self.vocab:] = float("-inf")
        return scores


class _Sampler(LogitsProcessor):
    """Per-row sampling inside a greedy generate: a sampled row's logits become one-hot on the token drawn with that
    row's temperature, top_p and generator, which argmax then picks; greedy rows are left alone."""

    def __init__(self, rows: list[_Row]):
        self.rows = rows

    def __call__(self, input_ids, scores):
        for i, row in enumerate(self.rows):
            if row.generator is None or row.done:
                continue
            logits = scores[i:i + 1] / row.temperature
            if row.top_p < 1.0:
                logits = TopPLogitsWarper(row.top_p)(input_ids[i:i + 1], logits)
            token = torch.multinomial(logits.softmax(-1), 1, generator=row.generator).item()
            scores[i] = float("-inf")
            scores[i, token] = 0.0
        return scores


def _generate(model, rows: list[_Row], stop_ids: list[int], pad_id: int | None, vocab: int | None) -> None:
    """One left-padded generate call over the rows; the rows collect their own tokens as they come. `vocab`: token
    ids from there on are masked out."""
    pad = pad_id if pad_id is not None else stop_ids[0]
    length = max(len(row.ids) for row in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, length - len(row.ids):] = torch.tensor(row.ids)
        mask[i, length - len(row.ids):] = 1
    processors = LogitsProcessorList(([_Mask(vocab)] if vocab else []) +
                                     ([_Sampler(rows)] if any(r.generator for r in rows) else []))
    model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                   max_new_tokens=max(row.max_tokens for row in rows), eos_token_id=stop_ids, pad_token_id=pad,
                   do_sample=False, temperature=None, top_p=None, top_k=None, logits_processor=processors,
                   stopping_criteria=StoppingCriteriaList([_Steps(rows)]))
