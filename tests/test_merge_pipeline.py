"""The pipelined merge: read / merge / write overlap on threads but keep order, exact values and bounded memory; a
failure in any stage reaches the caller and leaves no output behind; per-tensor memory maps never change the input."""

import os
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from library.config.core import load_config
from library.config.merge import MergeRecipe
from library.merge import stream, writers
from library.merge.pipeline import run_pipeline
from library.merge.recipe import OutputRing, read_order
from library.merge.run import run_recipe
from library.merge.stream import SafetensorsFile, open_source
from library.merge.writers import DirectSafetensorsWriter, SafetensorsWriter
from library.models.tiny import resolve_model_ref


def _jitter(i: int) -> None:
    time.sleep((i * 7 % 5) * 0.0005)  # uneven stage times, so a stage that overtook another would show


@pytest.mark.parametrize("in_flight", [1, 2, 4])
def test_pipeline_keeps_order_values_and_bound(in_flight):
    live, peak, lock = [0], [0], threading.Lock()
    written: list[tuple[int, torch.Tensor]] = []

    def read(i):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        _jitter(i)
        return torch.full((3,), float(i))

    def compute(i, t):
        _jitter(i + 1)
        return t * 2 + 1

    def write(i, t):
        _jitter(i + 2)
        written.append((i, t.clone()))
        with lock:
            live[0] -= 1

    times = run_pipeline(list(range(40)), read, compute, write, in_flight=in_flight)
    assert [i for i, _ in written] == list(range(40))
    assert all(torch.equal(t, torch.full((3,), 2.0 * i + 1)) for i, t in written)
    assert peak[0] <= in_flight and live[0] == 0
    assert times.wall_s > 0 and times.read_s > 0 and times.write_s > 0


@pytest.mark.parametrize("stage", ["read", "compute", "write"])
def test_pipeline_failure_reaches_caller_and_stops_writing(stage):
    written: list[int] = []
    threads_before = threading.active_count()

    class Boom(Exception):
        pass

    def maybe_fail(where, i):
        if where == stage and i == 5:
            raise Boom(f"{where} {i}")

    def read(i):
        maybe_fail("read", i)
        return i

    def compute(i, v):
        maybe_fail("compute", i)
        return v

    def write(i, v):
        maybe_fail("write", i)
        written.append(v)

    with pytest.raises(Boom, match=f"{stage} 5"):
        run_pipeline(list(range(50)), read, compute, write, in_flight=3)
    # In order, and nothing from the failed item on (items just before it may be dropped: the output is discarded).
    assert written == list(range(len(written))) and len(written) <= 5
    if stage == "write":
        assert written == list(range(5))
    assert threading.active_count() == threads_before  # both helper threads ended


