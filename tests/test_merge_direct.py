"""The O_DIRECT output writer: byte for byte what the buffered writer writes, every direct write aligned, a clean
fallback where O_DIRECT is refused (at open or at the first write), errors reaching the caller and nothing left
behind by a failed or aborted write."""

import errno
import os
import threading

import numpy as np
import pytest
import torch
from safetensors import safe_open

from library.config.core import load_config
from library.config.merge import MergeRecipe
from library.fileio import OutputWriteError, atomic_path
from library.merge import recipe, writers
from library.merge.run import run_recipe
from library.merge.writers import DirectSafetensorsWriter, SafetensorsWriter, open_writer


def _tensors():
    """Mixed dtypes and sizes: odd byte counts (so later float32 / int64 tensors are unaligned in the file and cannot
    be built in place), an empty tensor, a scalar, and tensors larger than a (shrunk) staging chunk."""
    g = torch.Generator().manual_seed(0)
    return {
        "h_odd": torch.randn(3, 5, generator=g).half(),  # 30 bytes
        "f32_after_odd": torch.randn(7, 3, generator=g),
        "empty": torch.zeros(0, dtype=torch.float16),
        "big_h": torch.randn(5000, generator=g).half(),  # 10000 bytes: over two 4 KiB pages
        "i64": torch.arange(-9, 11, dtype=torch.int64),
        "scalar": torch.tensor(2.5, dtype=torch.bfloat16),
        "bf16": torch.randn(64, 33, generator=g).bfloat16(),
        "huge_f32": torch.randn(9000, generator=g),  # 36000 bytes: more than the 8 KiB chunk below
        "bool": torch.tensor([True, False, True]),
        "last_h": torch.randn(3, generator=g).half(),  # the file ends unaligned
    }


def _specs(tensors):
    return {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}


@pytest.fixture(params=["real", "emulated"])
def direct_flag(request, monkeypatch, tmp_path):
    """'real': the platform's O_DIRECT (skipped where tmp_path's file system refuses it); 'emulated': O_CLOEXEC in
    its place, so the staging and alignment logic runs on any file system."""
    if request.param == "real":
        probe = tmp_path / "probe"
        try:
            DirectSafetensorsWriter(probe, {}).abort()
        except writers.DirectIOUnsupported:
            pytest.skip("the temporary folder's file system refuses O_DIRECT")
        probe.unlink()
    else:
        monkeypatch.setattr(writers, "_O_DIRECT", os.O_CLOEXEC)
    return request.param


def _spy_pwrite(monkeypatch, fail_direct_with=None):
    """Record (fd, address, length, offset) of every pwrite; optionally fail the writes on one fd."""
    calls = []
    real = os.pwrite
    target = {}

    def spy(fd, data, offset):
        view = memoryview(data).cast("B")
        calls.append((fd, np.frombuffer(view, dtype=np.uint8).ctypes.data if len(view) else 0, len(view), offset))
        if fail_direct_with is not None and fd == target.get("fd"):
            raise OSError(fail_direct_with, os.strerror(fail_direct_with))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", spy)
    return calls, target


def _buffered_bytes(tmp_path, tensors, metadata):
    path = tmp_path / "buffered.safetensors"
    w = SafetensorsWriter(path, _specs(tensors), metadata)
    for k, v in tensors.items():
        w.write(k, v)
    w.close()
    return path.read_bytes()


@pytest.mark.parametrize("chunk", [8192, 1 << 20])
@pytest.mark.parametrize("in_place", [True, False])
def test_direct_writer_is_byte_identical_and_aligned(tmp_path, monkeypatch, direct_flag, chunk, in_place):
    monkeypatch.setattr(writers, "DIRECT_CHUNK_BYTES", chunk)
    monkeypatch.setattr(writers, "DIRECT_QUEUE", 1)
    tensors = _tensors()
    metadata = {"recipe": "x" * 5000}  # a header longer than a page
    want = _buffered_bytes(tmp_path, tensors, metadata)
    calls, target = _spy_pwrite(monkeypatch)
    path = tmp_path / "direct.safetensors"
    w = DirectSafetensorsWriter(path, _specs(tensors), metadata)
    target["fd"] = w._fd
    built_in_place = 0
    for k, v in tensors.items():
        dest = w.buffer(k) if in_place else None
        if dest is not None:
            dest.copy_(v)  # as a merge computes into it
            built_in_place += 1
            w.write(k, dest)
        else:
            w.write(k, v)
    assert w.direct
    w.close()
    assert path.read_bytes() == want
    direct = [c for c in calls if c[0] == target["fd"]]
    assert direct, "nothing went through the O_DIRECT descriptor"
    assert all(addr % 4096 == 0 and n % 4096 == 0 and off % 4096 == 0 for _, addr, n, off in direct)
    # Most of the file goes direct; the rest is the unaligned tail, under one page.
    assert sum(n for _, _, n, _ in direct) == len(want) - len(want) % 4096
    if in_place:
        # Built in place: every tensor whose bytes are aligned for its dtype (the data area starts 8-byte aligned).
        _, offsets, _ = writers._layout(_specs(tensors), metadata)
        aligned = [k for k, v in tensors.items() if offsets[k] % v.element_size() == 0]
        assert built_in_place == len(aligned) and "f32_after_odd" not in aligned
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == metadata
        assert all(torch.equal(f.get_tensor(k), v) for k, v in tensors.items())


