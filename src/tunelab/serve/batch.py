"""One batched generation: the requests' types, and a left-padded `generate` call over rows that each keep their own
max_tokens, stop strings, temperature, top_p and seeded generator, and deliver their text as it comes."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.logits_process import TopPLogitsWarper


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


class Row:
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

    def __init__(self, rows: list[Row]):
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

    def __init__(self, rows: list[Row]):
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


def generate_batch(model, rows: list[Row], stop_ids: list[int], pad_id: int | None, vocab: int | None) -> None:
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
