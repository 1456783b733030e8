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
import threading
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tunelab.config import UserError

from .batch import Job, Request, Row, generate_batch

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
    from tunelab.modeling.infer import run_template
    from tunelab.modeling.load import adapter_kind, is_adapter_dir, resolve_model_dir

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

    def unload(self, path: Path) -> None:
        """Forget a model whose files are being deleted: an adapter dir or a base dir no request will name again.
        Its adapter leaves the base (as an LRU eviction does), so no later load reads its deleted files."""
        path = Path(path).resolve()
        with self._table:
            for key in [k for k in self._lru if path in k]:  # a base takes its adapters with it
                del self._lru[key]
            bases = [b for b in self._bases.values() if path in b.adapters or b.path == path]
        for base in bases:
            with base.lock:
                if base.path == path:
                    with self._table:
                        self._bases.pop(path, None)
                    base.model, base.adapters, base.tokenizers = None, {}, {}
                else:
                    self._drop_evicted_adapters(base)

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
        from tunelab.modeling.load import load_pretrained, load_tokenizer

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
        """Take the adapters off, give the base rows for every token of `grow_to` (modeling/load.py: grow_to_tokenizer)
        if given, and put them back with the new one, those without trainable token rows first."""
        from tunelab.modeling.load import grow_to_tokenizer

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
        from tunelab.modeling.infer import prompt_ids

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
            rows.append(Row(job, ids, set(stop_ids), tokenizer, base.model.device))
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
            generate_batch(model, rows, stop_ids, tokenizer.pad_token_id, vocab if base.rows > vocab else None)
        for row in rows:  # rows that generate ended without a verdict (it stops at the longest max_tokens)
            if not row.done:
                row.finish("length")


def _trains_tokens(adapter: Path) -> bool:
    """Whether the adapter carries embedding rows for tokens its run added (PEFT trainable tokens)."""
    return bool(json.loads((adapter / "adapter_config.json").read_text()).get("trainable_token_indices"))