def test_direct_writer_reuses_staging_buffers(tmp_path, monkeypatch, direct_flag):
    """Many tensors of varied sizes through small chunks: buffers are reused and trimmed, bytes stay identical."""
    monkeypatch.setattr(writers, "DIRECT_CHUNK_BYTES", 8192)
    monkeypatch.setattr(writers, "DIRECT_FREE_BYTES", 3 * 8192)
    g = torch.Generator().manual_seed(1)
    sizes = [int(n) for n in torch.randint(0, 30000, (60,), generator=g)]
    tensors = {f"t{i}": torch.randn(n, generator=g).half() for i, n in enumerate(sizes)}
    want = _buffered_bytes(tmp_path, tensors, None)
    allocs = []
    real_alloc = DirectSafetensorsWriter._alloc

    def alloc(self, n):
        buf = real_alloc(self, n)
        allocs.append(buf.data_ptr())
        return buf

    monkeypatch.setattr(DirectSafetensorsWriter, "_alloc", alloc)
    path = tmp_path / "r.safetensors"
    w = DirectSafetensorsWriter(path, _specs(tensors))
    for k, v in tensors.items():
        dest = w.buffer(k)
        dest.copy_(v)
        w.write(k, dest)
        assert sum(b.numel() for b in w._free) <= 3 * 8192
    w.close()
    assert path.read_bytes() == want
    assert len(allocs) > 20 and len(set(allocs)) < len(allocs) / 2  # most chunks reused a written buffer


def test_direct_writer_falls_back_when_open_refuses(tmp_path, monkeypatch):
    real_open = os.open
    flag = writers._O_DIRECT or os.O_CLOEXEC
    monkeypatch.setattr(writers, "_O_DIRECT", flag)

    def refusing_open(path, flags, *args):
        if flags & flag:
            raise OSError(errno.EINVAL, "Invalid argument")  # what tmpfs before Linux 6.6 answers
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing_open)
    tensors = _tensors()
    w = open_writer(tmp_path / "o.safetensors", _specs(tensors), {"a": "b"})
    assert type(w) is SafetensorsWriter and not w.direct
    for k, v in tensors.items():
        w.write(k, v)
    w.close()
    assert (tmp_path / "o.safetensors").read_bytes() == _buffered_bytes(tmp_path, tensors, {"a": "b"})


def test_direct_writer_falls_back_when_a_write_is_refused(tmp_path, monkeypatch, direct_flag):
    monkeypatch.setattr(writers, "DIRECT_CHUNK_BYTES", 8192)
    tensors = _tensors()
    want = _buffered_bytes(tmp_path, tensors, None)
    calls, target = _spy_pwrite(monkeypatch, fail_direct_with=errno.EINVAL)
    path = tmp_path / "d.safetensors"
    w = DirectSafetensorsWriter(path, _specs(tensors))
    target["fd"] = w._fd
    for k, v in tensors.items():
        w.write(k, v)
    w.close()
    assert not w.direct
    assert path.read_bytes() == want
    assert len([c for c in calls if c[0] == target["fd"]]) == 1  # one refusal, then the plain descriptor only


def test_direct_write_error_reaches_the_caller_and_leaves_nothing(tmp_path, monkeypatch, direct_flag):
    monkeypatch.setattr(writers, "DIRECT_CHUNK_BYTES", 8192)
    tensors = _tensors()
    threads = threading.active_count()
    _, target = _spy_pwrite(monkeypatch, fail_direct_with=errno.ENOSPC)
    out = tmp_path / "out" / "full.safetensors"
    with pytest.raises(OutputWriteError, match="full.safetensors"), atomic_path(out) as tmp:
        w = DirectSafetensorsWriter(tmp, _specs(tensors))
        target["fd"] = w._fd
        try:
            for k, v in tensors.items():
                w.write(k, v)
            w.close()
        except BaseException:
            w.abort()
            raise
    assert list(out.parent.iterdir()) == []
    assert threading.active_count() == threads


