"""Run a merge recipe (`library.config.merge.MergeRecipe`): open the inputs, check they fit together, merge tensor
by tensor and write the result atomically with the recipe in its metadata.

Peak memory is a small multiple of the largest tensor: each key's input tensors are read, combined (elementwise modes
in chunks of CHUNK elements, so the float32 temporaries stay small) into an output tensor in the output dtype and
written; reading, merging and writing overlap across at most IN_FLIGHT keys (pipeline.run_pipeline), in reused
buffers. Keys go in the order of model A's file, so the inputs are read and the output written front to back.
"""

from __future__ import annotations

import datetime
import shutil
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch

from library.config.core import config_hash
from library.config.merge import NEEDS, TASK_MODES, MergeRecipe
from library.errors import ConfigError, ModelFileError
from library.fileio import atomic_path
from library.merge import modes
from library.merge.blocks import block_slot, parse_block_alphas, sd3_blocks_in
from library.merge.pipeline import run_pipeline
from library.merge.stream import IN_FLIGHT, RING_MAX_BYTES, WEIGHT_FILES, TensorSource, folder_parts, open_source
from library.merge.sd3_stream import SD3FolderSink, section_gap
from library.merge.writers import DirectSafetensorsWriter, SafetensorsWriter, WriterGroup, open_writer
from library.models.keymaps import KeyMap, from_ldm
from library.models import keymaps_clip as kc
from library.models.families import FAMILIES
from library.models.sd3.single_file import variant_of_keys
from library.models.single_file import NON_WEIGHT_KEYS, SD2_TE, SDXL_TE2
from library.precision import DTYPES

CHUNK = 1 << 22  # elements per float32 work chunk of an elementwise merge (16 MiB)

# combine(key, float32 input tensors, optional float32 result buffer) -> merged tensor (float, same shape).
# Elementwise modes write into the buffer; the others may ignore it.
Combine = Callable[[str, Sequence[torch.Tensor], "torch.Tensor | None"], torch.Tensor]
# False: whole tensors (TIES top-k, LoRA); True: any chunk of elements; "single_op": also on half-precision inputs.
Elementwise = bool | Literal["single_op"]


def run_merge(cfg: MergeRecipe, recipe_text: str, *, progress: bool = True, dry_run: bool = False,
              timings: dict[str, float] | None = None) -> Path | None:
    """Run a checkpoint-merge recipe (library.merge.run.run_recipe dispatches the LoRA modes elsewhere); returns the
    output path. `recipe_text`: the resolved TOML, stored with the output.

    dry_run: open the inputs and check them (family, keys, shapes), print what would be written, write nothing.
    """
    m = cfg.merge
    out = Path(cfg.output.path).expanduser()
    if m.mode in TASK_MODES:
        refs = [m.model_a, *m.models]
        what = ["merge.model_a", *(f"merge.models[{i}]" for i in range(len(m.models)))]
    else:
        refs = [getattr(m, k) for k in NEEDS[m.mode]]
        what = [f"merge.{k}" for k in NEEDS[m.mode]]
    sources = open_sources(refs, what)
    try:
        family = sources[0].family
        combine, elementwise = checkpoint_combine(cfg, family, joint_blocks(sources[0]))
        keys = check_compatible(sources)
        if dry_run:
            print(f"{len(sources)} inputs of family {family} agree on {len(keys)} tensors; {m.mode} would write {out}")
            return None
        return write_merge(sources, keys, combine, elementwise, cfg, recipe_text, progress=progress, timings=timings)
    finally:
        for s in sources:
            s.close()


def open_sources(refs: Sequence[str], what: Sequence[str]) -> list[TensorSource]:
    """Open every input; they must be of one family (ModelFileError naming both otherwise)."""
    sources: list[TensorSource] = []
    try:
        for ref, name in zip(refs, what):
            sources.append(open_source(ref))
            first, new = sources[0], sources[-1]
            if new.family != first.family:
                raise ModelFileError(f"{name} = '{ref}' is an {new.family} model but merge.model_a = "
                                     f"'{first.name}' is {first.family}: merge models of one family")
    except BaseException:
        for s in sources:
            s.close()
        raise
    return sources


