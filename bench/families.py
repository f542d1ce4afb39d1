#!/usr/bin/env python
"""Train one model per fusion family on the embedded recipe and compare their interpretations.

    python bench/families.py                         # early, middle, late, hybrid (resnet18), synthetic RGB-D
    python bench/families.py --out-dir runs/families --epochs 4
    python bench/families.py --models esanet_resnet18 cmx_resnet18 --reuse

Each model is trained by ``train.py`` with the embedded default recipe (synthetic RGB-D, 64x80,
AdamW, poly schedule, seed 0; only ``--model`` changes), which ends by writing the run's
interpretability report (``<run>/report/metrics.json``: contribution with exact Shapley values,
debiased CKA, semantic variance, reliance, ...). The reports are then laid side by side exactly
as ``fusionzoo compare <run>/report ...`` does, and the comparison's markdown tables are printed
(and written to ``<out-dir>/compare/comparison.md`` beside ``report.html``).

The synthetic world has a known answer (``docs/data.md``): ``box_depth_only`` is visible only in
depth, ``poster_rgb_only`` only in RGB, ``ball_either`` in either, ``crate_needs_both`` only in
the conjunction; so a model that uses depth shows a large depth Shapley value on
``box_depth_only`` and a near-zero one on ``poster_rgb_only``. Nothing is asserted here: the tests
check the known answers (``tests/test_interpret_known_answers.py``, ``tests/test_interpret_interaction.py``); this
prints the numbers, including the interaction index, the score decomposition and the BROJA PID of each class
(``fusionzoo.interpret.interaction`` / ``.pid``), and each class's dominant term against its construction.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = ["early_concat_resnet18", "esanet_resnet18", "late_mean_resnet18", "hybrid_gate_resnet18"]


def train(model: str, out_dir: Path, extra: list[str]) -> float:
    """Run ``train.py --model MODEL`` into ``out_dir/MODEL``; returns the wall time in seconds."""
    cmd = [sys.executable, str(ROOT / "train.py"), "--model", model, "--out-dir", str(out_dir), "--run-name", model,
           *extra]
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, help="registered segmentation models")
    p.add_argument("--out-dir", default="runs/families", help="one run folder per model goes here")
    p.add_argument("--reuse", action="store_true", help="skip training where <out-dir>/<model>/report exists")
    args, extra = p.parse_known_args()  # anything else (e.g. --epochs 6) goes to every train.py call
    out_dir = Path(args.out_dir)

    from fusionzoo.interpret.report import write_comparison

    walls: dict[str, float | None] = {}
    for model in args.models:
        report = out_dir / model / "report" / "metrics.json"
        walls[model] = None if (args.reuse and report.is_file()) else train(model, out_dir, extra)
    files = write_comparison([out_dir / m / "report" for m in args.models], out_dir / "compare")
    print()
    print("| model | train.py wall time (s) |")
    print("|---|---:|")
    for model, wall in walls.items():
        print(f"| {model} | {'reused' if wall is None else f'{wall:.0f}'} |")
    print()
    print(files["markdown"].read_text())
    known_answers([out_dir / m / "report" for m in args.models])
    print(f"wrote {files['report']} and {files['markdown']}")


def known_answers(reports: list[Path]) -> None:
    """Print, per model, each constructed class's dominant term of the score decomposition and of
    the BROJA PID (``fusionzoo.interpret.interaction`` / ``.pid``) against its construction."""
    from fusionzoo.data.synthetic import SyntheticConfig
    from fusionzoo.interpret import load_result
    from fusionzoo.interpret.interaction import coalition_terms

    dependence = SyntheticConfig().class_dependence
    expected = {"rgb_only": "unique_rgb", "depth_only": "unique_depth", "either": "redundancy",
                "both_required": "synergy"}
    classes = [c for c, d in dependence.items() if d in expected]
    print("### Dominant term per class against the construction (score decomposition / BROJA PID)")
    print()
    print("| model | " + " | ".join(f"{c} ({expected[dependence[c]]})" for c in classes) + " |")
    print("|---|" + "---|" * len(classes))
    for path in reports:
        r = load_result(path)
        if list(r.class_names or []) != list(dependence) or not r.contribution:
            print(f"| {r.model} | " + " | ".join("n/a" for _ in classes) + " |")
            continue
        dom = coalition_terms(r.contribution)["decomposition"]["rgb|depth"]["dominant"]
        pid = (((r.contribution.get("pid") or {}).get("pairs") or {}).get("rgb|depth") or {}).get("prediction") or {}
        cells = []
        for c in classes:
            score = dom[r.class_names.index(c)]
            p = ((pid.get("per_class") or {}).get(c) or {}).get("dominant", "n/a")
            p = {"unique_1": "unique_rgb", "unique_2": "unique_depth"}.get(p, p)
            mark = "ok" if score == expected[dependence[c]] else "differs"
            cells.append(f"{score} ({mark}) / {p}")
        print(f"| {r.model} | " + " | ".join(cells) + " |")
    print()


if __name__ == "__main__":
    main()
