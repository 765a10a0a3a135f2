"""``python -m diffbias_core info PATH [--json]``: what an SAE (file or folder) or a feature-set file holds.

Reads the file headers and ``cfg.json``, and checks every recorded digest (``digest``: ``ok``, or ``no digest``
for a file written without them; a mismatch is an error). The data is hashed in bounded memory.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..attribute.features import FEATURES_FORMAT
from ..base.safefile import digest_status
from ..base.tensorfile import DIGESTS_KEY, FormatError, read_header
from ..sae.formats import sae_metadata
from ..sae.importers import WEIGHT_FILES


def describe(path: Path) -> dict[str, object]:
    """Metadata of an SAE or feature-set file or SAE folder, as a JSON-ready dict (``kind`` says which)."""
    if path.is_file():
        header, metadata, _ = read_header(path)
        if metadata.get("format") == FEATURES_FORMAT:
            return {**_describe_features(path, header, metadata), "digest": digest_status(path)}
    info: dict[str, object] = {"kind": "sae", "path": str(path), **sae_metadata(path)}
    info.pop(DIGESTS_KEY, None)
    weights = [path / name for name in WEIGHT_FILES if (path / name).is_file()] if path.is_dir() else [path]
    info["digest"] = digest_status(weights[0]) if weights else "no digest"
    if isinstance(info.get("provenance"), str):
        info["provenance"] = _json_or_text(str(info["provenance"]))
    return info


def _describe_features(path: Path, header: dict[str, dict], metadata: dict[str, str]) -> dict[str, object]:
    classes = _json_or_text(metadata.get("classes", "[]"))
    if not isinstance(classes, list):
        raise FormatError(
            f"{path}: metadata 'classes' must be a JSON list, found {metadata.get('classes')!r}"
        )
    counts = {
        str(name): (header.get(f"ids.{i}") or {}).get("shape", ["?"])[0] for i, name in enumerate(classes)
    }
    return {
        "kind": "features",
        "path": str(path),
        **{
            key: value for key, value in metadata.items() if key not in ("classes", "provenance", DIGESTS_KEY)
        },
        "classes": classes,
        "features_per_class": counts,
        "provenance": _json_or_text(metadata.get("provenance", "{}")),
    }


def _json_or_text(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def run(args: argparse.Namespace) -> int:
    """Print the description of ``args.path``; 1 with a message on stderr when it cannot be read."""
    try:
        info = describe(Path(args.path))
    except (FormatError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    width = max(len(key) for key in info)
    for key, value in info.items():
        shown = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value
        print(f"{key:<{width}}  {shown}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``info`` command."""
    parser = subparsers.add_parser(
        "info",
        help="show what an SAE file/folder or a feature-set file holds",
        description="Show the metadata of an SAE (native .safetensors, or a sparsify/SAELens/DiffLens folder) "
        "or of a feature-set file, reading only headers.",
    )
    parser.add_argument("path", help="SAE .safetensors file, SAE folder with cfg.json, or feature-set file")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.set_defaults(run=run)


__all__ = ["describe", "register", "run"]