def joint_blocks(source: TensorSource) -> int | None:
    """The number of MMDiT joint blocks of an SD3 source (its block slots depend on it); None for the UNets."""
    return sd3_blocks_in(source.entries) if source.family == "sd3" else None


def is_weight(key: str, dtype: torch.dtype, shape: tuple[int, ...]) -> bool:
    """Merged keys: floating tensors that are weights (not schedule buffers, markers or position ids)."""
    return dtype.is_floating_point and key not in NON_WEIGHT_KEYS and len(shape) > 0


def check_compatible(sources: Sequence[TensorSource]) -> list[str]:
    """The keys to write (model A's). Every weight of A must be in each other input with the same shape, and no
    input may hold weights A lacks; non-weight keys (schedule buffers, markers) come from A."""
    a = sources[0]
    for s in sources[1:]:
        gap = section_gap(a, s) if a.family == "sd3" else None
        if gap:
            raise ModelFileError(gap)
        for key, e in a.entries.items():
            if not is_weight(key, e.dtype, e.shape):
                continue
            other = s.entries.get(key)
            if other is None:
                raise ModelFileError(f"{s.name} has no tensor '{key}' that {a.name} has: the models have different "
                                     "architectures (inpainting, refiner or another variant?)")
            if other.shape != e.shape:
                raise ModelFileError(f"'{key}' has shape {list(other.shape)} in {s.name} but {list(e.shape)} in "
                                     f"{a.name}: the models have different architectures")
        extra = [k for k, e in s.entries.items() if k not in a.entries and is_weight(k, e.dtype, e.shape)]
        if extra:
            raise ModelFileError(f"{s.name} has {len(extra)} tensors {a.name} lacks, e.g. '{extra[0]}': the models "
                                 "have different architectures")
    return a.keys()


