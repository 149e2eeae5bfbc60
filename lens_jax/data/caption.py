"""Dense re-captioning of lens records with an OpenAI-compatible vision-language endpoint.

Lens was trained on images re-captioned densely (about 100 words each) by a vision-language
model (spec section 1: data). ``lens-data caption`` sends every image of a record folder to any
server speaking the OpenAI chat-completions API with image input (vLLM, SGLang, a hosted API):
one ``POST {endpoint}/chat/completions`` per image and prompt kind, the image as a base64
``data:`` URL in an ``image_url`` content part, and writes the records again with the dense
caption in ``caption`` and the short one in ``short_caption`` (the two fields the training
pipeline's caption choice reads); the old captions move to the metadata
(``original_caption``, ``original_short_caption``).

- Concurrency is bounded (``concurrency`` requests in flight, a thread pool; the records are
  read and written in their order, a window of ``4 * concurrency`` images at a time).
- HTTP 429 and 5xx, timeouts and dropped connections are retried ``max_retries`` times with
  exponential backoff (``backoff`` seconds, doubled each time, capped at ``MAX_BACKOFF``), or after
  the ``Retry-After`` the server sends. A reply without a caption (not JSON, no
  ``choices[0].message.content``, empty text) is counted and retried the same way. An image
  whose retries run out (or that the server refuses with another 4xx) is left out of the output
  and counted by reason; run the same command again to retry only those. 401/403/404 stop the
  run (wrong key, model or URL: every request would fail).
- Every caption received is appended at once to a JSONL cache (``CaptionCache``, flushed and
  fsync'd line by line) keyed by record key + prompt kind, with the model and prompt it came
  from; a rerun after a crash or Ctrl-C reuses them, so no image is captioned twice.
- Token usage (the replies' ``usage`` fields) is summed and reported.
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import dataclasses
import email.utils
import hashlib
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from lens_jax.data.records import Example, image_format
from lens_jax.errors import CaptionError, RecordError

log = logging.getLogger(__name__)

# Prompt kinds and the record field each one fills.
DENSE, SHORT = "dense", "short"
PROMPTS = {
    DENSE: ("Describe this image in one dense paragraph of about 100 words, as a caption for "
            "training a text-to-image model. Name every visible object and the background, and "
            "for each give its colour, shape, size, texture and material, and how many there "
            "are. Quote any visible text exactly. Describe the spatial relationships: where each "
            "object is in the frame (left, right, top, bottom, foreground, background) and "
            "relative to the others. Mention the lighting, style and viewpoint. Describe only "
            "what is visible; no speculation, no preamble, no lists."),
    SHORT: ("Write a short caption of this image: one sentence of at most 15 words naming the "
            "main subject and setting. No preamble."),
}
MAX_TOKENS = {DENSE: 300, SHORT: 60}
MAX_BACKOFF = 60.0  # seconds, the longest wait between two tries (Retry-After included)
_MIME = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp", "gif": "image/gif"}

# Why an image is left out (report keys).
HTTP_ERROR = "HTTP error"
MALFORMED = "malformed reply"
TIMEOUT = "timeout or connection error"
_USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")


class _Retry(Exception):
    """A try that may be repeated (``args``: reason, detail, Retry-After header or None)."""


class _Failed(Exception):
    """One request failed for good (``args``: reason, detail)."""


def prompt_digest(kind: str, model: str, prompt: str | None = None) -> str:
    """What a cached caption came from: ``sha256(model, prompt)[:16]`` (a new prompt or model
    does not reuse old captions)."""
    text = json.dumps([model, PROMPTS[kind] if prompt is None else prompt])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def record_key(ex: Example) -> str:
    """The cache key of a record: its id, or the sha256 of its image when it has none."""
    return ex.id or "sha256:" + hashlib.sha256(ex.image_bytes).hexdigest()


class CaptionCache:
    """Append-only JSONL of captions received: one object per line, ``{"key", "kind", "digest",
    "text", "usage"}``. Each line is flushed and fsync'd before the caption is used, so after a
    crash every caption paid for is on disk; a torn last line is ignored on reading."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._entries: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._lock = threading.Lock()
        self.torn_lines = 0
        if os.path.exists(self.path):
            with open(self.path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                        self._entries[(entry["key"], entry["kind"], entry["digest"])] = entry
                    except (json.JSONDecodeError, KeyError, TypeError):
                        self.torn_lines += 1
        self.loaded = len(self._entries)
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        if self.torn_lines:  # start on a fresh line after a torn one
            self._file.write("\n")

    def get(self, key: str, kind: str, digest: str) -> dict[str, Any] | None:
        return self._entries.get((key, kind, digest))

    def add(self, key: str, kind: str, digest: str, text: str, usage: dict[str, int]) -> None:
        entry = {"key": key, "kind": kind, "digest": digest, "text": text, "usage": usage}
        line = json.dumps(entry, ensure_ascii=False) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())
            self._entries[(key, kind, digest)] = entry

    def close(self) -> None:
        self._file.close()


