#!/usr/bin/env python
"""What modality-imbalance remedies and purification do to a model's use of depth.

    python bench/remedies.py                              # every variant below
    python bench/remedies.py --variants baseline kgs --out-dir runs/remedies --reuse
    python bench/remedies.py --model early_concat_resnet18 --variants baseline dropout_rgb ogm_ge
    python bench/remedies.py --epochs 4                   # anything else goes to every train.py call

Each variant is one ``train.py`` run with the embedded default recipe (synthetic RGB-D, 64x80,
seed 0) that changes only the remedy; each run ends with its interpretability report, from which
the table takes mIoU, the depth and RGB Shapley values and the rgb-depth interaction index
(``fusionzoo.interpret.interaction``), each with its 95 % bootstrap interval over the validation
images (``InterpretResult.intervals``, docs/interpret.md "Intervals"):

- ``baseline``: no remedy;
- ``dropout_rgb``: modality dropout of RGB (``--modality-dropout 0.3 --modality-dropout-candidates rgb``),
  so 30% of the batches are trained on depth alone;
- ``dropout_any``: the same with either modality dropped (``... --modality-dropout-candidates rgb,depth``);
- ``ogm_ge``: OGM-GE gradient modulation (Peng et al., CVPR 2022; ``--callbacks modality_balance,ogm_ge``,
  :class:`fusionzoo.interpret.OGMGECallback`, alpha 0.5);
- ``kgs``: MIM's Knowledge Guidance Scheme (Zeng et al., IEEE TMM 2023; ``--callbacks modality_balance,kgs``,
  :class:`fusionzoo.interpret.KGSCallback`): unimodal heads on each stream's deepest stage,
  inter-modal guidance only (the model has no purification gates);
- ``purification``: the purified model (``--purified-model``, MIM's purification gates) with no remedy;
- ``kgs_purification``: the purified model with KGS on its purified and unpurified features
  (intra- and inter-modal guidance).

``--model`` trains the first five (default ``acnet_resnet18``: channel-attention middle fusion
whose RGB and depth streams stay unimodal, so KGS's heads are unimodal; early fusion has no
per-modality stream and its ``kgs`` row is skipped with the reason); ``--purified-model`` the
last two. The two models differ in more than the gates (fusion operator), so compare the
purification rows with each other and the remedy rows with their baseline.

Nothing is asserted; one seed per variant, so differences inside the intervals (which cover
the evaluation images, not training seeds) are not evidence.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import fusionzoo as fz
from fusionzoo.interpret.interaction import coalition_terms
from fusionzoo.interpret.kgs import kgs_taps

ROOT = Path(__file__).resolve().parents[1]
# variant -> (which model: "model" or "purified", train.py arguments)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "baseline": ("model", []),
    "dropout_rgb": ("model", ["--modality-dropout", "0.3", "--modality-dropout-candidates", "rgb"]),
    "dropout_any": ("model", ["--modality-dropout", "0.3", "--modality-dropout-candidates", "rgb,depth"]),
    "ogm_ge": ("model", ["--callbacks", "modality_balance,ogm_ge"]),
    "kgs": ("model", ["--callbacks", "modality_balance,kgs"]),
    "purification": ("purified", []),
    "kgs_purification": ("purified", ["--callbacks", "modality_balance,kgs"]),
}


def _cell(value: float | None, iv: list | None, sign: bool = False) -> str:
    if value is None:
        return "n/a"
    fmt = "{:+.1f}" if sign else "{:.1f}"
    text = fmt.format(100 * value)
    if iv and iv[0] is not None and iv[1] is not None:
        text += f" [{100 * iv[0]:.1f}, {100 * iv[1]:.1f}]"
    return text


def _row(name: str, model: str, metrics: dict, wall: float | None) -> str:
    c = metrics["contribution"]
    iv = metrics.get("intervals") or {}
    full = "+".join(metrics["modalities"])
    inter = coalition_terms(c)["interaction"].get("rgb|depth", {}).get("value")
    cells = [name, model, _cell(c["coalitions"][full]["miou"], iv.get(f"contribution.coalitions.{full}.miou")),
             _cell(c["shapley"]["depth"], iv.get("contribution.shapley.depth")),
             _cell(c["shapley"]["rgb"], iv.get("contribution.shapley.rgb")),
             _cell(inter, iv.get("contribution.interaction.rgb|depth.value"), sign=True),
             "reused" if wall is None else f"{wall:.0f}"]
    return "| " + " | ".join(cells) + " |"


def _skip_reason(variant: str, model: str) -> str | None:
    """Why ``variant`` cannot run on ``model`` (KGS needs per-modality stream taps), or None."""
    if not any("kgs" in f for f in VARIANTS[variant][1]):
        return None
    try:
        kgs_taps(fz.create_model(model, num_classes=2))
    except ValueError as e:
        return str(e)
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="acnet_resnet18", help="model of the baseline and remedy rows")
    p.add_argument("--purified-model", default="mim_add_resnet18",
                   help="model with purification gates ({m}.stageN.gate taps) of the purification rows")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out-dir", default="runs/remedies")
    p.add_argument("--reuse", action="store_true", help="skip training where <out-dir>/<variant>/report exists")
    args, extra = p.parse_known_args()  # anything else (e.g. --epochs 4) goes to every train.py call
    out_dir = Path(args.out_dir)
    rows, skipped = [], []
    for v in args.variants:
        which, flags = VARIANTS[v]
        model = args.model if which == "model" else args.purified_model
        why = _skip_reason(v, model)
        if why:
            skipped.append(f"{v}: {why}")
            continue
        report = out_dir / v / "report" / "metrics.json"
        wall = None
        if not (args.reuse and report.is_file()):
            cmd = [sys.executable, str(ROOT / "train.py"), "--model", model, "--out-dir", str(out_dir),
                   "--run-name", v, *flags, *extra]
            print("$", " ".join(cmd), flush=True)
            start = time.perf_counter()
            subprocess.run(cmd, check=True, cwd=ROOT)
            wall = time.perf_counter() - start
        rows.append(_row(v, model, json.loads(report.read_text()), wall))
    print()
    print("embedded recipe (synthetic RGB-D, 64x80, seed 0); mIoU / Shapley / interaction in points, zero removal "
          "policy, [95 % bootstrap interval over the validation images]")
    print()
    print("| variant | model | mIoU | Shapley depth | Shapley rgb | interaction rgb-depth | train.py wall (s) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    for s in skipped:
        print(f"skipped {s}")


if __name__ == "__main__":
    main()