def checkpoint_combine(cfg: MergeRecipe, family: str, n_blocks: int | None = None) -> tuple[Combine, Elementwise]:
    """The per-key function of the configured mode, and whether it is elementwise (may run on chunks).
    `n_blocks`: SD3's number of joint blocks (`joint_blocks`), which sets its block slots."""
    m = cfg.merge
    if m.mode in TASK_MODES:
        weights = list(m.weights) or [1.0] * len(m.models)

        def task(key: str, ts: Sequence[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
            # A generator per key, seeded from the key's name: the masks do not depend on the order keys are read.
            g = torch.Generator().manual_seed((m.seed * 0x9E3779B1 + zlib.crc32(key.encode())) % (1 << 63))
            return modes.task_merge(m.mode, ts[0], ts[1:], weights, m.density, m.scale, g)  # type: ignore[arg-type]

        return task, False
    alphas = parse_block_alphas(m.block_alphas, family, m.alpha, what="merge.block_alphas",  # type: ignore[arg-type]
                                n_blocks=n_blocks)
    betas = parse_block_alphas(m.block_betas, family, m.beta, what="merge.block_betas",  # type: ignore[arg-type]
                               n_blocks=n_blocks)

    def combine(key: str, ts: Sequence[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        slot = block_slot(key, family)  # type: ignore[arg-type]
        return modes.checkpoint_merge(m.mode, ts, alphas[slot], betas[slot], out=out)  # type: ignore[arg-type]

    return combine, "single_op" if m.mode in modes.SINGLE_OP_MODES else True


def merge_key(key: str, tensors: Sequence[torch.Tensor], combine: Combine, elementwise: Elementwise,
              dtype: torch.dtype, work: Sequence[torch.Tensor] | None = None, ring: OutputRing | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """One key's merged tensor in `dtype`, computed in float32 (in chunks when the mode is elementwise; in one call
    on the stored tensors for a single-op mode whose inputs are already in `dtype`).

    `work`: len(tensors) + 1 float32 buffers of CHUNK elements (`work_buffers`), reused for every chunk and key so
    the merge does not allocate (and page-fault in) fresh float32 memory per chunk. `ring`: where the result goes
    (valid until the ring comes round to its buffer again), for the same reason. `out`: where the result goes
    instead (the output writer's own memory), of `dtype` and the inputs' shape.
    """
    if out is None:
        out = ring.take(tensors[0].shape, dtype) if ring is not None else torch.empty(tensors[0].shape, dtype=dtype)
    if elementwise == "single_op" and all(t.dtype == dtype for t in tensors):
        return combine(key, tensors, out)  # one pass, float32 inside the op: no chunks, no float32 copies
    if not elementwise:
        out.copy_(combine(key, [t.float() for t in tensors], None))
        return out
    work = work or work_buffers(len(tensors))
    flat_out = out.view(-1)
    flats = [t.reshape(-1) for t in tensors]
    for start in range(0, flat_out.numel(), CHUNK):
        n = min(CHUNK, flat_out.numel() - start)
        part = [w[:n].copy_(f[start:start + n]) for w, f in zip(work, flats)]
        flat_out[start:start + n].copy_(combine(key, part, work[-1][:n]))
    return out


class OutputRing:
    """`slots` reused output buffers taken in turn: a tensor from `take` stays valid until `slots` more takes (the
    pipeline has at most IN_FLIGHT keys between read and written, so a ring of IN_FLIGHT never overwrites a result
    before it is written). Results over RING_MAX_BYTES get their own memory, as in SafetensorsFile."""

    def __init__(self, slots: int = IN_FLIGHT) -> None:
        self._bufs = [torch.empty(0, dtype=torch.uint8) for _ in range(slots)]
        self._turn = 0

    def take(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        nbytes = _numel(shape) * torch.empty(0, dtype=dtype).element_size()
        if nbytes > RING_MAX_BYTES:
            return torch.empty(tuple(shape), dtype=dtype)
        slot = self._turn % len(self._bufs)
        self._turn += 1
        if self._bufs[slot].numel() < nbytes:
            self._bufs[slot] = torch.empty(nbytes, dtype=torch.uint8)
        return self._bufs[slot][:nbytes].view(dtype).view(tuple(shape))


def work_buffers(n_inputs: int) -> list[torch.Tensor]:
    return [torch.empty(CHUNK, dtype=torch.float32) for _ in range(n_inputs + 1)]


def read_order(source: TensorSource, keys: Sequence[str]) -> list[str]:
    """`keys` in the order their bytes lie in `source`'s file (one front-to-back pass of model A; inputs written by
    the same tool usually share the order), or as given when the source is not one file."""
    entries = [source.entries[k] for k in keys]
    if any(e.offset is None for e in entries):
        return list(keys)
    return [k for _, k in sorted(zip((e.offset for e in entries), keys), key=lambda p: p[0])]


def write_merge(sources: Sequence[TensorSource], keys: list[str], combine: Combine, elementwise: Elementwise,
                cfg: MergeRecipe, recipe_text: str, *, progress: bool = True,
                timings: dict[str, float] | None = None) -> Path:
    """Merge every key and write the single file or diffusers folder the config asks for (atomically).

    Reading, merging and writing overlap (pipeline.run_pipeline); `timings`, when given, receives each stage's busy
    seconds, the final fsync's and the wall time of the whole write."""
    t_start = time.perf_counter()
    dtype = DTYPES[cfg.output.precision]
    a = sources[0]
    out_path = Path(cfg.output.path).expanduser()
    fmt = cfg.output.format
    if fmt == "auto":
        fmt = "single_file" if out_path.suffix.lower() == ".safetensors" else "diffusers"
    keys = read_order(a, keys)
    specs = {k: (_out_dtype(a.entries[k].dtype, dtype), a.entries[k].shape) for k in keys}  # written in read order
    metadata = recipe_metadata(a, recipe_text, out_path.stem, config_hash(cfg))
    total = sum(_numel(a.entries[k].shape) for k in keys)
    bar = _progress(total, progress, f"merging {len(sources)} models")
    with atomic_path(out_path) as tmp:
        if fmt == "single_file":
            sink: Any = open_writer(tmp, specs, metadata)  # O_DIRECT where the file system takes it
        elif a.family == "sd3":
            sink = SD3FolderSink(tmp, specs, _config_dir(sources, cfg), recipe_text)
        else:
            sink = DiffusersSink(tmp, specs, _config_dir(sources, cfg), a.family, recipe_text)
        work = work_buffers(len(sources)) if elementwise else None
        ring = OutputRing(IN_FLIGHT)

        def compute(key: str, tensors: list[torch.Tensor]) -> torch.Tensor:
            e = a.entries[key]
            if is_weight(key, e.dtype, e.shape):
                # Built in the writer's staging memory when it offers it (O_DIRECT output): no copy after this.
                return merge_key(key, tensors, combine, elementwise, dtype, work, ring, out=sink.buffer(key))
            return tensors[0].to(specs[key][0])  # may alias the read buffer: it stays untouched until written

        def write(key: str, value: torch.Tensor) -> None:
            sink.write(key, value)
            bar.update(_numel(value.shape))

        threads = torch.get_num_threads()
        if elementwise:
            # Elementwise kernels are memory-bound (a second thread gained nothing on 2 cores), and beside the reader
            # and writer threads, OpenMP workers waiting at a barrier for a busy core made torch.lerp 2.3x slower.
            torch.set_num_threads(1)
        try:
            stages = run_pipeline(keys, lambda k: _fetch(sources, k), compute, write, in_flight=IN_FLIGHT)
            sink.close()
        except BaseException:
            sink.abort()
            raise
        finally:
            torch.set_num_threads(threads)
            bar.close()
    if timings is not None:
        timings.update(read_s=stages.read_s, compute_s=stages.compute_s, write_s=stages.write_s,
                       fsync_s=sink.fsync_s, pipeline_wall_s=stages.wall_s, direct_write=float(sink.direct),
                       direct_io_s=getattr(sink, "io_s", 0.0),
                       write_merge_wall_s=time.perf_counter() - t_start)
    return out_path


def _fetch(sources: Sequence[TensorSource], key: str) -> list[torch.Tensor]:
    """Every input's tensor of a weight key; only model A's for the keys copied from A."""
    e = sources[0].entries[key]
    if is_weight(key, e.dtype, e.shape):
        return [s.get(key) for s in sources]
    return [sources[0].get(key)]


def _out_dtype(src: torch.dtype, dtype: torch.dtype) -> torch.dtype:
    return dtype if src.is_floating_point else src


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def recipe_metadata(a: TensorSource, recipe_text: str, title: str, recipe_hash: str) -> dict[str, str]:
    """Header metadata of a merged single file: the recipe (and its hash), prediction type, title and date; SD3
    files also their architecture (as save_sd3_single_file writes it) and "flow" (as our SD3 LoRAs say)."""
    meta = {
        "sdtk_merge_recipe": recipe_text,
        "sdtk_config_hash": recipe_hash,  # library.config.core.config_hash, as in every file we write
        "modelspec.prediction_type": "v" if a.prediction_type == "v_prediction" else "epsilon",
        "modelspec.title": title,
        "modelspec.date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if a.family == "sd3":
        from library.models.families import SD3_VARIANTS

        meta["modelspec.prediction_type"] = "flow"
        meta["modelspec.architecture"] = SD3_VARIANTS[variant_of_keys(a.entries)].architecture
    return meta


def _progress(total: int, enabled: bool, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="param", unit_scale=True, file=sys.stderr,
                dynamic_ncols=True)


def _config_dir(sources: Sequence[TensorSource], cfg: MergeRecipe) -> Path:
    """Configs of a diffusers output: output.config_dir, else the first diffusers-folder input, else bundled (SD3:
    the bundled folder of the variant its keys show)."""
    from library.models.configs import bundled_config_dir, bundled_config_for

    denoiser = FAMILIES[sources[0].family].denoiser  # unet/ or, for SD3, transformer/
    if cfg.output.config_dir:
        d = Path(cfg.output.config_dir).expanduser()
        if not (d / denoiser / "config.json").is_file():
            raise ConfigError(f"output.config_dir = '{d}' is not a diffusers config folder of an "
                              f"{sources[0].family} model (no {denoiser}/config.json)")
        return d
    for s in sources:
        if s.folder is not None:
            return s.folder
    if sources[0].family == "sd3":
        return bundled_config_dir(variant_of_keys(sources[0].entries))
    return bundled_config_for(sources[0].family, sources[0].prediction_type)


class DiffusersSink(WriterGroup):
    """Writes merged single-file keys into a diffusers folder: configs copied from `config_dir`, each key split back
    into diffusers tensors through the key maps and written into its component's weight file at once."""

    def __init__(self, folder: Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], config_dir: Path,
                 family: str, recipe_text: str):
        shutil.copytree(config_dir, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.ckpt",
                                                                          "*.pth", "*.pt", ".*"))
        (folder / "merge_recipe.toml").write_text(recipe_text, encoding="utf-8")
        _, parts = folder_parts(config_dir, family, with_weights=False)
        self.rules: dict[str, tuple[KeyMap, Any]] = {}
        self.writers: dict[str, SafetensorsWriter | DirectSafetensorsWriter] = {}
        self._opened: list[SafetensorsWriter | DirectSafetensorsWriter] = []
        order = {k: i for i, k in enumerate(specs)}  # the order keys will be written in
        for part in parts:
            placed: list[tuple[int, str, tuple[torch.dtype, tuple[int, ...]]]] = []
            for rule in part.keymap.rules:
                key = part.keymap.prefix + rule.ldm
                if key not in specs:
                    raise ModelFileError(f"the merged model has no '{key}', which the configs in {config_dir} "
                                         "expect: set output.config_dir to the inputs' diffusers config folder")
                dt, shape = specs[key]
                km = KeyMap(part.keymap.prefix, (rule,))
                for k, t in from_ldm({key: torch.empty(shape, device="meta")}, km).items():
                    placed.append((order[key], k, (dt, tuple(t.shape))))
                self.rules[key] = (km, part.name)
            # Declared in write order (sorted is stable: a key split in several keeps from_ldm's order), so each
            # component file is written front to back, with O_DIRECT where the file system takes it.
            part_specs = {k: spec for _, k, spec in sorted(placed, key=lambda p: p[0])}
            writer = open_writer(folder / part.name / WEIGHT_FILES[part.name], part_specs, {"format": "pt"})
            self._opened.append(writer)
            self.writers[part.name] = writer
        # Keys no rule covers must be single-file extras (OpenCLIP logit_scale, SD2's padding layer and identity
        # text_projection, position ids, markers): a weight dropped here would be a silent loss.
        ignorable: set[str] = set()
        for part in parts:
            p = part.keymap.prefix
            if p in (SD2_TE, SDXL_TE2):
                layers = kc.n_layers(k for r in part.keymap.rules for k in r.diffusers)
                ignorable.update(kc.openclip_extras_to_ignore(p, specs, layers, sd2=p == SD2_TE))
        stray = [k for k, (dt, shape) in specs.items()
                 if k not in self.rules and k not in ignorable and is_weight(k, dt, shape)]
        if stray:
            raise ModelFileError(f"the merged model has {len(stray)} weights the configs in {config_dir} have no "
                                 f"place for, e.g. '{stray[0]}': set output.config_dir to the inputs' config folder")

    def write(self, key: str, tensor: torch.Tensor) -> None:
        hit = self.rules.get(key)
        if hit is None:
            return  # extras of the single-file layout (position ids, logit_scale, markers): configs carry them
        km, name = hit
        for k, t in from_ldm({key: tensor}, km).items():
            self.writers[name].write(k, t)

