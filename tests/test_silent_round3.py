"""Issue 22 ("nothing silent", round 3): bad input is refused with one line naming the file and the
key; protocol details that only a data-dependent known answer used to catch get hand cases."""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from process_helpers import train_script
from torch import nn

import fusionzoo as fz
from fusionzoo import _registry
from fusionzoo import encoders as encoders_module
from fusionzoo.cli import main, run_command
from fusionzoo.data import io as data_io
from fusionzoo.data.collate import collate
from fusionzoo.detection.kaist import KAIST_PROTOCOL, evaluate_files, miss_rates
from fusionzoo.detection.metrics import log_average_miss_rate
from fusionzoo.engine.builders import build_model
from fusionzoo.engine.config import ConfigError, TrainConfig
from fusionzoo.engine.loop import Callback, TrainStepOptions
from fusionzoo.engine.prerun import check_first_step
from fusionzoo.hub import save_pretrained
from fusionzoo.models import convert
from fusionzoo.tasks import get_task
from fusionzoo.tasks.segmentation import SegmentationEvaluator

# -- fusionzoo mr2 on bad result files (items 2, 11, 15) ---------------------------------------

# Four KAIST frames, one pedestrian each at a different place (so a shifted id misses), 0-based ids
# as in MLPD's KAIST_annotation.json.
MR2_ANN = {
    "images": [{"id": i, "im_name": f"set06/V000/I{i:05d}", "width": 640, "height": 512} for i in range(4)],
    "categories": [{"id": 0, "name": "__ignore__"}, {"id": 1, "name": "person"}, {"id": 3, "name": "people"}],
    "annotations": [
        {"id": i, "image_id": i, "category_id": 1, "bbox": [50 + 120 * i, 100, 40, 100], "occlusion": 0, "ignore": 0}
        for i in range(4)
    ],
}


def _det(image_id, i, score=0.9, **over):
    return {"image_id": image_id, "category_id": 1, "bbox": [50 + 120 * i, 100, 40, 100], "score": score, **over}


def _mr2(tmp_path, capsys, results, name="res.json"):
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(MR2_ANN))
    res = tmp_path / name
    res.write_text(results if isinstance(results, str) else json.dumps(results))
    code = main(["mr2", "--annotations", str(ann), "--results", str(res)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def test_mr2_good_json_and_txt_agree(tmp_path, capsys):
    code, out, _ = _mr2(tmp_path, capsys, [_det(i, i) for i in range(4)])
    assert code == 0 and "all: 0.00 %" in out
    code, out, _ = _mr2(tmp_path, capsys, "".join(f"{i + 1}, {50 + 120 * i}, 100, 40, 100, 0.9\n" for i in range(4)),
                        name="res.txt")
    assert code == 0 and "all: 0.00 %" in out


@pytest.mark.parametrize(
    ("results", "expected"),
    [
        # the .txt file's 1-based ids written into a JSON (before: a plausible MR-2, exit 0)
        ([_det(i + 1, i) for i in range(3)], "look off by one: read as image_id -1, 3 detections"),
        ([_det(i, i, category_id=7) for i in range(4)], "category_id 7, not a category of the annotations"),
        ([_det(i, i, category_id=0) for i in range(4)], "holds no person detection"),
        ([], "holds no detection"),
        ([_det(0, 0, score=float("nan"))] + [_det(i, i) for i in range(1, 4)], "score nan is not finite"),
        ([_det(0, 0, bbox=[90, 100, -40, 100])], "has a width or height <= 0"),
        ([_det(0, 0, bbox=[700, 100, 40, 100])], "lies wholly outside the 640x512 image"),
        ([_det(0, 0, bbox=[50, 100, 40])], "bbox must be 4 numbers [x, y, w, h], got [50, 100, 40]"),
        ([_det("0", 0)], "image_id '0', a str"),
        ("", "not valid JSON"),
    ],
    ids=["one-based", "unknown-category", "no-person", "empty-json", "nan-score", "negative-width", "outside",
         "three-numbers", "string-id", "empty-file"],
)
def test_mr2_refuses_bad_json_results(tmp_path, capsys, results, expected):
    code, out, err = _mr2(tmp_path, capsys, results)
    assert code == 2 and out == ""
    assert err.startswith("fusionzoo: error: mr2: ") and "\n" not in err and "res.json" in err
    assert expected in err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "holds no detection"),
        ("1, 50, 100, 40, 100, inf\n", "score inf is not finite"),
        ("1, 50, 100, 40, -100, 0.9\n", "has a width or height <= 0"),
        ("1, -90, 100, 40, 100, 0.9\n", "lies wholly outside"),
        ("1, 50, 100, 40, 0.9\n", "expected 'image_id, x, y, w, h, score' (5 fields)"),
    ],
    ids=["empty", "inf-score", "negative-height", "outside", "five-fields"],
)
def test_mr2_refuses_bad_txt_results(tmp_path, capsys, text, expected):
    code, _, err = _mr2(tmp_path, capsys, text, name="res.txt")
    assert code == 2 and "\n" not in err and "res.txt" in err and expected in err


