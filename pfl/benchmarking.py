"""Shared plumbing of the benchmark scripts in ``benchmarks/``: one measured configuration per subprocess, and
the device sync before a timer is read.

Each configuration runs in a fresh process so its peak memory is its own; the child
prints its figures as one JSON line that the parent reads.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable

import torch


def parse_args(parser: argparse.ArgumentParser, measure: Callable[[list[str]], dict]) -> argparse.Namespace:
    """Add ``overrides`` (and the hidden child flag) to ``parser`` and parse; a child measures, prints and exits."""
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="extra run config overrides, e.g. device=cuda")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(json.loads(args.child))))
        sys.exit(0)
    return args


def measure_in_subprocess(script: str, overrides: list[str]) -> dict:
    """Run ``script``'s measurement of ``overrides`` in a fresh Python process; returns its figures.

    Raises:
        subprocess.CalledProcessError: the child failed (its output is attached).
    """
    child = subprocess.run([sys.executable, script, "--child", json.dumps(overrides)], check=True,
                           capture_output=True, text=True)
    return json.loads(child.stdout.strip().splitlines()[-1])


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously), so a timer read after it is honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
