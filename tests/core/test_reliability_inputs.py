"""Reliability on crafted input (issue 13): every bad file is a FormatError/ValueError naming the file."""

from __future__ import annotations

import json
import struct

import pytest

from diffbias_core.formats import FormatError, load_sae, read_header


def safetensors_bytes(header: dict | str, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, str) else json.dumps(header)
    raw = raw.encode()
    return struct.pack("<Q", len(raw)) + raw + data


# ------------------------------------------------------------------------------------------------ case 12
def test_reliability_deeply_nested_header_is_a_format_error(tmp_path):
    """Case 12: a header of deeply nested JSON (a RecursionError in the parser) is a FormatError naming the file,
    for a file and for a layout folder's cfg.json."""
    path = tmp_path / "deep.safetensors"
    path.write_bytes(safetensors_bytes("[" * 100_000 + "]" * 100_000))
    with pytest.raises(FormatError, match="deep.safetensors"):
        read_header(path)
    folder = tmp_path / "layout"
    folder.mkdir()
    (folder / "sae.safetensors").write_bytes(safetensors_bytes("[" * 100_000 + "]" * 100_000))
    (folder / "cfg.json").write_text("{}")
    with pytest.raises(FormatError, match="sae.safetensors"):
        load_sae(folder)
    (folder / "cfg.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(FormatError, match="cfg.json"):
        load_sae(folder)