def test_mr2_skips_other_categories_with_a_warning(tmp_path):
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(MR2_ANN))
    res = tmp_path / "res.json"
    res.write_text(json.dumps([_det(i, i) for i in range(4)] + [_det(0, 2, category_id=3)]))
    with pytest.warns(UserWarning, match="skipped 1 detection.*'people' \\(id 3\\)"):
        assert evaluate_files(ann, res)["all"] == pytest.approx(1e-10)


def test_mr2_help_documents_the_id_convention(capsys):
    with pytest.raises(SystemExit):
        main(["mr2", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "1-based" in text and "images[].id" in text and "0-based" in text


# -- the miss rate is read at fppi <= r (item 17) ----------------------------------------------

def test_miss_rate_read_at_fppi_equal_to_a_reference_point():
    """Dollar's toolbox reads the miss rate at the last point with FPPI <= r. Here 100 images, one
    pedestrian each: detections found on images 0..49 score 1.0, one false positive scores 0.9,
    images 50..99 are then found at 0.8. FPPI is 0 up to 50 hits, then exactly 0.01 (= the first
    reference point 10^-2) for the remaining hits, so at r = 0.01 the miss rate is 0 (all found),
    while reading at FPPI < r gives 0.5 there."""
    targets = [{"boxes": torch.tensor([[10.0, 10, 50, 110]]), "labels": torch.zeros(1)} for _ in range(100)]
    preds = []
    for i in range(100):
        boxes, scores = [[10.0, 10, 50, 110]], [1.0 if i < 50 else 0.8]
        if i == 0:
            boxes.append([300.0, 300, 340, 400])
            scores.append(0.9)
        preds.append({"boxes": torch.tensor(boxes), "scores": torch.tensor(scores), "labels": torch.zeros(len(boxes))})
    mr, fppi, miss = log_average_miss_rate(preds, targets, return_curve=True)
    assert fppi[-1] == 0.01 and miss[-1] == 0.0
    # every one of the 9 reference points (0.01 .. 1) sees FPPI 0.01 <= r: all found
    assert mr == pytest.approx(1e-10)


# -- the KAIST reasonable subset on a hand case, no data (item 18) ------------------------------

FOUND = [100.0, 100.0, 140.0, 200.0]  # a regular pedestrian, 100 px tall, always detected


def _mr_with(box, **flags):
    """MR-2 (KAIST protocol) of one image holding the detected ``FOUND`` and an undetected ``box``
    with the given flags: 0.5 when the protocol counts ``box`` (half the pedestrians missed),
    ~0 when it makes ``box`` an ignore region."""
    target = {"boxes": torch.tensor([FOUND, box]), "labels": torch.zeros(2, dtype=torch.int64)}
    for key, value in flags.items():
        target[key] = torch.tensor([0, value])
    pred = {"boxes": torch.tensor([FOUND]), "scores": torch.ones(1), "labels": torch.zeros(1)}
    return miss_rates([pred], [target])["all"]


COUNTED, IGNORED = 0.5, 1e-10


@pytest.mark.parametrize(
    ("box", "flags", "expected"),
    [
        ([300.0, 100.0, 330.0, 155.0], {}, COUNTED),  # exactly 55 px tall: reasonable (height >= 55)
        ([300.0, 100.0, 330.0, 154.9], {}, IGNORED),  # 54.9 px: too small
        ([300.0, 100.0, 330.0, 152.0], {}, IGNORED),  # 52 px: too small (caught if the threshold moves to 50)
        ([300.0, 100.0, 330.0, 156.0], {"occlusion": 1}, COUNTED),  # partial occlusion: reasonable
        ([300.0, 100.0, 330.0, 156.0], {"occlusion": 2}, IGNORED),  # heavy occlusion: ignored
        ([300.0, 100.0, 330.0, 156.0], {"ignore": True}, IGNORED),  # the file's own ignore flag
        ([5.0, 5.0, 45.0, 105.0], {}, COUNTED),  # touches the 5 px border from inside: counted
        ([4.0, 100.0, 44.0, 200.0], {}, IGNORED),  # crosses x = 5
        ([300.0, 4.0, 340.0, 104.0], {}, IGNORED),  # crosses y = 5
        ([596.0, 100.0, 636.0, 200.0], {}, IGNORED),  # crosses x = 635
        ([300.0, 408.0, 340.0, 508.0], {}, IGNORED),  # crosses y = 507
    ],
    ids=["h55", "h54.9", "h52", "occl1", "occl2", "ignore", "border-inside", "border-x1", "border-y1", "border-x2",
         "border-y2"],
)
def test_kaist_reasonable_subset_hand_case(box, flags, expected):
    assert KAIST_PROTOCOL["height_range"][0] == 55.0 and KAIST_PROTOCOL["max_occlusion"] == 1
    assert _mr_with(box, **flags) == pytest.approx(expected, rel=1e-6)


def test_kaist_detections_on_ignore_regions_are_not_false_positives():
    """A detection on a too-small (ignored) pedestrian is neither a hit nor a false positive; one on
    empty ground is a false positive at FPPI 1 (it pushes the miss rate at r = 1 only)."""
    small = [300.0, 100.0, 330.0, 150.0]  # 50 px tall
    target = {"boxes": torch.tensor([FOUND, small]), "labels": torch.zeros(2, dtype=torch.int64)}
    on_ignored = {"boxes": torch.tensor([FOUND, small]), "scores": torch.tensor([0.9, 0.95]), "labels": torch.zeros(2)}
    assert miss_rates([on_ignored], [target])["all"] == pytest.approx(1e-10)
    on_ground = {"boxes": torch.tensor([FOUND, [400.0, 300, 440, 400]]), "scores": torch.tensor([0.9, 0.95]),
                 "labels": torch.zeros(2)}
    # the false positive ranks first: FPPI 1 before the hit, so the miss rate is 1 at the 8
    # reference points below 1 and 0 (floored at 1e-10) at r = 1
    assert miss_rates([on_ground], [target])["all"] == pytest.approx(math.exp(math.log(1e-10) / 9), rel=1e-9)


# -- the segmentation evaluator's validation loss (item 16) ------------------------------------

def test_segmentation_validation_loss_is_cross_entropy_over_labelled_pixels():
    """The loss the evaluator reports over several batches equals ``F.cross_entropy(...,
    ignore_index=255)`` of all of them at once: a mean over labelled pixels only (not over all
    pixels, and not a mean of per-batch means when batches hold different numbers of them)."""
    gen = torch.Generator().manual_seed(0)
    logits = [torch.randn(2, 5, 6, 7, generator=gen, dtype=torch.float64) * 3 for _ in range(2)]
    targets = [torch.randint(0, 5, (2, 6, 7), generator=gen) for _ in range(2)]
    targets[0][:, :4] = 255  # two thirds of batch 0 unlabelled, batch 1 fully labelled
    targets[1][0, 0, 0] = 255
    evaluator = SegmentationEvaluator(5)
    for out, tgt in zip(logits, targets):
        evaluator.update(out, tgt)
    expected = F.cross_entropy(torch.cat(logits), torch.cat(targets), ignore_index=255).item()
    assert evaluator.compute()["loss"] == pytest.approx(expected, rel=1e-6)


# -- keyword arguments with a pretrained tag (items 1 and 13) -----------------------------------

TOY = "silenttoy_tiny"


class _ToyNet(nn.Module):
    """Two 1x1 stems (one per stream), dropout, a classifier and a class-sized side head."""

    def __init__(self, num_classes: int, modalities: tuple[str, ...], in_chans: dict | None, dropout: float) -> None:
        super().__init__()
        self.modalities, self.num_classes = tuple(modalities), num_classes
        chans = {"rgb": 3, "depth": 1, "thermal": 1, **(in_chans or {})}
        self.stems = nn.ModuleDict({m: nn.Conv2d(chans[m], 4, 1) for m in self.modalities})
        self.drop = nn.Dropout2d(dropout)
        self.cls = nn.Conv2d(4, num_classes, 1)
        self.side = nn.Conv2d(4, num_classes, 1)
        self.config = {"name": TOY, "num_classes": num_classes, "modalities": list(modalities), "dropout": dropout,
                       **({"in_chans": dict(in_chans)} if in_chans else {})}

    def forward(self, x):
        return self.cls(self.drop(sum(self.stems[m](x[m]) for m in self.modalities)))


@pytest.fixture
def toy_release(tmp_path, monkeypatch):
    """A published toy entry with a 5-class release ``toyset`` whose converted folder the test writes
    itself (nothing is downloaded)."""
    monkeypatch.setenv("FUSIONZOO_CACHE", str(tmp_path / "cache"))

    def silenttoy_tiny(num_classes: int = 40, modalities=("rgb", "depth"), in_chans=None, dropout: float = 0.0,
                       pretrained: bool | str = False):
        return convert.build_or_load(TOY, pretrained, lambda: _ToyNet(num_classes, tuple(modalities), in_chans, dropout))

    _registry.register_model(task="segmentation", fusion="middle", method="silenttoy", encoder="tiny", paper="toy",
                             published=True, reference_repo="https://example.org/toy", reference_commit="0" * 40)(silenttoy_tiny)
    release = _registry.register_weights(_registry.ReleasedWeights(
        name=TOY, tag="toyset", url="https://example.org/toy.pth", filename="toy.pth", num_classes=5,
        modalities=("rgb", "depth"), reported="mIoU 1.0", class_names=tuple("abcde")))
    torch.manual_seed(0)
    released = _ToyNet(5, ("rgb", "depth"), None, 0.0)
    save_pretrained(released, convert.released_dir(TOY, "toyset"), class_names=tuple("abcde"))
    try:
        yield released
    finally:
        _registry._REGISTRY.pop(TOY, None)
        _registry._RELEASED.pop(release.full_name, None)


def test_tag_alone_loads_the_release_with_its_class_count(toy_release):
    model = fz.create_model(TOY, pretrained="toyset")  # the entry's default is 40 classes; the release has 5
    assert model.num_classes == 5 and not model.training
    for key, value in toy_release.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert model.pretrained_cfg["class_names"] == list("abcde")


def test_tag_with_num_classes_reinitialises_the_class_sized_tensors(toy_release):
    with pytest.warns(UserWarning, match=r"silenttoy_tiny.toyset has 5 classes, num_classes=9: re-initialised "
                                         r"cls.bias, cls.weight, side.bias, side.weight; the other 4 tensors"):
        model = fz.create_model(TOY, pretrained="toyset", num_classes=9, dropout=0.25)
    assert model.cls.weight.shape[0] == 9 and model.side.weight.shape[0] == 9
    assert torch.equal(model.stems["rgb"].weight, toy_release.stems["rgb"].weight)  # the rest is the release's
    assert model.drop.p == 0.25  # keywords that change no shape apply
    assert model.pretrained_cfg["num_classes"] == 9 and model.pretrained_cfg["class_names"] is None
    out = model({"rgb": torch.randn(1, 3, 4, 4), "depth": torch.randn(1, 1, 4, 4)})
    assert out.shape == (1, 9, 4, 4)


def test_tag_with_conflicting_modalities_or_shape_raises_naming_the_key(toy_release):
    with pytest.raises(ValueError, match=r"modalities=\['rgb', 'thermal'\] conflicts with the release, trained on "
                                         r"\['rgb', 'depth'\]"):
        fz.create_model(TOY, pretrained="toyset", modalities=("rgb", "thermal"))
    with pytest.raises(ValueError, match=r"in_chans=\{'depth': 3\} conflict with the released weights.*"
                                         r"stems.depth.weight \(\(4, 1, 1, 1\) in the release, \(4, 3, 1, 1\) as built\)"):
        fz.create_model(TOY, pretrained="toyset", in_chans={"depth": 3})


def test_tag_on_a_family_entry_says_tags_belong_to_published_entries(monkeypatch):
    def no_hub(*args, **kwargs):
        raise AssertionError("no download may be tried for a tag on a family entry")

    monkeypatch.setattr(encoders_module.timm, "create_model", no_hub)
    with pytest.raises(ValueError, match=r"esanet_resnet18: pretrained='nyuv2' is a released-weights tag, and tags "
                                         r"belong to published entries.*Closest: esanet_r34_nbt1d.*"
                                         r"esanet_r34_nbt1d \(nyuv2, nyuv2_scenenet, sunrgbd, sunrgbd_scenenet\)"):
        fz.create_model("esanet_resnet18", pretrained="nyuv2")


def test_train_model_kwargs_tag_trains_the_right_head(toy_release, tmp_path):
    """``train.py --model-kwargs "{pretrained: toyset}"`` on 3-class data: the head is rebuilt for
    3 classes (a warning), so the epoch trains and validates."""
    cfg = TrainConfig(model=TOY, model_kwargs={"pretrained": "toyset"})
    with pytest.warns(UserWarning, match="num_classes=3: re-initialised"):
        model = build_model(cfg, ("rgb", "depth"), 3)
    assert model.num_classes == 3 and model.cls.weight.shape[0] == 3
    cfg = TrainConfig(model=TOY, model_kwargs={"pretrained": "toyset"})
    with pytest.raises(ConfigError, match="modalities=\\['rgb', 'thermal'\\] conflicts"):
        build_model(cfg, ("rgb", "thermal"), 3)


# -- train.py: checks before the run starts, and the folder of a run that failed at once (6, 7, 10)

TINY = ["--model", "early_concat", "--model-kwargs", "{encoder: test_resnet}", "--image-size", "32,32",
        "--train-samples", "4", "--val-samples", "2", "--batch-size", "2", "--epochs", "1", "--threads", "1",
        "--no-progress", "--no-report", "--callbacks=", "--log-interval", "1"]


def _folders(root: Path) -> list[Path]:
    return sorted(root.iterdir()) if root.exists() else []


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        # published SA-Gate: ASPP's image pooling normalises a (1, C, 1, 1) map over a batch of 1
        (["--model", "sagate_r50", "--model-kwargs", "{}", "--image-size", "64,64", "--batch-size", "1"],
         r"sagate_r50 cannot train on batches of 1 per process.*use --batch-size 2 or more, or --freeze-bn"),
        # published ESANet: the pyramid pooling context module, likewise
        (["--model", "esanet_r18", "--model-kwargs", "{}", "--image-size", "64,64", "--batch-size", "1"],
         r"esanet_r18: the pre-run check \(one training step on 1 training samples.*BatchNorm after pooling to 1x1"),
        # published CMX on RGB-D: 1-channel depth into the 3-channel X stem
        (["--model", "cmx_mit_b0", "--model-kwargs", "{}"],
         r"cmx_mit_b0 takes a 3-channel 'depth' input.*--model-kwargs \"\{replicate_x: true\}\""),
    ],
    ids=["sagate-batch1", "esanet-batch1", "cmx-1ch-depth"],
)
def test_train_refuses_before_the_run_folder(tmp_path, capsys, argv, expected):
    train = train_script()
    runs = tmp_path / "runs"
    assert run_command(train.main, [*TINY, *argv, "--out-dir", str(runs)], prog="train.py") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(expected, err[0]), err
    assert _folders(runs) == []


