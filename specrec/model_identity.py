"""The identity of one training's artifacts: a hash of the semantic IDs and the target's weights.

Drafter, target and catalog of one training share a vocabulary; those of two trainings do not. Every service
computes this same identity from its artifact directory, reports it (`specrec_model_info{version}`, responses'
`model_version`), and the orchestrator pairs only pods whose identity equals its catalog's.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

# What fixes the output of plain decoding: the item <-> token mapping and the target model. A drafter distilled
# from that target lives beside it and carries the same identity; its own weights change speed, never output.
IDENTITY_FILES = ("semantic_ids/codes.npy", "semantic_ids/meta.json", "target/config.json",
                  "target/model.safetensors")
VERSION_CHARS = 12  # 48 bits: no collision between the handful of trainings live at once
_CHUNK = 1 << 20


@functools.cache
def artifact_version(directory: str | Path) -> str:
    """12 hex digits naming the training in `directory`; files missing from it are hashed as missing."""
    digest = hashlib.sha256()
    root = Path(directory)
    for name in IDENTITY_FILES:
        digest.update(name.encode() + b"\0")
        path = root / name
        if not path.is_file():
            digest.update(b"<missing>\0")
            continue
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()[:VERSION_CHARS]