@dataclasses.dataclass
class CaptionConfig:
    endpoint: str               # base URL, e.g. http://127.0.0.1:8000/v1
    model: str
    api_key: str | None = None
    concurrency: int = 8
    max_retries: int = 5
    timeout: float = 120.0      # seconds per request
    backoff: float = 1.0        # first retry delay, doubled each retry

    @property
    def url(self) -> str:
        base = self.endpoint.rstrip("/")
        return base if base.endswith("/chat/completions") else base + "/chat/completions"


@dataclasses.dataclass
class CaptionReport:
    """What a caption run did: images written/left out (by reason), requests, retries, tokens."""

    written: int = 0
    cached: int = 0             # captions taken from the cache
    requests: int = 0
    retries: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    failed: dict[str, list[str]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(list))
    usage: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def count(self, counter: str, key: str, n: int = 1) -> None:
        with self._lock:
            getattr(self, counter)[key] += n

    @property
    def num_failed(self) -> int:
        return sum(len(v) for v in self.failed.values())

    def summary(self) -> dict[str, Any]:
        return {"written": self.written, "cached_captions": self.cached,
                "requests": self.requests, "retries": dict(sorted(self.retries.items())),
                "failed": {k: len(v) for k, v in sorted(self.failed.items())},
                "usage": {k: self.usage[k] for k in _USAGE_KEYS}}

    def format(self, max_listed: int = 5) -> str:
        lines = [f"written: {self.written}", f"left out: {self.num_failed}"]
        for reason, ids in sorted(self.failed.items()):
            lines.append(f"  {reason}: {len(ids)}")
            lines += [f"    {i}" for i in ids[:max_listed]]
            if len(ids) > max_listed:
                lines.append(f"    ... and {len(ids) - max_listed} more")
        if self.failed:
            lines.append("  (run the same command again to retry them; cached captions are reused)")
        lines.append(f"requests: {self.requests} ({self.cached} caption(s) from the cache)")
        if self.retries:
            lines.append("retries: " + ", ".join(f"{k} {v}" for k, v in sorted(self.retries.items())))
        lines.append("tokens this run: " + ", ".join(f"{k} {self.usage[k]}" for k in _USAGE_KEYS))
        return "\n".join(lines)


def request_body(cfg: CaptionConfig, image_bytes: bytes, kind: str) -> dict[str, Any]:
    """The chat-completions request for one image and prompt kind."""
    mime = _MIME.get(image_format(image_bytes), "application/octet-stream")
    data_url = f"data:{mime};base64," + base64.b64encode(image_bytes).decode("ascii")
    return {"model": cfg.model, "max_tokens": MAX_TOKENS[kind], "temperature": 0.0,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_url}},
                {"type": "text", "text": PROMPTS[kind]}]}]}


def parse_reply(body: bytes) -> tuple[str, dict[str, int]]:
    """``(caption, usage)`` from a chat-completions reply; ``ValueError`` saying what is wrong."""
    try:
        reply = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"not JSON ({e})") from None
    try:
        content = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ValueError("no choices[0].message.content") from None
    if isinstance(content, list):  # content parts
        content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str) or not content.strip():
        raise ValueError("empty caption")
    usage = reply.get("usage") if isinstance(reply, dict) else None
    usage = {k: int(usage[k]) for k in _USAGE_KEYS
             if isinstance(usage, dict) and isinstance(usage.get(k), int)}
    return " ".join(content.split()), usage