def test_pre_run_check_leaves_no_trace():
    """The dry step restores BatchNorm statistics, gradients and the RNG streams."""
    model = fz.create_model("early_concat", encoder="test_resnet", num_classes=3)
    task = get_task(model)
    gen = torch.Generator().manual_seed(0)
    samples = [{"rgb": torch.randn(3, 32, 32, generator=gen), "depth": torch.randn(1, 32, 32, generator=gen),
                "mask": torch.randint(0, 3, (32, 32), generator=gen)} for _ in range(2)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    model.eval()
    check_first_step(model, task, samples, collate, modalities=("rgb", "depth"), device=torch.device("cpu"),
                     options=TrainStepOptions(), model_name="early_concat")
    assert not model.training and torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


class _Boom(Callback):
    def __init__(self, at_step: int) -> None:
        self.at_step, self.seen = at_step, 0

    def on_batch_start(self, batch):
        if self.seen == self.at_step:
            raise RuntimeError("boom")
        self.seen += 1


def test_first_step_crash_removes_the_run_folder_later_crash_keeps_it(tmp_path, capsys):
    train = train_script()
    runs = tmp_path / "runs"
    with pytest.raises(RuntimeError, match="boom"):
        train.main([*TINY, "--out-dir", str(runs)], callbacks=[_Boom(0)])
    assert _folders(runs) == []
    assert "failed before its first training step" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="boom"):  # after one completed step: the run had progress
        train.main([*TINY, "--out-dir", str(runs), "--checkpoint-minutes", "0"], callbacks=[_Boom(1)])
    (kept,) = _folders(runs)
    assert (kept / "config.json").is_file() and (kept / "metrics.jsonl").read_text().strip()


