"""Modality names and their default channel counts."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

# Channels of each modality as it enters an encoder. HHA (Gupta et al., ECCV 2014) encodes depth
# as horizontal disparity, height above ground and angle with gravity: three channels. Event and
# LiDAR streams are 3-channel images as DeLiVER and KITTI-360 (CMNeXt, CVPR 2023) store them.
DEFAULT_CHANNELS: dict[str, int] = {"rgb": 3, "depth": 1, "thermal": 1, "hha": 3, "event": 3, "lidar": 3}


def check_modality_names(modalities: Iterable[str]) -> tuple[str, ...]:
    """Validate a modality tuple: known names, no duplicates, at least one stream.

    Raises:
        ValueError: naming the offending entry and the known modalities.
    """
    if isinstance(modalities, str):
        # ValueError, not TypeError: every bad `modalities` argument raises ValueError (documented above)
        raise ValueError(f"modalities must be a tuple of names such as ('rgb', 'depth'), got the string {modalities!r}")  # noqa: TRY004
    mods = tuple(modalities)
    if not mods:
        raise ValueError("modalities is empty; give at least one, e.g. ('rgb', 'depth')")
    for m in mods:
        if m not in DEFAULT_CHANNELS:
            raise ValueError(f"unknown modality {m!r}; known modalities: {sorted(DEFAULT_CHANNELS)}")
    if len(set(mods)) != len(mods):
        raise ValueError(f"modalities {mods} repeat a name")
    return mods


def resolve_in_chans(modalities: tuple[str, ...], in_chans: Mapping[str, int] | None = None) -> dict[str, int]:
    """Channels per modality: the defaults, overridden by ``in_chans`` (e.g. ``{"depth": 3}`` for
    depth replicated to three channels).

    Raises:
        ValueError: an override for a modality the model does not have, or a non-positive count.
    """
    chans = {m: DEFAULT_CHANNELS[m] for m in modalities}
    for m, c in (in_chans or {}).items():
        if m not in chans:
            raise ValueError(f"in_chans names modality {m!r}, which is not among the model's modalities {modalities}")
        if not isinstance(c, int) or c < 1:
            raise ValueError(f"in_chans[{m!r}] must be a positive int, got {c!r}")
        chans[m] = c
    return chans
