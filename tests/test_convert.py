"""Published-entry metadata, released-weight tags and strict checkpoint conversion.

The machinery is tested on a toy published entry registered for the duration of one test (so the
registry-driven model tests never see it); the real entries' parity tests use the same path.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping

import pytest
import torch
from torch import nn

import fusionzoo as fz
from fusionzoo import _registry
from fusionzoo.cli import main as cli_main
from fusionzoo.models import convert

NAME = "toyfuse_tiny"


class _Toy(nn.Module):
    """Two 1x1 convs (one per stream) summed, then a classifier with a BatchNorm."""

    def __init__(self, num_classes: int, modalities: tuple[str, ...]) -> None:
        super().__init__()
        self.modalities, self.num_classes = modalities, num_classes
        self.config = {"name": NAME}
        self.rgb = nn.Conv2d(3, 4, 1)
        self.depth = nn.Conv2d(1, 4, 1)
        self.norm = nn.BatchNorm2d(4)
        self.cls = nn.Conv2d(4, num_classes, 1)

    def forward(self, x: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.cls(self.norm(self.rgb(x["rgb"]) + self.depth(x["depth"])))


# The "authors'" naming of the same network: what a converter maps.
AUTHORS_RULES = [
    (r"enc_rgb\.(weight|bias)", r"rgb.\1"),
    (r"enc_d\.(weight|bias)", r"depth.\1"),
    (r"bn\.(.*)", r"norm.\1"),
    (r"classifier\.(weight|bias)", r"cls.\1"),
]


def _authors_state_dict(num_classes: int = 5) -> dict[str, torch.Tensor]:
    toy = _Toy(num_classes, ("rgb", "depth"))
    with torch.no_grad():
        for p in toy.parameters():
            p.normal_()
        toy.norm.running_mean.normal_()
    inverse = {"rgb.": "enc_rgb.", "depth.": "enc_d.", "norm.": "bn.", "cls.": "classifier."}
    out = {}
    for k, v in toy.state_dict().items():
        prefix = next(p for p in inverse if k.startswith(p))
        out[inverse[prefix] + k[len(prefix):]] = v.clone()
    return out


@pytest.fixture
def toy_entry(tmp_path, monkeypatch) -> Iterator[str]:
    monkeypatch.setenv("FUSIONZOO_CACHE", str(tmp_path / "cache"))

    def toyfuse_tiny(num_classes: int = 5, modalities: tuple[str, ...] = ("rgb", "depth"), pretrained: bool | str = False):
        return convert.build_or_load(NAME, pretrained, lambda: _Toy(num_classes, tuple(modalities)))

    _registry.register_model(
        task="segmentation", fusion="middle", method="toyfuse", encoder="tiny", paper="toy",
        published=True, reference_repo="https://example.org/toy", reference_commit="0" * 40,
    )(toyfuse_tiny)
    release = _registry.register_weights(_registry.ReleasedWeights(
        name=NAME, tag="toyset", url="https://example.org/toy.pth", filename="toy.pth", num_classes=5,
        modalities=("rgb", "depth"), reported="mIoU 1.0", class_names=tuple("abcde"),
    ))
    convert.register_converter(NAME, classifier_key="classifier.weight")(
        lambda sd: convert.rename_keys(sd, AUTHORS_RULES)
    )
    try:
        yield NAME
    finally:
        _registry._REGISTRY.pop(NAME, None)
        _registry._RELEASED.pop(release.full_name, None)
        convert._CONVERTERS.pop(NAME, None)


def test_published_metadata_and_listing(toy_entry):
    entry = fz.model_entry(toy_entry)
    assert entry.published and entry.reference_commit == "0" * 40
    assert toy_entry in fz.list_models(published=True)
    assert toy_entry not in fz.list_models(published=False)
    assert fz.list_pretrained("toyfuse*") == ["toyfuse_tiny.toyset"]
    with pytest.raises(KeyError, match="known tags: \\['toyset'\\]"):
        fz.released_weights(toy_entry, "nyuv2")


def test_published_entry_needs_its_reference():
    with pytest.raises(ValueError, match="reference_repo and reference_commit"):
        _registry.register_model(task="segmentation", fusion="middle", method="x", encoder="y", paper="p",
                                 published=True)
    with pytest.raises(ValueError, match="is not a published entry"):
        _registry.register_weights(_registry.ReleasedWeights(
            name="cmx_resnet50", tag="nyuv2", url="u", filename="f", num_classes=40,
            modalities=("rgb", "depth"), reported="r"))


def test_convert_roundtrip_outputs_equal(toy_entry, tmp_path):
    authors = _authors_state_dict()
    path = tmp_path / "toy.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in authors.items()}}, path)
    out = fz.convert_checkpoint(toy_entry, path, tag="toyset")
    assert out == convert.released_dir(toy_entry, "toyset")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["class_names"] == list("abcde") and cfg["extra"]["release"] == "toyfuse_tiny.toyset"

    model = fz.create_model(toy_entry, pretrained="toyset")
    reference = _Toy(5, ("rgb", "depth"))
    reference.load_state_dict(convert.rename_keys(authors, AUTHORS_RULES))
    reference.eval()
    x = {"rgb": torch.randn(2, 3, 4, 4), "depth": torch.randn(2, 1, 4, 4)}
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


def test_convert_without_tag_reads_class_count(toy_entry, tmp_path):
    path = tmp_path / "toy.pth"
    torch.save(_authors_state_dict(num_classes=7), path)
    out = fz.convert_checkpoint(toy_entry, path, tmp_path / "out")
    assert fz.from_pretrained(out).num_classes == 7


def test_wrong_file_names_first_key(toy_entry, tmp_path):
    authors = _authors_state_dict()
    authors["aux_head.weight"] = torch.zeros(3)
    path = tmp_path / "toy.pth"
    torch.save(authors, path)
    with pytest.raises(fz.ConversionError, match="'aux_head.weight'.*not part of the published network"):
        fz.convert_checkpoint(toy_entry, path, tmp_path / "out")
    del authors["aux_head.weight"], authors["bn.running_var"]
    torch.save(authors, path)
    with pytest.raises(fz.ConversionError, match="needs 'norm.running_var'"):
        fz.convert_checkpoint(toy_entry, path, tmp_path / "out")
    authors = _authors_state_dict()
    authors["enc_d.weight"] = torch.zeros(4, 2, 1, 1)
    torch.save(authors, path)
    with pytest.raises(fz.ConversionError, match="'depth.weight' has shape \\(4, 2, 1, 1\\)"):
        fz.convert_checkpoint(toy_entry, path, tmp_path / "out")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(fz.ConversionError, match="junk.pth is not a readable checkpoint"):
        fz.convert_checkpoint(toy_entry, tmp_path / "junk.pth", tmp_path / "out")


def test_sha256_checked_where_published(toy_entry, tmp_path):
    release = _registry._RELEASED["toyfuse_tiny.toyset"]
    object.__setattr__(release, "sha256", "f" * 64)
    path = tmp_path / "toy.pth"
    torch.save(_authors_state_dict(), path)
    with pytest.raises(fz.ConversionError, match="differs from the authors'.*get toy.pth from https://example.org/toy.pth"):
        fz.convert_checkpoint(toy_entry, path, tag="toyset")


def test_pretrained_tag_not_converted_says_what_to_do(toy_entry):
    with pytest.raises(FileNotFoundError, match="download toy.pth from https://example.org/toy.pth, then run "
                                                "`fusionzoo convert toyfuse_tiny toy.pth --tag toyset`"):
        fz.create_model(toy_entry, pretrained="toyset")


def test_cli_convert(toy_entry, tmp_path, capsys):
    path = tmp_path / "toy.pth"
    torch.save(_authors_state_dict(), path)
    assert cli_main(["convert", toy_entry, str(path), "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "model.safetensors").is_file()
    assert cli_main(["convert", toy_entry, str(tmp_path / "missing.pth"), "--out", str(tmp_path / "o")]) == 2
    assert "missing.pth does not exist" in capsys.readouterr().err
    assert cli_main(["convert", "cmx_resnet50", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "family entry" in capsys.readouterr().err


def test_gzipped_tar_archive_as_released(toy_entry, tmp_path):
    """Authors who ship ``name.tar.gz`` holding one ``.pth`` (ESANet) convert without extracting."""
    import io
    import tarfile

    def archive(path, members):
        with tarfile.open(path, "w:gz") as tar:
            for name, obj in members.items():
                buf = io.BytesIO()
                torch.save(obj, buf)
                info = tarfile.TarInfo(name)
                info.size = buf.tell()
                buf.seek(0)
                tar.addfile(info, buf)
        return path

    one = archive(tmp_path / "toy.tar.gz", {"toy/toy.pth": {"state_dict": _authors_state_dict()}})
    out = fz.convert_checkpoint(toy_entry, one, tmp_path / "out")
    assert fz.from_pretrained(out).num_classes == 5
    two = archive(tmp_path / "two.tar.gz", {"a.pth": _authors_state_dict(), "b.pth": _authors_state_dict()})
    with pytest.raises(fz.ConversionError, match=r"two.tar.gz holds 2 checkpoint files.*\['a.pth', 'b.pth'\]"):
        fz.convert_checkpoint(toy_entry, two, tmp_path / "out2")
    (tmp_path / "bad.tar.gz").write_bytes(b"not gzip")
    with pytest.raises(fz.ConversionError, match="bad.tar.gz is not a readable .tar.gz archive"):
        fz.convert_checkpoint(toy_entry, tmp_path / "bad.tar.gz", tmp_path / "out3")