# -- fusionzoo convert on wrong files and over an earlier conversion (item 12) ------------------

@pytest.fixture
def toy_converter(toy_release):
    """The toy's "authors'" keys are ours with an ``a_`` prefix."""
    convert.register_converter(TOY, classifier_key="a_cls.weight")(
        lambda sd: convert.rename_keys(sd, [(r"a_(.*)", r"\1")]))
    try:
        yield {f"a_{k}": v.clone() for k, v in toy_release.state_dict().items()}
    finally:
        convert._CONVERTERS.pop(TOY, None)


def _convert(args, capsys):
    code = main(["convert", TOY, *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def test_convert_wrong_files_say_what_they_are(toy_converter, toy_release, tmp_path, capsys):
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint\n" * 4)
    npy = tmp_path / "weights.npy"
    np.save(npy, np.zeros(3))
    pickled = tmp_path / "with_args.pth"
    torch.save({"state_dict": toy_converter, "args": np.zeros(2)}, pickled)
    own_pth = tmp_path / "ours.pth"
    torch.save(toy_release.state_dict(), own_pth)
    own_folder = save_pretrained(toy_release, tmp_path / "saved")
    cases = [
        (text, "is not a readable checkpoint (not a zip archive or pickle of tensors)"),
        (npy, "is a NumPy array file (.npy), not a checkpoint"),
        (pickled, "pickles an object that is not a tensor (numpy"),
        (own_pth, "is already a fusionzoo state dict of silenttoy_tiny"),
        (own_folder / "model.safetensors", "holds fusionzoo's own weights of silenttoy_tiny"),
    ]
    for path, expected in cases:
        code, _, err = _convert([path, "--out", tmp_path / "out"], capsys)
        assert code == 2 and "\n" not in err and str(path) in err and expected in err, err
        assert "KeyError" not in err and "weights_only=False" not in err and "weights_only` set to `False" not in err
    assert "from_pretrained" in _convert([own_folder / "model.safetensors", "--out", tmp_path / "o"], capsys)[2]
    assert "from_pretrained" in _convert([own_pth, "--out", tmp_path / "o"], capsys)[2]


def test_convert_refuses_to_overwrite_without_force(toy_converter, tmp_path, capsys):
    authors = tmp_path / "toy.pth"
    torch.save(toy_converter, authors)
    out = tmp_path / "out"
    assert _convert([authors, "--out", out], capsys)[0] == 0
    stamp = (out / "config.json").read_bytes()
    code, _, err = _convert([authors, "--out", out], capsys)
    assert code == 2 and "already holds a conversion" in err and "--force" in err
    assert (out / "config.json").read_bytes() == stamp
    assert _convert([authors, "--out", out, "--force"], capsys)[0] == 0


# -- a grayscale file read as RGB (item 14) ------------------------------------------------------

def test_grayscale_rgb_file_warns_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(data_io, "_WARNED", set())
    gray = tmp_path / "0001.png"
    Image.fromarray(np.arange(48, dtype=np.uint8).reshape(6, 8), mode="L").save(gray)
    colour = tmp_path / "0002.png"
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(colour)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data_io.read_rgb(colour)  # a colour file: no warning
    with pytest.warns(data_io.DataWarning, match=r"0001.png is a grayscale image \(PIL mode L\).*copied to R, G and B"):
        rgb = data_io.read_rgb(gray)
    assert rgb.shape == (6, 8, 3) and (rgb == rgb[..., :1]).all()


def test_pretrained_flag_and_a_tag_in_model_kwargs_exclude_each_other(toy_release):
    cfg = TrainConfig(model=TOY, model_kwargs={"pretrained": "toyset"}, pretrained=True)
    with pytest.raises(ConfigError, match="--pretrained .* and model_kwargs pretrained='toyset' .* exclude each other"):
        build_model(cfg, ("rgb", "depth"), 3)
