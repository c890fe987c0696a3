"""Timing harness shared by the benchmark scripts in ``bench/``.

A benchmark is ``(name, fn, args)``: ``fn`` is jitted here, its compile time measured with
``lower().compile()`` and its steady-state time as the median of repeated calls after a warm-up,
each ending in ``block_until_ready``.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from typing import Any, Callable, Sequence

import jax


def machine_description() -> str:
  dev = jax.devices()[0]
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return (f"{dev.platform.upper()} {getattr(dev, 'device_kind', '')}; host {cpu}, "
          f"{os.cpu_count()} cores; jax {jax.__version__}; "
          f"{datetime.date.today().isoformat()}")


def time_benchmark(name: str, fn: Callable[..., Any], args: Sequence[Any],
                   repeats: int = 5, min_seconds: float = 1.0) -> dict[str, Any]:
  jitted = jax.jit(fn)
  t0 = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(compiled(*args))  # Warm-up.
  times = []
  t_start = time.perf_counter()
  while len(times) < repeats or (time.perf_counter() - t_start < min_seconds and len(times) < 50):
    t = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t)
  return {"name": name, "compile_s": compile_s, "median_ms": 1e3 * statistics.median(times),
          "min_ms": 1e3 * min(times), "runs": len(times)}


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
  lines = ["| benchmark | compile (s) | steady median (ms) | min (ms) | runs |",
           "| --- | ---: | ---: | ---: | ---: |"]
  for r in rows:
    lines.append(f"| {r['name']} | {r['compile_s']:.2f} | {r['median_ms']:.2f} | "
                 f"{r['min_ms']:.2f} | {r['runs']} |")
  return "\n".join(lines)


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
  """(median, min) seconds of ``fn()`` after one warm-up call, each ending in
  ``block_until_ready``."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times), min(times)
