"""Files laid out as kubelet mounts a Secret or ConfigMap (links inside the mount only)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path


def kubelet_mount(directory: Path, files: Mapping[str, bytes], *, mode: int | None = None) -> None:
    """Write `files` as kubelet does: `name -> ..data/name`, `..data -> ..<timestamp>/`,
    each file with `mode` when given."""
    stamp = directory / "..2026_11_26_12_00_00.000000001"
    stamp.mkdir(parents=True)
    for name, data in files.items():
        (stamp / name).write_bytes(data)
        if mode is not None:
            (stamp / name).chmod(mode)
        (directory / name).symlink_to(Path("..data") / name)
    (directory / "..data").symlink_to(stamp.name)