def retry_delay(attempt: int, backoff: float, retry_after: str | None) -> float:
    """Seconds to wait before try ``attempt + 1``: the server's ``Retry-After`` (seconds or an
    HTTP date) when given, else ``backoff * 2**attempt`` with +-25% jitter; at most
    ``MAX_BACKOFF``."""
    if retry_after is not None:
        try:
            return min(MAX_BACKOFF, max(0.0, float(retry_after)))
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(retry_after).timestamp()
                return min(MAX_BACKOFF, max(0.0, when - time.time()))
            except (TypeError, ValueError):
                pass
    return min(MAX_BACKOFF, backoff * 2 ** attempt * random.uniform(0.75, 1.25))


class Captioner:
    """Sends requests (one ``requests.Session`` per thread) with the retry policy above."""

    def __init__(self, cfg: CaptionConfig, cache: CaptionCache, report: CaptionReport):
        self.cfg, self.cache, self.report = cfg, cache, report
        self.stop = threading.Event()  # set on Ctrl-C or a fatal error: no more retries
        self._local = threading.local()
        self.headers = {"Content-Type": "application/json"}
        if cfg.api_key:
            self.headers["Authorization"] = f"Bearer {cfg.api_key}"

    def _session(self):
        import requests

        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def _post_once(self, body: bytes) -> tuple[str, dict[str, int]]:
        """One try; raises ``_Retry`` (retryable), ``_Failed`` or ``CaptionError``."""
        import requests

        with self.report._lock:
            self.report.requests += 1
        try:
            r = self._session().post(self.cfg.url, data=body, headers=self.headers,
                                     timeout=self.cfg.timeout)
        except (requests.Timeout, requests.ConnectionError) as e:
            raise _Retry(TIMEOUT, type(e).__name__, None) from None
        if r.status_code in (401, 403, 404):
            raise CaptionError(f"{self.cfg.url}: HTTP {r.status_code} ({r.text[:200]!r}); check "
                               "--endpoint, --model and --api-key-env")
        if r.status_code == 429 or r.status_code >= 500:
            raise _Retry(HTTP_ERROR, f"HTTP {r.status_code}", r.headers.get("Retry-After"))
        if r.status_code != 200:
            raise _Failed(HTTP_ERROR, f"HTTP {r.status_code}: {r.text[:200]}")
        try:
            return parse_reply(r.content)
        except ValueError as e:
            raise _Retry(MALFORMED, str(e), None) from None

    def caption(self, ex: Example, kind: str) -> str:
        """The ``kind`` caption of ``ex``, from the cache or the endpoint (then cached)."""
        key, digest = record_key(ex), prompt_digest(kind, self.cfg.model)
        hit = self.cache.get(key, kind, digest)
        if hit is not None:
            with self.report._lock:
                self.report.cached += 1
            return hit["text"]
        body = json.dumps(request_body(self.cfg, ex.image_bytes, kind)).encode("utf-8")
        for attempt in range(self.cfg.max_retries + 1):
            try:
                text, usage = self._post_once(body)
            except _Retry as e:
                reason, detail, retry_after = e.args
                if attempt == self.cfg.max_retries:
                    raise _Failed(reason, f"{detail} after {attempt + 1} tries") from None
                self.report.count("retries", detail if reason == HTTP_ERROR else reason)
                if self.stop.wait(retry_delay(attempt, self.cfg.backoff, retry_after)):
                    raise _Failed("interrupted", detail) from None
                continue
            for k, v in usage.items():
                self.report.count("usage", k, v)
            self.cache.add(key, kind, digest, text, usage)
            return text
        raise AssertionError("unreachable")


