"""What huggingface_hub's PyTorchModelHubMixin does where fusionzoo.hub must behave otherwise.

Prints one line per behaviour that src/fusionzoo/hub.py's module docstring lists as the reason
fusionzoo does not adopt the mixin. No network: a local folder and an empty offline cache.

    python tools/check_hub_mixin.py
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import tempfile
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants as hf_constants
import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn


class Tiny(nn.Module, PyTorchModelHubMixin):
    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.lin = nn.Linear(2, num_classes)


def _error(fn) -> str:
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            fn()
    except Exception as e:  # noqa: BLE001  (we report whatever the mixin raises)
        return f"{type(e).__name__}: {' '.join(str(e).split())[:110]}"
    return "no error"


def main() -> None:
    print(f"huggingface-hub {huggingface_hub.__version__}")
    root = Path(tempfile.mkdtemp())
    model = Tiny()
    model.save_pretrained(root / "a")
    print("files written:", sorted(p.name for p in (root / "a").iterdir()))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        Tiny.from_pretrained(root / "a")
    print("stdout while loading a local folder:", repr(out.getvalue()))

    cfg = root / "a" / "config.json"
    cfg.write_text(json.dumps({"num_classes": 5}))
    print("class count 5 for 3-class weights:", _error(lambda: Tiny.from_pretrained(root / "a")))
    cfg.write_text("{")
    print("corrupt config.json:", _error(lambda: Tiny.from_pretrained(root / "a")))

    model.save_pretrained(root / "b")
    weights = root / "b" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    header = struct.unpack("<Q", bytes(data[:8]))[0]
    data[8 + header + 2] ^= 0x40  # one byte inside the tensor data
    weights.write_bytes(bytes(data))
    with contextlib.redirect_stdout(io.StringIO()):
        flipped = Tiny.from_pretrained(root / "b")
    same = all(torch.equal(a, b) for a, b in zip(flipped.state_dict().values(), model.state_dict().values()))
    print("bit-flipped weights:", "loaded, values differ" if not same else "loaded, values equal")
    weights.write_bytes(bytes(data[: len(data) // 2]))
    print("truncated weights:", _error(lambda: Tiny.from_pretrained(root / "b")))

    os.environ["HF_HUB_OFFLINE"] = "1"
    hf_constants.HF_HUB_OFFLINE = True
    print("uncached hub id offline:", _error(lambda: Tiny.from_pretrained("someone/not-cached", cache_dir=root / "c")))


if __name__ == "__main__":
    main()