def test_output_ring_reuses_buffers_in_turn_and_not_big_ones():
    ring = OutputRing(2)
    a, b, c = ring.take((8,), torch.float16), ring.take((2, 2), torch.float32), ring.take((2, 2), torch.float16)
    assert a.data_ptr() == c.data_ptr() != b.data_ptr()  # slot 0 again on the third take (it fits: no regrowth)
    big = ring.take((stream.RING_MAX_BYTES // 2 + 1,), torch.float16)
    assert big.data_ptr() not in (a.data_ptr(), b.data_ptr())


def test_mmap_reads_are_copy_on_write(tmp_path):
    tensors = {"b": torch.arange(5000, dtype=torch.float32), "a": torch.ones(3, 4, dtype=torch.float16),
               "c": torch.zeros(0), "d": torch.arange(7, dtype=torch.int64)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    before = path.read_bytes()
    f = SafetensorsFile(path)
    for k, v in tensors.items():
        got = f.read(k)
        assert torch.equal(got, v) and got.dtype == v.dtype
        got.add_(1)  # private pages: the file must not change
        assert torch.equal(f.read(k), v)
    f.close()
    assert path.read_bytes() == before


def test_read_order_follows_the_data_area(tmp_path):
    a, _ = _single_file_pair(tmp_path, mixed=True)
    src = open_source(str(a))
    f = SafetensorsFile(a)
    by_offset = sorted(f.keys(), key=f.offset)
    assert by_offset != sorted(by_offset)  # safetensors puts float32 data first: header and data orders differ
    assert read_order(src, sorted(src.keys())) == by_offset
    src.close()
    folder = open_source(str(resolve_model_ref("tiny:sd15:seed=1")))  # no single-file offsets: order as given
    keys = list(reversed(folder.keys()[:5]))
    assert read_order(folder, keys) == keys
    folder.close()


def test_writer_writes_back_as_it_goes(tmp_path, monkeypatch):
    monkeypatch.setattr(writers, "WRITEBACK_BYTES", 64)  # request writeback after nearly every tensor
    tensors = {f"t{i}": torch.randn(17 + i, generator=torch.Generator().manual_seed(i)) for i in range(30)}
    path = tmp_path / "w.safetensors"
    advised = []
    real_fadvise = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: (
        advised.append((offset, length, advice)), real_fadvise(fd, offset, length, advice)))
    w = SafetensorsWriter(path, {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()})
    for k, v in tensors.items():
        w.write(k, v)
    w.close()
    assert w.fsync_s >= 0
    with safe_open(str(path), framework="pt") as f:
        assert all(torch.equal(f.get_tensor(k), v) for k, v in tensors.items())
    # Every tensor (68 bytes or more) fills a 64-byte span: one DONTNEED per write, covering the tensor just written
    # and the one before it (whose writeback was requested by the previous call and now leaves the cache).
    data_start = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    spans = [(data_start + w.offsets[k], data_start + w.offsets[k] + v.numel() * 4) for k, v in tensors.items()]
    assert advised == [(spans[max(i - 1, 0)][0], spans[i][1] - spans[max(i - 1, 0)][0], os.POSIX_FADV_DONTNEED)
                       for i in range(len(spans))]


def _single_file_pair(tmp_path, mixed=False):
    """Two small single files with SD1 text-encoder keys (the family marker) and a few UNet keys; `mixed`: the VAE
    key in float32."""
    g = torch.Generator().manual_seed(0)
    keys = {"cond_stage_model.transformer.text_model.final_layer_norm.weight": (8,),
            "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": (4, 4, 3, 3),
            "model.diffusion_model.middle_block.0.emb_layers.1.weight": (6, 5),
            "model.diffusion_model.output_blocks.11.1.norm.bias": (9,),
            "first_stage_model.decoder.conv_in.weight": (3, 2, 1, 1)}
    paths = []
    for name in ("a", "b"):
        path = tmp_path / f"{name}.safetensors"
        tensors = {k: torch.randn(s, generator=g).half() for k, s in keys.items()}
        if mixed:
            tensors["first_stage_model.decoder.conv_in.weight"] = tensors["first_stage_model.decoder.conv_in.weight"].float()
        save_file(tensors, str(path))
        paths.append(path)
    return paths


def test_merge_of_single_files_is_exact_and_in_file_order(tmp_path):
    a, b = _single_file_pair(tmp_path)
    out = tmp_path / "m.safetensors"
    cfg = load_config(MergeRecipe, {"merge": {"model_a": str(a), "model_b": str(b), "alpha": 0.3,
                                              "block_alphas": "GRAD_V"},
                                    "output": {"path": str(out), "precision": "fp16"}})
    timings: dict[str, float] = {}
    run_recipe(cfg, "recipe", progress=False, timings=timings)
    assert set(timings) >= {"read_s", "compute_s", "write_s", "fsync_s", "write_merge_wall_s"}
    fa, fb = SafetensorsFile(a), SafetensorsFile(b)
    from library.merge.blocks import block_slot, parse_block_alphas

    alphas = parse_block_alphas("GRAD_V", "sd1", 0.3, what="x")
    written = SafetensorsFile(out)
    assert sorted(written.keys(), key=written.offset) == sorted(fa.keys(), key=fa.offset)  # A's data order
    for k in fa.keys():
        want = torch.lerp(fa.read(k), fb.read(k), alphas[block_slot(k, "sd1")])
        assert torch.equal(written.read(k), want)


@pytest.mark.parametrize("writer", [SafetensorsWriter, DirectSafetensorsWriter])
def test_failed_merge_leaves_no_output(tmp_path, monkeypatch, writer):
    # The direct writer's logic runs on any file system with a harmless flag in place of O_DIRECT; 0: no O_DIRECT.
    monkeypatch.setattr(writers, "_O_DIRECT", os.O_CLOEXEC if writer is DirectSafetensorsWriter else 0)
    threads_before = threading.active_count()
    a, b = _single_file_pair(tmp_path)
    out = tmp_path / "out" / "m.safetensors"
    calls = [0]
    real_write = writer.write

    def failing_write(self, key, tensor):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("writer failed")
        real_write(self, key, tensor)

    monkeypatch.setattr(writer, "write", failing_write)
    cfg = load_config(MergeRecipe, {"merge": {"model_a": str(a), "model_b": str(b)},
                                    "output": {"path": str(out), "precision": "fp16"}})
    with pytest.raises(RuntimeError, match="writer failed"):
        run_recipe(cfg, "recipe", progress=False)
    assert calls[0] == 3  # nothing written after the failure
    assert list(out.parent.iterdir()) == []  # no output, no temporary file
    assert threading.active_count() == threads_before  # the direct writer's I/O thread ended too


def test_prefetch_reads_inputs_into_the_page_cache(tmp_path, monkeypatch):
    from library.merge import prefetch

    monkeypatch.setattr(prefetch, "STEP", 1 << 20)
    monkeypatch.setattr(prefetch, "PREFETCH_BYTES", 4 << 20)  # the first 4 MiB of each 64 MiB input, no more
    paths = []
    for name in ("a", "b"):
        path = tmp_path / f"{name}.safetensors"
        save_file({"x": torch.zeros(16 << 20)}, str(path))
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        paths.append(path)
    if max(prefetch.cached_fraction(p) for p in paths) > 0.05:
        pytest.skip("this file system keeps the files cached (tmpfs?)")
    thread = prefetch.start_prefetch([str(paths[0]), "tiny:sd15", str(tmp_path / "missing.safetensors"),
                                      str(paths[1])])
    assert thread is not None
    thread.join(timeout=60)
    assert not thread.is_alive()
    for p in paths:
        mib = prefetch.cached_fraction(p) * p.stat().st_size / 2**20
        assert 4 <= mib < 32, mib  # the first 4 MiB, and what the kernel's readahead adds (8 MiB here), not all
    assert prefetch.start_prefetch(["tiny:sd15", str(tmp_path)]) is None  # nothing to prefetch


def test_prefetch_input_refs_by_mode():
    from library.merge.prefetch import input_refs

    def refs(**merge):
        return input_refs(load_config(MergeRecipe, {"merge": merge, "output": {"path": "o.safetensors"}}))

    assert refs(model_a="a", model_b="b") == ["a", "b"]
    assert refs(mode="add_difference", model_a="a", model_b="b", model_c="c") == ["a", "b", "c"]
    assert refs(mode="ties", model_a="a", models=["x", "y"]) == ["a", "x", "y"]


def test_single_file_merge_imports_no_diffusers_or_transformers(tmp_path):
    """Start-up counts in a merge's wall time: merging single files must not import diffusers, transformers,
    accelerate or peft (seconds each); --help must not import torch either."""
    import subprocess
    import sys

    a, b = _single_file_pair(tmp_path)
    out = tmp_path / "m.safetensors"
    heavy = ("diffusers", "transformers", "accelerate", "peft")
    code = ("import sys, merge_models; merge_models.main(sys.argv[1:]); "
            f"print('loaded', [m for m in {heavy!r} if m in sys.modules])")
    root = Path(__file__).resolve().parent.parent
    run = subprocess.run([sys.executable, "-c", code, "--merge.model_a", str(a), "--merge.model_b", str(b),
                          "--output.path", str(out), "--no-progress"], cwd=root, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "loaded []" in run.stdout and out.is_file()
    code = ("import sys, merge_models\ntry:\n    merge_models.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('loaded', [m for m in ('torch', *" + repr(heavy) + ") if m in sys.modules])")
    run = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "loaded []" in run.stdout
