"""The main process's questions to its workers (tables, metrics): each reply belongs to its own
question, whichever thread asks and however late a worker answers."""

from __future__ import annotations

import multiprocessing
import threading

from extproc.ops.workers import Worker, WorkerPool


def _worker(conn, hold_first: threading.Event | None = None) -> threading.Thread:
    """A worker that answers each question with its kind and number; the first answer held until
    `hold_first` is set (a worker too busy to answer in time)."""
    def run() -> None:
        first = True
        while True:
            try:
                asked, kind, *_ = conn.recv()
            except EOFError:
                return
            if kind == "drain":
                return
            if first and hold_first is not None:
                hold_first.wait(10)
            first = False
            conn.send((asked, f"{kind} {asked}"))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_late_reply_is_not_taken_for_the_next_question():
    ours, theirs = multiprocessing.Pipe()
    released = threading.Event()
    worker = _worker(theirs, hold_first=released)
    pool = WorkerPool([Worker(process=None, conn=ours)], reply_timeout_s=0.2)
    assert pool._ask("metrics") == ["no answer"]  # the worker holds its answer past the timeout
    released.set()  # its answer to question 1 now arrives, before the answer to question 2
    assert pool._ask("metrics") == ["metrics 2"]
    assert pool._ask("table") == ["table 3"]
    ours.send((0, "drain"))
    worker.join(5)


def test_questions_from_two_threads_get_their_own_replies():
    """The event loop hands over tables while the /metrics thread asks for samples."""
    pipes = [multiprocessing.Pipe() for _ in range(2)]
    workers = [_worker(theirs) for _, theirs in pipes]
    pool = WorkerPool([Worker(process=None, conn=ours) for ours, _ in pipes], reply_timeout_s=5)
    wrong: list = []

    def ask(kind: str) -> None:
        for _ in range(200):
            replies = pool._ask(kind)
            if len({r.split()[1] for r in replies}) != 1 or any(not r.startswith(kind) for r in replies):
                wrong.append(replies)

    threads = [threading.Thread(target=ask, args=(kind,), daemon=True) for kind in ("table", "metrics")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a question never got its reply"
    assert wrong == []
    for ours, _ in pipes:
        ours.send((0, "drain"))
    for w in workers:
        w.join(5)
