"""One BLAS thread wherever a detector computes: a clip's score must not depend on its process's thread count. No ray.

A BLAS product's rounding can depend on how many threads share it (OpenBLAS's Haswell and Zen kernels split a
product's inner dimension differently with 1 and 2 threads; MKL's are not reproducible across thread counts
unless told), so the same clip scored by a driver with 2 BLAS threads and by a Ray actor with 1 differed in the
7th digit. Inside ``one_thread()`` every BLAS and OpenMP library that threadpoolctl finds in the process (numpy's
OpenBLAS, FAISS's OpenBLAS and OpenMP) runs one thread, and FAISS's OpenMP of the calling thread too: FAISS's
OpenBLAS takes the calling thread's OpenMP setting as its own thread count, so that one must be set per thread;
and torch's intra-op pool when torch is loaded (an AE trained with 1 and 2 torch threads scored clips apart).

Parallelism that keeps the result: ``spread`` hands whole items (a clip, a fixed block of queries) to threads,
each item computed on one BLAS thread, so which thread computed it changes nothing.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Sequence, TypeVar

import faiss

T = TypeVar("T")
R = TypeVar("R")

_lock = threading.Lock()
_depth = 0  # one_thread() blocks open in this process, over all threads
_limits = None  # threadpoolctl's limiter of the outermost block: restores the process's thread counts
_torch_threads = 0  # torch's intra-op threads before the outermost block (0: torch not loaded then)


@functools.cache
def _controller():
    """threadpoolctl's view of the thread pools loaded in this process (made once, on first use: scanning the
    loaded libraries costs 0.2-0.6 ms, limiting through a ready controller 10 us)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Every BLAS and OpenMP pool of the process on one thread inside the block (nested and concurrent blocks
    share it: the last one out restores the thread counts found by the first one in)."""
    global _depth, _limits, _torch_threads
    with _lock:
        if _depth == 0:
            _limits = _controller().limit(limits=1)
            torch = sys.modules.get("torch")  # not imported for this: banks never need it
            _torch_threads = torch.get_num_threads() if torch is not None else 0
            if _torch_threads > 1:
                torch.set_num_threads(1)
        _depth += 1
    before = faiss.omp_get_max_threads()
    try:
        faiss.omp_set_num_threads(1)  # this thread's OpenMP, which FAISS's OpenBLAS follows
        yield
    finally:
        faiss.omp_set_num_threads(before)
        with _lock:
            _depth -= 1
            if _depth == 0:
                _limits.restore_original_limits()
                _limits = None
                if _torch_threads > 1:
                    sys.modules["torch"].set_num_threads(_torch_threads)


def spread(fn: Callable[[T], R], items: Sequence[T], threads: int = 1) -> list[R]:
    """``[fn(x) for x in items]`` on up to ``threads`` Python threads, each ``fn`` call on one BLAS thread; the
    results do not depend on ``threads``. numpy and FAISS release the GIL in their products."""
    if threads <= 1 or len(items) <= 1:
        with one_thread():
            return [fn(x) for x in items]

    def run(x: T) -> R:
        with one_thread():
            return fn(x)

    with one_thread(), ThreadPoolExecutor(min(threads, len(items)), thread_name_prefix="bank") as pool:
        return list(pool.map(run, items))