def test_direct_writer_abort_and_order_checks(tmp_path, direct_flag):
    tensors = _tensors()
    threads = threading.active_count()
    path = tmp_path / "a.safetensors"
    w = DirectSafetensorsWriter(path, _specs(tensors))
    keys = list(tensors)
    w.write(keys[0], tensors[keys[0]])
    with pytest.raises(ValueError, match="written twice"):
        w.write(keys[0], tensors[keys[0]])
    with pytest.raises(ValueError, match=f"declared order; '{keys[1]}' comes first"):
        w.write(keys[2], tensors[keys[2]])
    with pytest.raises(ValueError, match="declared"):
        w.write(keys[1], tensors[keys[1]].double())
    w.write(keys[1], tensors[keys[1]])
    with pytest.raises(ValueError, match=f"{len(keys) - 2} declared tensors never written, e.g. {keys[2]}"):
        w.close()
    assert threading.active_count() == threads and w._fd is None  # closed, I/O thread ended
    w.abort()  # again: nothing to do
    with pytest.raises(ValueError, match="write after close"):
        w.write(keys[2], tensors[keys[2]])


def _pair(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    keys = {"cond_stage_model.transformer.text_model.final_layer_norm.weight": (8,),
            "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": (40, 4, 3, 3),
            "model.diffusion_model.middle_block.0.emb_layers.1.weight": (6, 5),
            "model.diffusion_model.output_blocks.11.1.norm.bias": (9,),
            "alphas_cumprod": (1000,),
            "first_stage_model.decoder.conv_in.weight": (3, 2, 1, 1)}
    paths = []
    for name in ("a", "b"):
        path = tmp_path / f"{name}.safetensors"
        save_file({k: torch.randn(s, generator=g).half() if k != "alphas_cumprod" else torch.rand(s, generator=g)
                   for k, s in keys.items()}, str(path))
        paths.append(path)
    return paths


@pytest.mark.parametrize("mode", ["weighted_sum", "add_difference"])
def test_merge_output_same_bytes_direct_or_buffered(tmp_path, monkeypatch, direct_flag, mode):
    a, b = _pair(tmp_path)
    monkeypatch.setattr(recipe, "recipe_metadata", lambda *args: {"fixed": "metadata"})  # no date in the header
    outputs, direct = [], []
    for flag in (writers._O_DIRECT, 0):
        monkeypatch.setattr(writers, "_O_DIRECT", flag)
        out = tmp_path / f"m{flag}.safetensors"
        merge = {"model_a": str(a), "model_b": str(b), "alpha": 0.3, "block_alphas": "GRAD_V", "mode": mode}
        if mode == "add_difference":
            merge["model_c"] = str(a)
        cfg = load_config(MergeRecipe, {"merge": merge, "output": {"path": str(out), "precision": "fp16"}})
        timings: dict[str, float] = {}
        run_recipe(cfg, "recipe", progress=False, timings=timings)
        outputs.append(out.read_bytes())
        direct.append(timings["direct_write"])
    assert direct == [1.0, 0.0]
    assert outputs[0] == outputs[1]


def test_folder_output_same_bytes_direct_or_buffered(tmp_path, monkeypatch, direct_flag):
    """A diffusers-folder output: each component file is declared in write order, so it is written with O_DIRECT
    too, and holds the same bytes as through the page cache."""
    from library.models.tiny import resolve_model_ref

    a, b = (str(resolve_model_ref(f"tiny:sd15:seed={s}")) for s in (1, 2))
    folders, direct = [], []
    for flag in (writers._O_DIRECT, 0):
        monkeypatch.setattr(writers, "_O_DIRECT", flag)
        out = tmp_path / f"folder{flag}"
        cfg = load_config(MergeRecipe, {"merge": {"model_a": a, "model_b": b, "alpha": 0.4, "block_alphas": "GRAD_A"},
                                        "output": {"path": str(out), "precision": "bf16", "format": "diffusers"}})
        timings: dict[str, float] = {}
        run_recipe(cfg, "recipe", progress=False, timings=timings)
        folders.append(out)
        direct.append(timings["direct_write"])
    assert direct == [1.0, 0.0]
    files = sorted(p.relative_to(folders[0]) for p in folders[0].rglob("*.safetensors"))
    assert [f.parent.name for f in files] == ["text_encoder", "unet", "vae"]
    assert files == sorted(p.relative_to(folders[1]) for p in folders[1].rglob("*.safetensors"))
    for rel in files:
        assert (folders[0] / rel).read_bytes() == (folders[1] / rel).read_bytes(), rel
