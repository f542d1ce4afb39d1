"""``fusionzoo export``: ONNX / torch.export round trips against eager, registry-driven.

The default run exports a few light models end to end (a run folder, a save_pretrained folder, a
detector up to its raw head outputs); ``-m slow`` exports every segmentation family, every
published segmentation entry and one detector of every detection family, in both formats.
ONNX tests are skipped when onnx / onnxscript / onnxruntime are absent (``pip install
'fusionzoo[export]'``).
"""

from __future__ import annotations

import importlib.util
import json
import warnings

import pytest
import torch
from torchvision.models.detection.image_list import ImageList

import fusionzoo as fz
from fusionzoo import cli
from fusionzoo.engine.config import TrainConfig, write_config
from fusionzoo.hub import save_pretrained
from fusionzoo.models import export as fz_export
from fusionzoo.models.export import FORMATS, ExportError, check_export, example_inputs, export_model
from fusionzoo.models.published.dformer import NMF2D

try:  # optional ([export] extra); the tests that need it are skipped without it
    import onnxruntime
except ImportError:
    onnxruntime = None

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

HAVE_ONNX = all(importlib.util.find_spec(p) is not None for p in ("onnx", "onnxscript", "onnxruntime"))
needs_onnx = pytest.mark.skipif(not HAVE_ONNX, reason="pip install 'fusionzoo[export]' (onnx, onnxscript, onnxruntime)")
SIZE = (64, 64)
NUM_CLASSES = 3

SEGMENTATION = fz.list_models(task="segmentation")
FAMILIES = [n for n in SEGMENTATION if not fz.model_entry(n).encoder_fixed]
PUBLISHED = fz.list_models(task="segmentation", published=True)
# One detector of every detection fusion family (and every operator of the middle family).
DETECTORS = ["fcos_early_resnet18", "fcos_sum_resnet18", "fcos_cmx_resnet18", "fcos_crossattn_resnet18",
             "retinanet_late_nms_resnet18", "fcos_hybrid_wbf_resnet18"]
# The authors' detectors (fusionzoo.detection.published) export through the same contract.
PUBLISHED_DETECTORS = fz.list_models(task="detection", published=True)


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = {} if fz.model_entry(name).encoder_fixed else {"encoder": "resnet18"}
    return fz.create_model(name, num_classes=NUM_CLASSES, **kwargs).eval()


def round_trip(name: str, fmt: str, tmp_path) -> None:
    model = build(name)
    exported = export_model(model, tmp_path / ("m.onnx" if fmt == "onnx" else "m.pt2"), fmt, size=SIZE)
    assert exported.input_names == list(model.modalities)
    check = check_export(model, exported)
    assert check.runtime == ("onnxruntime" if fmt == "onnx" else "torch.export")
    assert check.ok, f"{name} {fmt}: {check.per_output}"


def run_folder(tmp_path, name: str = "early_concat_resnet18", image_size: tuple[int, int] = (32, 32)):
    """A run folder as train.py writes it (training config + best/), with its model."""
    torch.manual_seed(0)
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    write_config(TrainConfig(model=name, image_size=image_size), run / "config.json",
                 extra={"modalities": ["rgb", "depth"]})
    model = fz.create_model(name, num_classes=NUM_CLASSES).eval()
    save_pretrained(model, run / "best")
    return run, model