def recaption(ex: Example, dense: str, short: str, model: str) -> Example:
    """``ex`` with the new captions; the old ones are kept in the metadata."""
    metadata = ex.metadata_dict()
    metadata.setdefault("original_caption", ex.caption)
    metadata.setdefault("original_short_caption", ex.short_caption)
    metadata["caption_model"] = model
    return dataclasses.replace(ex, caption=dense, short_caption=short,
                               metadata=json.dumps(metadata, ensure_ascii=False, sort_keys=True))


def caption_examples(examples: Iterable[Example], captioner: Captioner,
                     progress: Callable[[int], None] | None = None) -> Iterator[Example]:
    """Re-captioned ``examples``, in order; images that fail are counted in the report and left
    out. At most ``4 * concurrency`` images are held at a time."""
    cfg, report = captioner.cfg, captioner.report
    window = 4 * cfg.concurrency
    pending: collections.deque = collections.deque()

    def finish(ex: Example, futures: dict[str, concurrent.futures.Future]) -> Example | None:
        texts = {}
        failure = None
        for kind, future in futures.items():
            try:
                texts[kind] = future.result()
            except _Failed as e:
                failure = failure or e
        if progress is not None:
            progress(1)
        if failure is not None:
            reason, detail = failure.args
            with report._lock:
                report.failed[reason].append(f"{record_key(ex)} ({detail})")
            return None
        report.written += 1
        return recaption(ex, texts[DENSE], texts[SHORT], cfg.model)

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=cfg.concurrency,
                                                 thread_name_prefix="caption")
    try:
        for ex in examples:
            pending.append((ex, {kind: pool.submit(captioner.caption, ex, kind)
                                 for kind in (DENSE, SHORT)}))
            while len(pending) >= window or (pending and all(
                    f.done() for f in pending[0][1].values())):
                done = finish(*pending.popleft())
                if done is not None:
                    yield done
        while pending:
            done = finish(*pending.popleft())
            if done is not None:
                yield done
    finally:
        # Ctrl-C or a fatal error: drop what has not started, stop waiting to retry; requests in
        # flight finish (their captions still reach the cache).
        captioner.stop.set()
        pool.shutdown(wait=True, cancel_futures=True)


def caption_records(records_path: str, out_dir: str, cfg: CaptionConfig, cache_path: str,
                    num_shards: int | None = None, overwrite: bool = False,
                    show_progress: bool = False) -> CaptionReport:
    """Re-captions every record of ``records_path`` into ``out_dir`` (atomic: nothing is left
    under ``out_dir`` unless the run completes); returns the report. ``num_shards`` defaults to
    the input's shard count."""
    from lens_jax.data.records import decode_example, list_shards, open_source, write_shards

    shards = list_shards(records_path)
    source = open_source(shards)
    cache = CaptionCache(cache_path)
    if cache.torn_lines:
        log.warning("%s: ignored %d torn line(s) (a run killed while writing)", cache_path,
                    cache.torn_lines)
    report = CaptionReport()
    captioner = Captioner(cfg, cache, report)
    bar = None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(source), desc="caption", unit="img")

    def progress(n: int) -> None:
        if bar is not None:
            bar.update(n)
            bar.set_postfix(failed=report.num_failed, retries=sum(report.retries.values()),
                            tokens=report.usage["total_tokens"], refresh=False)

    def examples() -> Iterator[Example]:
        for i in range(len(source)):
            try:
                yield decode_example(source[i])
            except RecordError as e:
                with report._lock:
                    report.failed["bad record"].append(f"record {i}: {e}")
                progress(1)

    class _NothingWritten(Exception):
        pass

    def checked() -> Iterator[Example]:
        yield from caption_examples(examples(), captioner, progress)
        if report.written == 0:
            raise _NothingWritten

    try:
        write_shards(checked(), out_dir, num_shards or len(shards), overwrite=overwrite,
                     extra_manifest=lambda: {"caption": {
                         "model": cfg.model, "endpoint": cfg.endpoint,
                         "prompts": {k: prompt_digest(k, cfg.model) for k in PROMPTS},
                         **report.summary()}})
    except _NothingWritten:
        raise RecordError(f"{records_path}: no image was captioned, nothing written\n"
                          f"{report.format()}") from None
    finally:
        if bar is not None:
            bar.close()
        cache.close()
    return report
