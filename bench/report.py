"""Benchmark records: a table on stdout, a JSON file and an SVG bar chart in bench/results/."""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


@dataclass
class Record:
    name: str  # e.g. "decode b1 past128"
    model: str
    backend: str
    seconds: float  # median time of one call
    tokens: int  # tokens processed per call
    bound_seconds: float  # the hardware's lower bound for that call
    bound: str  # which limit: "bandwidth" or "compute", or "-" for none
    tp: int = 1
    low: float | None = None  # spread: 10th and 90th percentile of the call's times
    high: float | None = None
    collective_seconds: float | None = None  # of `seconds`, spent in all-reduce / all-gather on rank 0
    split_seconds: float | None = None  # of `seconds`, spent between ONNX Runtime segments (binding, copies)
    note: str = ""

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds

    @property
    def fraction_of_bound(self) -> float | None:
        return self.bound_seconds / self.seconds if self.bound_seconds else None


@dataclass
class MemoryRecord:
    """Resident memory of a process holding a model, after load and a few steps."""

    model: str
    backend: str
    weight_bytes: int
    resident_bytes: int  # growth of VmRSS over the process before the model was opened
    target: float  # the most resident memory should be, as a multiple of the weights

    @property
    def ratio(self) -> float:
        return self.resident_bytes / self.weight_bytes


def memory_table(records: list[MemoryRecord]) -> str:
    head = f"{'model':<11}{'backend':<21}{'weights MiB':>12}{'resident MiB':>14}{'x weights':>11}{'target':>8}"
    lines = [head, "-" * len(head)]
    for r in records:
        lines.append(f"{r.model:<11}{r.backend:<21}{r.weight_bytes / 2**20:>12.0f}{r.resident_bytes / 2**20:>14.0f}"
                     f"{r.ratio:>11.2f}{r.target:>8.2f}")
    return "\n".join(lines)


def _fraction(r: Record) -> str:
    return f"{r.fraction_of_bound:>9.1%}" if r.fraction_of_bound is not None else f"{'-':>9}"


def table(records: list[Record]) -> str:
    head = (f"{'benchmark':<26}{'model':<11}{'backend':<21}{'median ms':>10}{'spread ms':>16}{'tokens/s':>11}"
            f"{'of bound':>10}  bound")
    lines = [head, "-" * len(head)]
    for r in records:
        spread = f"{r.low * 1e3:.2f}-{r.high * 1e3:.2f}" if r.low is not None else "-"
        lines.append(f"{r.name:<26}{r.model:<11}{r.backend:<21}{r.seconds * 1e3:>10.2f}{spread:>16}"
                     f"{r.tokens_per_second:>11.1f} {_fraction(r)}  {r.bound}{'  ' + r.note if r.note else ''}")
    return "\n".join(lines)


def tp_table(records: list[Record]) -> str:
    rows = [r for r in records if r.collective_seconds is not None]
    if not rows:
        return ""
    head = f"{'model':<11}{'backend':<13}{'TP':>3}{'ms/token':>10}{'in collectives':>16}{'between segments':>18}"
    lines = [head, "-" * len(head)]
    for r in rows:
        split = f"{r.split_seconds / r.seconds:>17.1%}" if r.split_seconds is not None else f"{'-':>17}"
        lines.append(f"{r.model:<11}{r.backend:<13}{r.tp:>3}{r.seconds * 1e3:>10.2f}"
                     f"{r.collective_seconds / r.seconds:>16.1%} {split}")
    return "\n".join(lines)


def ratios(records: list[Record]) -> list[str]:
    """Speed-ups between backends on the same benchmark and model (medians of interleaved rounds)."""
    by_key: dict[tuple[str, str], dict[str, Record]] = {}
    for r in records:
        if r.tp == 1:
            by_key.setdefault((r.model, r.name), {})[r.backend] = r
    lines = []
    for (model, name), runs in by_key.items():
        pairs = [("onnxruntime", "torch"), ("onnxruntime", "onnxruntime-unfused"), ("onnxruntime-unfused", "torch")]
        parts = [f"{a} {runs[b].seconds / runs[a].seconds:.2f}x {b}" for a, b in pairs if a in runs and b in runs]
        if parts:
            lines.append(f"{model:<10} {name:<24} " + "; ".join(parts))
    return lines


def svg_bars(records: list[Record]) -> str:
    """Horizontal bars: fraction of the hardware bound per benchmark (no plotting library needed)."""
    shown = [r for r in records if r.fraction_of_bound is not None]
    width, row, left = 760, 26, 360
    height = row * len(shown) + 60
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="12"><text x="10" y="20" font-size="14">Fraction of the hardware bound '
             f'(higher is better)</text>']
    for i, r in enumerate(shown):
        y = 40 + i * row
        bar = max(1.0, (width - left - 60) * min(r.fraction_of_bound, 1.0))
        parts.append(f'<text x="10" y="{y + 14}">{r.model} {r.backend} {r.name}</text>'
                     f'<rect x="{left}" y="{y}" width="{bar:.1f}" height="{row - 8}" fill="#4a7bd0"/>'
                     f'<text x="{left + bar + 6:.1f}" y="{y + 14}">{r.fraction_of_bound:.1%}</text>')
    parts.append("</svg>")
    return "".join(parts)


def write_report(records: list[Record], machine: dict[str, float],
                 memory: list[MemoryRecord] = ()) -> list[Record]:
    """Print and store the report; return the records above 100% of their bound (bounds measured wrong)."""
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    meta = {"machine": platform.machine(), "processor": platform.processor(), "torch": torch.__version__,
            "threads": machine.get("threads"), "read_bandwidth_bytes_per_s": machine.get("bandwidth"),
            "matmul_flops_per_s": machine.get("flops")}
    over = [r for r in records if r.fraction_of_bound is not None and r.fraction_of_bound > 1.0]
    speedups = ratios(records)
    payload = {"meta": meta, "ratios": speedups,
               "records": [asdict(r) | {"tokens_per_second": r.tokens_per_second,
                                        "fraction_of_bound": r.fraction_of_bound} for r in records],
               "memory": [asdict(r) | {"ratio": r.ratio} for r in memory]}
    (RESULTS / f"{stamp}.json").write_text(json.dumps(payload, indent=2))
    (RESULTS / f"{stamp}.svg").write_text(svg_bars(records))
    if machine.get("bandwidth"):  # measured only where a benchmark of the run needed its bounds
        print(f"\nmachine: read bandwidth {machine['bandwidth'] / 1e9:.1f} GB/s, fp32 matmul "
              f"{machine.get('flops', 0) / 1e9:.0f} GFLOP/s, {meta['threads']} threads")
    print(table(records))
    parallel = tp_table(records)
    if parallel:
        print("\ntensor parallelism (share of each decode step on rank 0):")
        print(parallel)
    if speedups:
        print("\nspeed-ups (time of the right / time of the left, medians of interleaved rounds):")
        print("\n".join(speedups))
    if memory:
        print("\nresident memory after load and a few steps:")
        print(memory_table(list(memory)))
    for r in over:
        print(f"\nREPORT FAILED: {r.model} {r.backend} {r.name} reached {r.fraction_of_bound:.1%} of its "
              f"{r.bound} bound: the bound is measured wrong, and every fraction of this run with it")
    print(f"\nresults: {RESULTS / stamp}.json, plot: {RESULTS / stamp}.svg")
    return over
