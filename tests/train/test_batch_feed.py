"""``loop.BatchFeed``: the background thread that reads and prepares batches ahead of the step."""

import os
import sys
import threading

import pytest

from lens_jax.train.loop import BatchFeed


class _Iter:
    """A data iterator of ``n`` numbered batches, with the state and metrics the feed copies."""

    def __init__(self, n, fail_at=None, on_next=None):
        self.i, self.n, self.fail_at, self.on_next = 0, n, fail_at, on_next

    def __iter__(self):
        return self

    def __next__(self):
        if self.on_next is not None:
            self.on_next()
        if self.i == self.fail_at:
            raise RuntimeError(f"bad batch {self.i}")
        if self.i >= self.n:
            raise StopIteration
        self.i += 1
        return {"x": self.i - 1}

    def get_state(self):
        return {"next": self.i}

    def metrics(self):
        return {"batches": self.i}


def test_batches_come_prepared_in_order_then_none():
    feed = BatchFeed(_Iter(5), prepare=lambda b: {"x": b["x"] * 10}, depth=2)
    try:
        items = [feed.next() for _ in range(5)]
        assert [it.batch["x"] for it in items] == [0, 10, 20, 30, 40]
        assert [it.data_state["next"] for it in items] == [1, 2, 3, 4, 5]
        assert feed.next() is None and feed.next() is None  # the end stays the end
    finally:
        feed.close()


def test_an_error_in_the_thread_is_raised_by_next():
    feed = BatchFeed(_Iter(5, fail_at=2), prepare=lambda b: b)
    try:
        assert feed.next().batch["x"] == 0 and feed.next().batch["x"] == 1
        with pytest.raises(RuntimeError, match="bad batch 2"):
            feed.next()
    finally:
        feed.close()


def _nice(tid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, tid)  # Linux: a thread id gives that thread's nice


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
@pytest.mark.parametrize("nice", [0, 7])
def test_feed_nice_lowers_the_feed_thread_and_the_threads_it_starts_only(nice):
    seen = {}

    def record():  # runs in the feed thread; so does a thread it starts (grain's read threads)
        if "feed" not in seen:
            seen["feed"] = _nice(threading.get_native_id())
            child = threading.Thread(target=lambda: seen.update(child=_nice(threading.get_native_id())))
            child.start()
            child.join()

    main = _nice(threading.get_native_id())
    feed = BatchFeed(_Iter(3, on_next=record), prepare=lambda b: b, nice=nice)
    try:
        assert feed.next() is not None
    finally:
        feed.close()
    assert seen == {"feed": min(main + nice, 19), "child": min(main + nice, 19)}
    assert _nice(threading.get_native_id()) == main
