"""Safe reading of user files: a code-running pickle is refused and its payload never runs; safetensors headers are
checked before use; tensors are read lazily."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from library.errors import ModelFileError
from library.models.safe_load import load_pickle_weights, open_tensor_file, read_safetensors_header


class _Payload:
    """Unpickling this calls open(marker, "w"), which creates the marker file: proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_code_running_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2), "x": _Payload(str(marker))}}, path)
    with pytest.raises(ModelFileError, match=r"evil\.ckpt: refused to load"):
        open_tensor_file(path)
    assert not marker.exists()
    # the payload is real: an unrestricted load does run it (so the check above can fail)
    other = tmp_path / "ran"
    torch.save({"x": _Payload(str(other))}, tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert other.exists()


def test_pickle_tensors_unwrapped(tmp_path):
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": {"a": torch.ones(2), "meta": 3}, "global_step": 7}, path)
    assert list(load_pickle_weights(path)) == ["a"]
    f = open_tensor_file(path)
    assert f.shapes == {"a": (2,)} and torch.equal(f["a"], torch.ones(2))
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ModelFileError, match=r"list\.pt: holds a list"):
        open_tensor_file(tmp_path / "list.pt")
    (tmp_path / "junk.bin").write_bytes(b"not a pickle")
    with pytest.raises(ModelFileError, match=r"junk\.bin: not a readable PyTorch checkpoint"):
        open_tensor_file(tmp_path / "junk.bin")


def test_safetensors_header_checked_and_tensors_lazy(tmp_path):
    path = tmp_path / "ok.safetensors"
    save_file({"a": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(4, dtype=torch.int64)}, str(path),
              metadata={"k": "v"})
    shapes, meta = read_safetensors_header(path)
    assert shapes == {"a": (2, 3), "b": (4,)} and meta == {"k": "v"}
    f = open_tensor_file(path)
    assert f._handle is None  # nothing read yet
    assert torch.equal(f["a"], torch.arange(6.0).reshape(2, 3)) and len(f) == 2 and "b" in f


def _write(path, header: dict | bytes, data: bytes = b"") -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("header,data,message", [
    (b"{not json", b"", r"not JSON"),
    ({"a": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, r"at key 'a' \(unknown dtype"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, r"at key 'a' \(4 bytes stored"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 4, r"at key 'a' \(data_offsets"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, r"at key 'a' \(shape"),
    ({"__metadata__": {"x": 1}}, b"", r"__metadata__ must map strings to strings"),
])
def test_malformed_headers_are_model_file_errors(tmp_path, header, data, message):
    path = tmp_path / "bad.safetensors"
    _write(path, header, data)
    with pytest.raises(ModelFileError, match=r"bad\.safetensors: malformed safetensors header.*" + message):
        open_tensor_file(path)


def test_truncated_files_and_unknown_types(tmp_path):
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x02")
    with pytest.raises(ModelFileError, match=r"short\.safetensors: not a safetensors file"):
        open_tensor_file(short)
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 10 ** 9) + b"{}")
    with pytest.raises(ModelFileError, match=r"huge\.safetensors: malformed safetensors header \(declared length"):
        open_tensor_file(huge)
    with pytest.raises(ModelFileError, match=r"m\.onnx: unknown model file type"):
        (tmp_path / "m.onnx").write_bytes(b"x")
        open_tensor_file(tmp_path / "m.onnx")
    with pytest.raises(ModelFileError, match=r"nothere\.safetensors: no such file"):
        open_tensor_file(tmp_path / "nothere.safetensors")
