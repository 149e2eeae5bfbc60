"""``lens-data caption`` against a fake OpenAI-compatible server on 127.0.0.1 (issue 17 point 3):
deterministic answers, injected 429s, 500s, timeouts and malformed replies, resume after a crash."""

import base64
import collections
import hashlib
import http.server
import io
import json
import os
import signal
import threading
import time

import pytest
from PIL import Image

from lens_jax.data import caption, cli, records
from lens_jax.data.records import Example


def _png(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8 + i, 8), (40 * i, 10, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:8]


def answer(sha: str, kind: str) -> str:
    """What the fake model says about an image (by the sha of its bytes) for a prompt kind."""
    if kind == caption.DENSE:
        return f"A dense caption of image {sha}: a red square above a blue circle on grey."
    return f"image {sha} short"


class FakeVLM:
    """A chat-completions server on 127.0.0.1. ``faults[(sha, kind)]`` lists what the next
    requests for that image and kind get, one entry each (then normal answers): ``429``
    (Retry-After: 0), ``500``, ``400``, ``timeout`` (a reply later than the client waits),
    ``not_json``, ``no_content``. ``fail_after`` = n: every request after the n-th gets 401."""

    def __init__(self):
        self.faults: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
        self.fail_after: int | None = None
        self.sigint_after: int | None = None  # after answering the n-th request: Ctrl-C
        self.seen: list[tuple[str, str]] = []        # every request: (sha, kind)
        self.answered: collections.Counter = collections.Counter()  # 200 replies with a caption
        self.lock = threading.Lock()
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                parts = body["messages"][0]["content"]
                url = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
                prompt = next(p["text"] for p in parts if p["type"] == "text")
                assert url.startswith("data:image/png;base64,")
                sha = _sha(base64.b64decode(url.split(",", 1)[1]))
                kind = caption.DENSE if "100 words" in prompt else caption.SHORT
                with fake.lock:
                    fake.seen.append((sha, kind))
                    refused = fake.fail_after is not None and len(fake.seen) > fake.fail_after
                    queue = fake.faults[(sha, kind)]
                    fault = queue.pop(0) if queue and not refused else None
                if refused:
                    return self._send(401, b'{"error": "bad key"}')
                if fault in ("429", "500", "400"):
                    return self._send(int(fault), b'{"error": "busy"}',
                                      {"Retry-After": "0"} if fault == "429" else {})
                if fault == "not_json":
                    return self._send(200, b"<html>gateway</html>")
                if fault == "no_content":
                    return self._send(200, json.dumps({"choices": []}).encode())
                if fault == "timeout":
                    time.sleep(0.4)
                text = answer(sha, kind)
                if fault is None:
                    with fake.lock:
                        fake.answered[(sha, kind)] += 1
                reply = {"choices": [{"message": {"role": "assistant", "content": text}}],
                         "usage": {"prompt_tokens": 100, "completion_tokens": len(text.split()),
                                   "total_tokens": 100 + len(text.split())}}
                self._send(200, json.dumps(reply).encode())
                if fake.sigint_after is not None and len(fake.seen) == fake.sigint_after:
                    os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C

            def _send(self, status, payload, headers=None):
                try:
                    self.send_response(status)
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_vlm():
    with FakeVLM() as server:
        yield server


@pytest.fixture
def input_records(tmp_path):
    examples = [Example(image_bytes=_png(i), caption=f"old caption {i}", short_caption="old",
                        width=8 + i, height=8, id=f"img-{i}", source="unit",
                        metadata=json.dumps({"license": "cc0"})) for i in range(5)]
    records.write_shards(examples, tmp_path / "in", num_shards=2)
    return tmp_path / "in", examples


def _caption(capsys, records_dir, out, server, *extra):
    code = cli.main([str(a) for a in ("caption", "--records", records_dir, "--out", out,
                                      "--endpoint", server.url, "--model", "fake-vlm",
                                      "--concurrency", 3, "--timeout", 0.2, "--backoff", 0.01,
                                      "--no-progress", *extra)])
    stdout, stderr = capsys.readouterr()
    return code, stdout, stderr


