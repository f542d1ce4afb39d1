#!/usr/bin/env python
"""What modality-imbalance remedies do to early fusion's use of depth.

    python bench/remedies.py                              # early_concat_resnet18, four variants
    python bench/remedies.py --out-dir runs/remedies --reuse
    python bench/remedies.py --model esanet_resnet18 --epochs 4

``early_concat_resnet18`` under-uses depth on the synthetic world (docs/interpret.md, "Four fusion
families"). Each variant below is one ``train.py`` run with the embedded default recipe
(synthetic RGB-D, 64x80, seed 0) that changes only the remedy; each run ends with its
interpretability report, from which the table takes mIoU, the depth Shapley value (overall and
on ``box_depth_only``), the drop when depth is removed, and the interaction index
(``fusionzoo.interpret.interaction``) where the report has it:

- ``baseline``: no remedy;
- ``dropout_rgb``: modality dropout of RGB (``--modality-dropout 0.3 --modality-dropout-candidates rgb``),
  so 30% of the batches are trained on depth alone;
- ``dropout_any``: the same with either modality dropped (``... --modality-dropout-candidates rgb,depth``);
- ``ogm_ge``: OGM-GE gradient modulation (Peng et al., CVPR 2022; ``--callbacks modality_balance,ogm_ge``,
  :class:`fusionzoo.interpret.OGMGECallback`, alpha 0.5).

Nothing is asserted; one seed per variant, so differences of a few points are within what a
different seed would change.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from fusionzoo.interpret.interaction import coalition_terms

ROOT = Path(__file__).resolve().parents[1]
VARIANTS: dict[str, list[str]] = {
    "baseline": [],
    "dropout_rgb": ["--modality-dropout", "0.3", "--modality-dropout-candidates", "rgb"],
    "dropout_any": ["--modality-dropout", "0.3", "--modality-dropout-candidates", "rgb,depth"],
    "ogm_ge": ["--callbacks", "modality_balance,ogm_ge"],
}


def _row(name: str, metrics: dict, wall: float | None) -> str:
    c = metrics["contribution"]
    mods = metrics["modalities"]
    full = c["coalitions"]["+".join(mods)]["miou"]
    names = metrics.get("class_names") or []
    per_class = dict(zip(names, c["shapley_per_class"]["depth"]))
    inter = coalition_terms(c)["interaction"].get("rgb|depth", {}).get("value")
    cells = [name, f"{100 * full:.1f}", f"{100 * c['shapley']['depth']:.1f}", f"{100 * c['shapley']['rgb']:.1f}",
             f"{100 * c['drop']['depth']:.1f}", f"{100 * (per_class.get('box_depth_only') or float('nan')):.1f}",
             "n/a" if inter is None else f"{100 * inter:+.1f}", "reused" if wall is None else f"{wall:.0f}"]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="early_concat_resnet18")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out-dir", default="runs/remedies")
    p.add_argument("--reuse", action="store_true", help="skip training where <out-dir>/<variant>/report exists")
    args, extra = p.parse_known_args()  # anything else (e.g. --epochs 4) goes to every train.py call
    out_dir = Path(args.out_dir)
    rows = []
    for v in args.variants:
        report = out_dir / v / "report" / "metrics.json"
        wall = None
        if not (args.reuse and report.is_file()):
            cmd = [sys.executable, str(ROOT / "train.py"), "--model", args.model, "--out-dir", str(out_dir),
                   "--run-name", v, *VARIANTS[v], *extra]
            print("$", " ".join(cmd), flush=True)
            start = time.perf_counter()
            subprocess.run(cmd, check=True, cwd=ROOT)
            wall = time.perf_counter() - start
        rows.append(_row(v, json.loads(report.read_text()), wall))
    print()
    print(f"{args.model}, embedded recipe; contribution in mIoU / IoU points, zero removal policy")
    print()
    print("| variant | mIoU (%) | Shapley depth | Shapley rgb | drop depth | depth Shapley on box_depth_only "
          "| interaction rgb-depth | train.py wall (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