def test_run_folder_exports_its_trained_weights_at_its_size(tmp_path, capsys):
    run, model = run_folder(tmp_path)
    out = tmp_path / "m.pt2"
    report = tmp_path / "check.json"
    assert cli.main(["export", str(run), "--format", "torch-export", "--out", str(out), "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "inputs rgb, depth at 32x32, batch dynamic" in printed and "max abs difference" in printed
    # The file holds the run's weights: it reproduces the saved model (not a fresh initialisation).
    program = torch.export.load(out)
    xs = example_inputs(model, (32, 32), batch=3, seed=5)
    with torch.no_grad():
        ref = model(xs)
        got = program.module()(*xs.values())[0]
    assert got.shape == (3, NUM_CLASSES, 32, 32)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    data = json.loads(report.read_text())
    assert data["inputs"] == ["rgb", "depth"] and data["outputs"] == ["logits"] and data["dynamic_batch"]
    assert data["max_rel"] <= data["tolerance"]


@needs_onnx
def test_onnx_of_a_saved_folder_has_named_inputs_and_a_dynamic_batch(tmp_path, capsys):
    torch.manual_seed(0)
    model = fz.create_model("early_concat_resnet18", num_classes=NUM_CLASSES).eval()
    save_pretrained(model, tmp_path / "saved")
    out = tmp_path / "m.onnx"
    argv = ["export", str(tmp_path / "saved"), "--format", "onnx", "--out", str(out), "--size", "32", "48"]
    assert cli.main(argv) == 0
    assert "check against eager (onnxruntime, batch 1)" in capsys.readouterr().out
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    inputs = session.get_inputs()
    assert [i.name for i in inputs] == ["rgb", "depth"]
    assert [i.shape[1:] for i in inputs] == [[3, 32, 48], [1, 32, 48]]
    assert all(isinstance(i.shape[0], str) for i in inputs)  # a symbolic batch dimension
    xs = example_inputs(model, (32, 48), batch=3, seed=7)
    (got,) = session.run(None, {m: x.numpy() for m, x in xs.items()})
    with torch.no_grad():
        ref = model(xs)
    assert got.shape == (3, NUM_CLASSES, 32, 48)
    assert abs(torch.from_numpy(got) - ref).max() <= 1e-4 * ref.abs().max()


def test_detector_raw_head_outputs_decode_to_its_detections() -> None:
    """What the exported detector ends with is complete: torchvision's post-processing of the raw
    outputs, outside the graph, gives the eager detections."""
    torch.manual_seed(0)
    model = fz.create_model("fcos_late_nms_resnet18", num_classes=NUM_CLASSES, score_thresh=0.0).eval()
    xs = example_inputs(model, (40, 56), batch=2, seed=3)  # padded to 64x64 inside
    with torch.no_grad():
        raw = model.raw_head_outputs(xs)
        model(xs)
    keys = ("cls_logits", "bbox_regression", "bbox_ctrness")
    assert list(raw) == [f"{m}.{k}" for m in ("rgb", "thermal") for k in keys]
    for m in ("rgb", "thermal"):
        detector = model.detectors[m].torchvision
        features = torch.zeros(2, 1, 64, 64)
        levels = [torch.zeros(2, 1, -(-64 // s), -(-64 // s)) for s in (8, 16, 32, 64, 128)]  # P3-P7 sizes
        images = ImageList(features, [(40, 56)] * 2)
        anchors = detector.anchor_generator(images, levels)
        split = [lv.shape[-2] * lv.shape[-1] for lv in levels]
        outputs = {k.split(".", 1)[1]: list(v.split(split, dim=1)) for k, v in raw.items() if k.startswith(f"{m}.")}
        assert outputs["cls_logits"][0].shape == (2, 64, NUM_CLASSES)
        decoded = detector.postprocess_detections(outputs, [list(a.split(split)) for a in anchors], images.image_sizes)
        for got, want in zip(decoded, model.head_detections[m]):
            assert torch.equal(got["labels"], want["labels"]) and len(got["boxes"]) > 0
            torch.testing.assert_close(got["boxes"], want["boxes"])
            torch.testing.assert_close(got["scores"], want["scores"])


def test_detector_exports_to_raw_head_outputs_with_a_dynamic_batch(tmp_path) -> None:
    model = build("fcos_early_resnet18")
    exported = export_model(model, tmp_path / "d.pt2", "torch-export", size=SIZE)
    assert exported.output_names == ["fused.cls_logits", "fused.bbox_regression", "fused.bbox_ctrness"]
    assert exported.dynamic_batch
    check = check_export(model, exported)
    assert check.batch == 1 and check.ok, check.per_output


def test_a_difference_above_the_tolerance_exits_1_with_one_line(tmp_path, capsys, monkeypatch):
    run, _ = run_folder(tmp_path)
    honest = fz_export._run_exported

    def off_by_one_percent(exported, inputs):
        runtime, outs = honest(exported, inputs)
        return runtime, [o * 1.01 for o in outs]

    monkeypatch.setattr(fz_export, "_run_exported", off_by_one_percent)
    assert cli.main(["export", str(run), "--format", "torch-export", "--out", str(tmp_path / "m.pt2")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "differs from eager: output 'logits'" in err[0] and "> tolerance 0.001" in err[0]


@pytest.mark.parametrize("argv, says", [
    (["no_such_model"], "neither an existing folder nor a registered model"),
    (["esanet_r18", "--opset", "17"], "--opset applies to --format onnx only"),
    (["esanet_r18", "--tolerance", "0"], "--tolerance must be positive"),
    (["esanet_r18", "--size", "0", "64"], "size must be two positive integers"),
])
def test_user_errors_are_one_line_with_status_2(tmp_path, capsys, argv, says):
    argv = ["export", *argv, "--format", "torch-export", "--out", str(tmp_path / "m.pt2")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err


def test_a_folder_without_weights_and_a_file_are_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "a.txt").write_text("x")
    for target, says in ((tmp_path / "empty", "no trained weights found"), (tmp_path / "a.txt", "is a file")):
        assert cli.main(["export", str(target), "--format", "torch-export", "--out", str(tmp_path / "m.pt2")]) == 2
        assert says in capsys.readouterr().err


def test_onnx_without_the_exporter_packages_says_what_to_install(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(fz_export.importlib.util, "find_spec", lambda n, *a: None if n == "onnxscript" else real(n, *a))
    assert cli.main(["export", "esanet_r18", "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "--format onnx needs onnxscript" in err and "pip install 'fusionzoo[export]'" in err
    assert not (tmp_path / "m.onnx").exists()


def test_cli_literals_match_the_library():
    action = next(a for a in cli._parser()._subparsers._group_actions[0].choices["export"]._actions
                  if a.dest == "format")
    assert tuple(action.choices) == FORMATS
    args = cli._parser().parse_args(["export", "x", "--format", "onnx", "--out", "y"])
    assert args.tolerance == fz_export.DEFAULT_TOLERANCE


# -- registry-driven: every family, every published entry, one detector per detection family -------------
@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", FAMILIES + PUBLISHED + DETECTORS + PUBLISHED_DETECTORS)
def test_every_entry_round_trips(name: str, fmt: str, tmp_path) -> None:
    if fmt == "onnx" and not HAVE_ONNX:
        pytest.skip("pip install 'fusionzoo[export]'")
    round_trip(name, fmt, tmp_path)


def test_registry_lists_are_complete():
    assert len(FAMILIES) >= 10 and len(PUBLISHED) >= 30
    detection_families = {fz.model_entry(n).fusion for n in DETECTORS}
    assert detection_families == {fz.model_entry(n).fusion for n in fz.list_models(task="detection")}


# -- DFormer's NMF: its seeded evaluation bases are a constant of the graph ------------------------------
class _Ham(torch.nn.Module):
    def __init__(self, eval_seed: int | None) -> None:
        super().__init__()
        self.ham = NMF2D(eval_seed=eval_seed, dim=8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ham(x)


def test_dformer_nmf_exports_its_seeded_bases_and_refuses_a_random_draw(tmp_path) -> None:
    """The seeded eval bases are drawn once, equal to a fresh draw from the seed, and the exported
    program holds them (no random op, so torch's ONNX exporter converts it); with
    ``nmf_eval_seed=None`` (a new draw per call) the export is refused, naming the flag."""
    module = _Ham(eval_seed=3).eval()
    g = torch.Generator().manual_seed(3)
    fresh = torch.nn.functional.normalize(torch.rand((1, 8, 64), generator=g), dim=1).expand(2, -1, -1)
    assert torch.equal(module.ham.initial_bases(2, 8, torch.zeros(())), fresh)
    x = torch.rand(2, 8, 4, 5)
    program = torch.export.export(module, (x,))
    assert not [n for n in program.graph.nodes if "rand" in str(n.target)]
    with torch.no_grad():
        assert torch.equal(program.module()(x), module(x))
    module.ham.eval_seed = 4  # a new seed redraws
    g = torch.Generator().manual_seed(4)
    assert torch.equal(module.ham.initial_bases(1, 8, torch.zeros(())),
                       torch.nn.functional.normalize(torch.rand((1, 8, 64), generator=g), dim=1))
    if HAVE_ONNX:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(torch.export.export(module, (x,)), (x,), tmp_path / "ham.onnx", dynamo=True,
                              optimize=False, verbose=False, input_names=["x"])
        (got,) = onnxruntime.InferenceSession(str(tmp_path / "ham.onnx"), providers=["CPUExecutionProvider"]).run(
            None, {"x": x.numpy()})
        with torch.no_grad():
            ref = module(x)
        assert (torch.from_numpy(got) - ref).abs().max() <= 1e-5 * ref.abs().max()
    for random in (_Ham(eval_seed=None).eval(), _Ham(eval_seed=0).train()):
        with pytest.raises(Exception, match=r"nmf_eval_seed=None or training mode.*nmf_eval_seed=<int>"):
            torch.export.export(random, (x,))


# -- the detector contract: any detector with raw_head_outputs() exports --------------------------------
class _ContractDetector(torch.nn.Module):
    """Not a registered family: only what docs/export.md's contract asks of a detector (a published
    one in fusionzoo.detection.published, e.g. an SSD or a YOLO head, with its own output names)."""

    task = "detection"
    modalities = ("rgb", "thermal")

    def __init__(self, valid: bool = True) -> None:
        super().__init__()
        self.rgb = torch.nn.Conv2d(3, 6, 3, stride=8, padding=1)
        self.thermal = torch.nn.Conv2d(1, 6, 3, stride=8, padding=1)
        self.valid = valid

    def raw_head_outputs(self, inputs):
        fused = self.rgb(inputs["rgb"]) + self.thermal(inputs["thermal"])  # (B, 6, H/8, W/8)
        anchors = fused.flatten(2).transpose(1, 2)  # (B, N, 6)
        if not self.valid:
            return [anchors]
        return {"yolo.p3": anchors[..., :5], "yolo.cls": anchors[..., 5:].sigmoid()}


def test_any_detector_with_raw_head_outputs_exports(tmp_path) -> None:
    torch.manual_seed(0)
    model = _ContractDetector().eval()
    exported = export_model(model, tmp_path / "d.pt2", "torch-export", size=(32, 48))
    assert exported.output_names == ["yolo.p3", "yolo.cls"] and exported.dynamic_batch
    check = check_export(model, exported)
    assert check.ok and set(check.per_output) == {"yolo.p3", "yolo.cls"}
    with pytest.raises(ExportError, match=r"raw_head_outputs\(\) returned list .*non-empty dict of named tensors"):
        export_model(_ContractDetector(valid=False).eval(), tmp_path / "e.pt2", "torch-export", size=(32, 48))
    headless = torch.nn.Sequential(torch.nn.Conv2d(3, 1, 1))
    headless.task, headless.modalities = "detection", ("rgb",)
    with pytest.raises(ExportError, match=r"exports through raw_head_outputs\(inputs\) -> dict of named tensors"):
        export_model(headless, tmp_path / "f.pt2", "torch-export", size=(32, 48))