def test_caption_retries_faults_and_writes_both_captions(input_records, tmp_path, fake_vlm,
                                                         capsys):
    records_dir, examples = input_records
    sha = [_sha(ex.image_bytes) for ex in examples]
    fake_vlm.faults[(sha[0], "dense")] = ["429", "500"]
    fake_vlm.faults[(sha[1], "short")] = ["timeout", "not_json"]
    fake_vlm.faults[(sha[2], "dense")] = ["no_content"]
    fake_vlm.faults[(sha[3], "dense")] = ["500", "500", "500"]  # more than --max-retries 2
    fake_vlm.faults[(sha[4], "short")] = ["400"]                # refused for good: no retry
    out = tmp_path / "out"
    code, stdout, stderr = _caption(capsys, records_dir, out, fake_vlm, "--max-retries", 2)
    assert code == 0, stderr
    written = {ex.id: ex for ex in records.read_examples(str(out))}
    assert sorted(written) == ["img-0", "img-1", "img-2"]
    for i in range(3):
        ex = written[f"img-{i}"]
        assert ex.caption == answer(sha[i], "dense")
        assert ex.short_caption == answer(sha[i], "short")
        assert ex.image_bytes == examples[i].image_bytes and ex.width == 8 + i
        assert json.loads(ex.metadata) == {"license": "cc0", "caption_model": "fake-vlm",
                                           "original_caption": f"old caption {i}",
                                           "original_short_caption": "old"}
    # Requests: 10 captions + retries (0: 2, 1: 2, 2: 1, 3: 3 tries in all, 4: 1 try of short).
    assert len(fake_vlm.seen) == 10 + 2 + 2 + 1 + 2
    assert "left out: 2" in stdout and "HTTP error: 2" in stdout
    assert "img-3 (HTTP 500 after 3 tries)" in stdout and "img-4 (HTTP 400" in stdout
    summary = records.read_manifest(out)["caption"]
    assert summary["failed"] == {"HTTP error": 2}
    assert summary["retries"] == {"HTTP 429": 1, "HTTP 500": 3, "malformed reply": 2,
                                  "timeout or connection error": 1}
    answered = sum(fake_vlm.answered.values())  # the timed-out reply reached no one
    words = sum(len(answer(s, k).split()) for (s, k), n in fake_vlm.answered.items()
                for _ in range(n))
    assert summary["usage"] == {"prompt_tokens": 100 * answered, "completion_tokens": words,
                                "total_tokens": 100 * answered + words}
    assert f"prompt_tokens {100 * answered}" in stdout
    assert len(records.list_shards(str(out))) == 2  # as many shards as the input

    # A rerun retries only what failed: the captions received come from the cache.
    fake_vlm.seen.clear()
    code, stdout, _ = _caption(capsys, records_dir, tmp_path / "out2", fake_vlm, "--cache",
                               tmp_path / "out.captions.jsonl")
    assert code == 0 and "left out: 0" in stdout
    assert sorted(fake_vlm.seen) == sorted([(sha[3], "dense"), (sha[4], "short")])
    assert {ex.id for ex in records.read_examples(str(tmp_path / "out2"))} == {
        f"img-{i}" for i in range(5)}


def test_crash_and_resume_never_captions_twice(input_records, tmp_path, fake_vlm, capsys):
    records_dir, examples = input_records
    fake_vlm.fail_after = 4  # then 401: the run stops like a crash
    out = tmp_path / "out"
    code, _, stderr = _caption(capsys, records_dir, out, fake_vlm)
    assert code == 2 and "HTTP 401" in stderr and "--api-key-env" in stderr
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out.captions.jsonl"]
    cache_file = tmp_path / "out.captions.jsonl"
    cached = [json.loads(line) for line in cache_file.read_text().splitlines()]
    assert len(cached) == 4
    with open(cache_file, "a") as f:  # a line torn by a kill -9 mid-write
        f.write('{"key": "img-0", "kind": "sh')

    fake_vlm.fail_after = None
    code, stdout, _ = _caption(capsys, records_dir, out, fake_vlm)
    assert code == 0 and "(4 caption(s) from the cache)" in stdout
    # Each image and kind was captioned (answered) once over both runs; the refused requests of
    # the first run were asked again.
    assert len(fake_vlm.answered) == 10 and set(fake_vlm.answered.values()) == {1}
    assert len(fake_vlm.seen) > 10
    assert len(list(records.read_examples(str(out)))) == 5
    assert all(ex.caption.startswith("A dense caption") for ex in records.read_examples(str(out)))


