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
    seconds: float  # best time of one call
    tokens: int  # tokens processed per call
    bound_seconds: float  # the hardware's lower bound for that call
    bound: str  # which limit: "bandwidth" or "compute"
    tp: int = 1
    collective_seconds: float | None = None  # of `seconds`, spent in all-reduce / all-gather on rank 0
    split_seconds: float | None = None  # of `seconds`, spent between ONNX Runtime segments (binding, copies)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds

    @property
    def fraction_of_bound(self) -> float:
        return self.bound_seconds / self.seconds


def table(records: list[Record]) -> str:
    head = f"{'benchmark':<28}{'model':<11}{'backend':<21}{'ms/call':>10}{'tokens/s':>12}{'of bound':>10}  bound"
    lines = [head, "-" * len(head)]
    for r in records:
        lines.append(f"{r.name:<28}{r.model:<11}{r.backend:<21}{r.seconds * 1e3:>10.2f}"
                     f"{r.tokens_per_second:>12.1f}{r.fraction_of_bound:>9.1%}  {r.bound}")
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
    """Speed-ups between backends on the same benchmark and model."""
    by_key: dict[tuple[str, str], dict[str, Record]] = {}
    for r in records:
        if r.tp == 1:
            by_key.setdefault((r.model, r.name), {})[r.backend] = r
    lines = []
    for (model, name), runs in by_key.items():
        pairs = [("onnxruntime", "torch"), ("onnxruntime", "onnxruntime-unfused"), ("onnxruntime-unfused", "torch")]
        parts = [f"{a} {runs[b].seconds / runs[a].seconds:.2f}x {b}" for a, b in pairs if a in runs and b in runs]
        if parts:
            lines.append(f"{model:<10} {name:<22} " + "; ".join(parts))
    return lines


def svg_bars(records: list[Record]) -> str:
    """Horizontal bars: fraction of the hardware bound per benchmark (no plotting library needed)."""
    width, row, left = 720, 26, 330
    height = row * len(records) + 60
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="12"><text x="10" y="20" font-size="14">Fraction of the hardware bound '
             f'(higher is better)</text>']
    for i, r in enumerate(records):
        y = 40 + i * row
        bar = max(1.0, (width - left - 60) * min(r.fraction_of_bound, 1.0))
        parts.append(f'<text x="10" y="{y + 14}">{r.model} {r.backend} {r.name}</text>'
                     f'<rect x="{left}" y="{y}" width="{bar:.1f}" height="{row - 8}" fill="#4a7bd0"/>'
                     f'<text x="{left + bar + 6:.1f}" y="{y + 14}">{r.fraction_of_bound:.1%}</text>')
    parts.append("</svg>")
    return "".join(parts)


def write_report(records: list[Record], machine: dict[str, float]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    meta = {"machine": platform.machine(), "processor": platform.processor(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "read_bandwidth_bytes_per_s": machine.get("bandwidth"),
            "matmul_flops_per_s": machine.get("flops")}
    payload = {"meta": meta, "records": [asdict(r) | {"tokens_per_second": r.tokens_per_second,
                                                      "fraction_of_bound": r.fraction_of_bound} for r in records]}
    (RESULTS / f"{stamp}.json").write_text(json.dumps(payload, indent=2))
    (RESULTS / f"{stamp}.svg").write_text(svg_bars(records))
    print(f"\nmachine: read bandwidth {machine.get('bandwidth', 0) / 1e9:.1f} GB/s, fp32 matmul "
          f"{machine.get('flops', 0) / 1e9:.0f} GFLOP/s, {meta['threads']} threads")
    print(table(records))
    parallel = tp_table(records)
    if parallel:
        print("\ntensor parallelism (share of each decode step on rank 0):")
        print(parallel)
    speedups = ratios(records)
    if speedups:
        print("\nspeed-ups (time of the right / time of the left):")
        print("\n".join(speedups))
    payload["ratios"] = speedups
    (RESULTS / f"{stamp}.json").write_text(json.dumps(payload, indent=2))
    print(f"\nresults: {RESULTS / stamp}.json, plot: {RESULTS / stamp}.svg")
    return RESULTS / f"{stamp}.json"
