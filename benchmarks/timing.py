"""Shared timing helper for the benchmark scripts."""
import statistics
import time


def timed(fn, repeats: int) -> float:
  """Median wall time of `fn()` over `repeats` runs, after one warm-up run (JAX compiles there)."""
  fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)