def test_ctrl_c_leaves_no_output_and_resumes(input_records, tmp_path, fake_vlm, capsys):
    records_dir, _ = input_records
    fake_vlm.sigint_after = 3
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        _caption(capsys, records_dir, out, fake_vlm, "--concurrency", 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out.captions.jsonl"]
    cached = len((tmp_path / "out.captions.jsonl").read_text().splitlines())
    assert 3 <= cached < 10
    fake_vlm.sigint_after = None
    code, stdout, _ = _caption(capsys, records_dir, out, fake_vlm)
    assert code == 0 and f"({cached} caption(s) from the cache)" in stdout
    assert len(fake_vlm.answered) == 10 and set(fake_vlm.answered.values()) == {1}


def test_output_guard_and_api_key(input_records, tmp_path, fake_vlm, capsys, monkeypatch):
    records_dir, _ = input_records
    code, _, stderr = _caption(capsys, records_dir, records_dir / "sub", fake_vlm)
    assert code == 2 and "lies inside the input --records" in stderr
    code, _, stderr = _caption(capsys, records_dir, tmp_path / "o", fake_vlm, "--cache",
                               tmp_path / "o" / "c.jsonl")
    assert code == 2 and "contains the input --cache" in stderr
    code, _, stderr = _caption(capsys, records_dir, tmp_path / "o", fake_vlm, "--api-key-env",
                               "LENS_TEST_UNSET_KEY")
    assert code == 2 and "LENS_TEST_UNSET_KEY" in stderr
    assert not (tmp_path / "o").exists()


def test_request_and_reply_format():
    cfg = caption.CaptionConfig(endpoint="http://h/v1/", model="m")
    assert cfg.url == "http://h/v1/chat/completions"
    body = caption.request_body(cfg, _png(1), caption.DENSE)
    image, text = body["messages"][0]["content"]
    assert image["image_url"]["url"] == "data:image/png;base64," + base64.b64encode(
        _png(1)).decode()
    assert text["text"] == caption.PROMPTS[caption.DENSE] and body["model"] == "m"
    reply = {"choices": [{"message": {"content": [{"type": "text", "text": " a  b\nc "}]}}],
             "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
    assert caption.parse_reply(json.dumps(reply).encode()) == (
        "a b c", {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})
    for bad, why in [(b"nope", "not JSON"), (b"{}", "no choices"),
                     (b'{"choices": [{"message": {"content": "  "}}]}', "empty caption")]:
        with pytest.raises(ValueError, match=why):
            caption.parse_reply(bad)


def test_retry_delay():
    assert caption.retry_delay(3, 1.0, "0") == 0.0
    assert caption.retry_delay(0, 1.0, "2.5") == 2.5
    assert caption.retry_delay(0, 1.0, "9999") == caption.MAX_BACKOFF
    assert 0.75 * 4 <= caption.retry_delay(2, 1.0, None) <= 1.25 * 4
    assert caption.retry_delay(20, 1.0, "garbage") == caption.MAX_BACKOFF
    when = "Wed, 21 Oct 2015 07:28:00 GMT"  # in the past
    assert caption.retry_delay(0, 1.0, when) == 0.0


def test_default_cache_is_local(monkeypatch, tmp_path):
    monkeypatch.setenv("LENS_CACHE_DIR", str(tmp_path / "cache"))
    assert cli.default_caption_cache("gs://bucket/dense/") == str(
        tmp_path / "cache" / "captions" / "bucket" / "dense.captions.jsonl")
    assert cli.default_caption_cache("out/dense/") == "out/dense.captions.jsonl"
