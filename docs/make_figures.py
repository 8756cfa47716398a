"""Regenerate the report figures that the guides show (``docs/img/*.png``).

The PNGs are checked in; rerun this script after a change to the training, the head methods or the plots::

    .venv/bin/python docs/make_figures.py --data-dir data --out docs/img

It runs pfl's own commands, in a temporary folder with its own SQLite tracking store (nothing is written
into the checkout except the PNGs under ``--out``):

1. ``pfl sweep --config configs/fedfomo_cifar10_pr0.2.yaml --alphas 0.1 1.0 --join-ratios 0.2 0.5
   --head global_epoch=1 --head sampling_num=5 --head ood_dataset=none partition=dirichlet num_clients=10
   global_rounds=2 num_threads=1``: FedFomo on CIFAR-10 (PFLlib's CNN, 10 clients, 2 global rounds) at
   2 Dirichlet alphas x 2 join ratios, 4 FL runs, each with an APH and a LoRAPH head run of 5 members
   trained 1 epoch (8 head runs);
2. ``pfl report --experiment pfl --alpha 0.1 --join-ratio 0.2 --out <tmp>/report``: the table of the
   alpha 0.1 / join ratio 0.2 cell, F-ECE over alpha (at join ratio 0.2) and over join ratio (at alpha 0.1),
   and the reliability diagrams of that cell's FL run;

then copies three PNGs to stable names:

* ``ece_vs_alpha.png`` (from ``ece_vs_alpha_fedfomo_cifar10_jr0.2.png``),
* ``ece_vs_join_ratio.png`` (from ``ece_vs_join_ratio_fedfomo_cifar10_dir0.1.png``),
* ``reliability.png`` (from ``reliability_<FL run id>.png``),

and prints the report's table. The copies drop the PNGs' alpha channel (matplotlib writes it fully opaque),
which keeps each under 300 KB without changing a pixel. ``--data-dir`` must hold ``cifar-10-batches-py/`` (full
CIFAR-10 for the checked-in figures; any slice of it works). On full CIFAR-10 it took about 4 minutes of CPU time
on a 2-core machine (7.5 minutes of wall time beside other load). 2 global rounds are far from convergence, so the
figures show the plots and pfl's real output, not the papers' numbers. For those, run the templates'
100 rounds on a GPU (``docs/guides/heads.md``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "fedfomo_cifar10_pr0.2.yaml"
ALPHAS = ("0.1", "1.0")
JOIN_RATIOS = ("0.2", "0.5")
# report file stem (without .png) -> checked-in name; reliability_<id> is matched by prefix
FIGURES = {"ece_vs_alpha_fedfomo_cifar10_jr0.2": "ece_vs_alpha.png",
           "ece_vs_join_ratio_fedfomo_cifar10_dir0.1": "ece_vs_join_ratio.png",
           "reliability_": "reliability.png"}


def pfl_command() -> list[str]:
    """The ``pfl`` entry point beside this interpreter (the venv's), else the one on PATH."""
    here = Path(sys.executable).parent / "pfl"
    if here.is_file():
        return [str(here)]
    found = shutil.which("pfl")
    if found is None:
        sys.exit("make_figures: no `pfl` command beside this Python or on PATH; run it with the venv's Python")
    return [found]


def copy_png(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` as an optimized RGB PNG (the report's PNGs are RGBA with every pixel opaque)."""
    from PIL import Image  # matplotlib's dependency

    with Image.open(src) as image:
        if image.mode == "RGBA" and image.getchannel("A").getextrema() == (255, 255):
            image = image.convert("RGB")
        image.save(dst, "PNG", optimize=True)


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> None:
    """Run ``cmd`` in ``cwd``, echoing it; stop the script if it fails."""
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=cwd, env=env, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=os.environ.get("PFL_DATA_DIR"),
                        help="data directory holding cifar-10-batches-py/ (default: $PFL_DATA_DIR)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="where the PNGs go (docs/img)")
    parser.add_argument("--rounds", type=int, default=2, help="global rounds of each FL run (2)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (store, report) and say where")
    args = parser.parse_args(argv)
    if args.data_dir is None or not (Path(args.data_dir) / "cifar-10-batches-py").is_dir():
        parser.error(f"--data-dir must hold cifar-10-batches-py/ (got {args.data_dir})")
    data_dir = Path(args.data_dir).resolve()
    out = args.out.resolve()

    env = dict(os.environ, PFL_DATA_DIR=str(data_dir), OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    env.pop("MLFLOW_TRACKING_URI", None)  # the temporary folder's sqlite:///mlflow.db, never a shared store
    pfl = pfl_command()
    work = Path(tempfile.mkdtemp(prefix="pfl_figures_"))
    try:
        run([*pfl, "sweep", "--config", str(CONFIG), "--alphas", *ALPHAS, "--join-ratios", *JOIN_RATIOS,
             "--head", "global_epoch=1", "--head", "sampling_num=5", "--head", "ood_dataset=none", "--no-progress",
             "partition=dirichlet", "num_clients=10", f"global_rounds={args.rounds}", "num_threads=1", f"cache_dir={work / 'cache'}"],
            work, env)
        report = work / "report"
        run([*pfl, "report", "--experiment", "pfl", "--alpha", ALPHAS[0], "--join-ratio", JOIN_RATIOS[0],
             "--out", str(report)], work, env)
        out.mkdir(parents=True, exist_ok=True)
        for stem, name in FIGURES.items():
            found = sorted(report.glob(f"{stem}*.png") if stem.endswith("_") else [report / f"{stem}.png"])
            if not found or not found[0].is_file():
                sys.exit(f"make_figures: the report wrote no {stem}*.png (files: "
                         f"{sorted(p.name for p in report.iterdir())})")
            copy_png(found[0], out / name)
            print(f"{out / name}  ({(out / name).stat().st_size // 1024} KB, from {found[0].name})")
        print((report / "table.md").read_text())
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
