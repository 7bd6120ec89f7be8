"""DreamBooth units: [dreambooth] rules, concepts from folders, class-image cache (keys, reuse, resume), dataset
file through the data pipeline (mixed), paired batches (exact weights, resume)."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from library.config.core import load_config
from library.config.dreambooth import DreamBoothConfig
from library.config.model import ModelConfig
from library.errors import ConfigError, DataError
from library.methods.dreambooth import DreamBoothRunConfig
from library.training import class_images as ci

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _images(folder: Path, n: int, colour=(200, 30, 30), caption: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (64, 64), colour).save(folder / f"img{i}.png")
        if caption is not None:
            (folder / f"img{i}.txt").write_text(caption)
    return folder


def _cfg(tmp_path, **db):
    raw = {"data": {"resolution": 64}, "save": {"output_dir": str(tmp_path / "out")},
           "dreambooth": {"concepts": [{"instance_dir": "demo:red", "identifier": "sks", "class_word": "shape"}], **db}}
    return load_config(DreamBoothRunConfig, raw, source="test")


@pytest.mark.parametrize("name", ["quickstart_dreambooth.toml", "sd15_dreambooth.toml", "sdxl_dreambooth.toml"])
def test_example_configs_load(name):
    cfg = load_config(DreamBoothRunConfig, CONFIGS / name)
    assert cfg.dreambooth.concepts and cfg.dreambooth.prior_preservation
    if name.startswith("quickstart"):
        assert cfg.save.output_dir == "output/quickstart_dreambooth" and cfg.model.pretrained_model_name_or_path == "tiny:sd15"
    if name.startswith("sdxl"):
        assert cfg.dreambooth.mode == "lora" and len(cfg.dreambooth.concepts) == 2


@pytest.mark.parametrize("db, data, words", [
    ({"prior_mode": "paired"}, {}, "data.enable_bucket = false"),
    ({"prior_loss_weight": -1.0}, {}, "prior_loss_weight"),
    ({}, {"train_data_dir": "x"}, "keep one"),
    ({"prior_loss_weight": 0.5}, {"prior_loss_weight": 0.3}, "set only dreambooth.prior_loss_weight"),
    ({"concepts": []}, {}, "no DreamBooth concept"),
    ({"concepts": [{"identifier": "sks"}]}, {}, "instance_dir"),
])
def test_config_rules_name_the_keys(tmp_path, db, data, words):
    raw = {"data": data, "dreambooth": {"concepts": [{"instance_dir": "demo:red"}], **db}}
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(".", r"\.")):
        load_config(DreamBoothRunConfig, raw, source="test")


def test_concepts_from_sd_scripts_folders(tmp_path):
    _images(tmp_path / "train" / "10_sks dog", 2)
    _images(tmp_path / "train" / "3_ohwx black cat", 1)
    _images(tmp_path / "reg" / "1_dog", 2)
    got = ci.resolve_concepts(DreamBoothConfig(num_class_images=7), str(tmp_path / "train"), str(tmp_path / "reg"))
    assert [(c.identifier, c.class_word, c.num_repeats, c.instance_prompt) for c in got] == [
        ("sks", "dog", 10, "sks dog"), ("ohwx", "black cat", 3, "ohwx black cat")]
    assert got[0].class_dir == (tmp_path / "reg" / "1_dog").resolve() and got[1].class_dir is None
    assert [c.num_class_images for c in got] == [7, 7] and got[0].class_prompt == "dog"
    with pytest.raises(ConfigError, match="identifier and class_word"):
        ci.resolve_concepts(load_config(DreamBoothRunConfig, {"dreambooth": {"concepts": [
            {"instance_dir": str(tmp_path / "reg" / "1_dog")}]}}, source="t").dreambooth)


def test_cache_key_changes_with_model_and_prompt_only(tmp_path):
    spec = ci.ClassSpec("shape", "", 64, 64, "euler_a", 2, 5.0, 0, 1)
    a = ci.model_identity(ModelConfig(pretrained_model_name_or_path="tiny:sd15"))
    b = ci.model_identity(ModelConfig(pretrained_model_name_or_path="tiny:sd15:seed=3"))
    assert ci.cache_key(a, spec) == ci.cache_key(dict(a), ci.ClassSpec(*vars(spec).values()))
    assert len({ci.cache_key(a, spec), ci.cache_key(b, spec), ci.cache_key(a, ci.ClassSpec("dog", *list(vars(spec).values())[1:])),
                ci.cache_key(a, ci.ClassSpec("shape", "", 64, 64, "euler_a", 3, 5.0, 0, 1))}) == 4
    f = tmp_path / "m.safetensors"
    f.write_bytes(b"x" * 10)
    ident = ci.model_identity(ModelConfig(pretrained_model_name_or_path=str(f)))
    assert ident["files"][0][:2] == [str(f.resolve()), 10]
    f.write_bytes(b"y" * 11)
    assert ci.model_identity(ModelConfig(pretrained_model_name_or_path=str(f))) != ident


@pytest.fixture(scope="module")
def tiny_model():
    from library.models.load import load_model

    return load_model(ModelConfig(pretrained_model_name_or_path="tiny:sd15"))


def test_generation_is_cached_resumable_and_reproducible(tmp_path, tiny_model):
    ident = ci.model_identity(ModelConfig())
    spec = ci.ClassSpec("shape", "", 64, 64, "euler_a", 1, 5.0, 10, 1)
    folder = ci.class_cache_folder(tmp_path, ident, spec)
    loads = []

    def load():
        loads.append(1)
        return tiny_model

    job = ci.ClassJob(folder, spec, 2)
    assert ci.generate_class_images([job], ident, load, progress=False) == 2 and len(loads) == 1
    assert sorted(p.name for p in folder.iterdir()) == ["class_00000.png", "class_00000.txt", "class_00001.png",
                                                         "class_00001.txt", "manifest.json"]
    assert (folder / "class_00001.txt").read_text() == "shape\n"
    first = (folder / "class_00001.png").read_bytes()
    # second run: nothing missing, the model is not even loaded
    assert ci.generate_class_images([job], ident, load, progress=False) == 0 and len(loads) == 1
    # an interrupted run (image 1 missing) resumes with exactly that image, bit-identical (seed = class_seed + i)
    (folder / "class_00001.png").unlink()
    assert ci.generate_class_images([job], ident, load, progress=False) == 1
    assert (folder / "class_00001.png").read_bytes() == first
    # a folder holding another key's images is refused, not mixed
    other = ci.ClassSpec("dog", "", 64, 64, "euler_a", 1, 5.0, 10, 1)
    with pytest.raises(DataError, match="another model or prompt"):
        ci.write_manifest(folder, ident, other)


def test_mixed_dataset_file_through_the_data_pipeline(tmp_path):
    from library.data.loader import build_train_data

    inst = _images(tmp_path / "inst", 3, caption="a circle")
    own = _images(tmp_path / "own_class", 1, colour=(90, 90, 90))
    cfg = load_config(DreamBoothRunConfig, {
        "data": {"resolution": 64, "batch_size": 1, "num_workers": 0, "caption_prefix": "photo, ", "min_bucket_reso": 64},
        "dreambooth": {"prior_loss_weight": 0.25, "num_class_images": 4, "class_cache_dir": str(tmp_path / "cache"),
                       "concepts": [{"instance_dir": str(inst), "identifier": "sks", "class_word": "shape",
                                     "class_dir": str(own), "num_repeats": 2}]}}, source="t")
    concept = ci.resolve_concepts(cfg.dreambooth)[0]
    spec = ci.ClassSpec("shape", "", 64, 64, "euler_a", 1, 5.0, 0, 1)
    folders, job = ci.class_folders(concept, tmp_path / "cache", {"ref": "x"}, spec)
    assert folders[0] == own.resolve() and job.count == 3 and folders[1] == job.folder
    _images(job.folder, 3, colour=(10, 200, 10), caption="shape")  # stand-ins for generated images
    sub, classes = ci.concept_subsets(concept, folders, caption_prefix="photo, ", as_reg=True)
    path = ci.write_dataset_file(tmp_path / "ds.toml", [[sub, *classes]])
    data_cfg = cfg.data.__class__(**{**vars(cfg.data), "dataset_config": str(path), "prior_loss_weight": 0.25})
    data = build_train_data(data_cfg, default_resolution=64, seed=0)
    batches = [b for b in data]
    caps = sorted(c for b in batches for c in b["captions"])
    # 3 instance images x 2 repeats, balanced by 6 class views (4 class images; the first two seen twice)
    assert len(batches) == 12 and caps.count("photo, sks shape, a circle") == 6
    assert caps.count("photo, shape") == 6  # own image has no caption: class prompt; generated ones: their .txt
    weights = {b["captions"][0]: float(b["loss_weights"][0]) for b in batches}
    assert weights["photo, sks shape, a circle"] == 1.0 and weights["photo, shape"] == 0.25
    assert all(bool(b["is_reg"][0]) == (b["captions"][0] == "photo, shape") for b in batches)


def _batch(n: int, fill: float, caption: str) -> dict:
    return {"latents": torch.full((n, 4, 8, 8), fill), "captions": [caption] * n,
            "original_sizes": torch.zeros(n, 2, dtype=torch.long), "crop_top_lefts": torch.zeros(n, 2, dtype=torch.long),
            "target_sizes": torch.zeros(n, 2, dtype=torch.long), "loss_weights": torch.ones(n),
            "is_reg": torch.zeros(n, dtype=torch.bool), "masks": None}


def test_paired_batch_weights_give_the_papers_loss():
    out = ci.pair_batches(_batch(2, 1.0, "sks shape"), _batch(3, 2.0, "shape"), prior_loss_weight=0.5)
    assert out["captions"] == ["sks shape"] * 2 + ["shape"] * 3 and out["is_reg"].tolist() == [False] * 2 + [True] * 3
    assert torch.equal(out["loss_weights"], torch.tensor([2.5, 2.5, 5 / 6, 5 / 6, 5 / 6], dtype=torch.float32))
    assert out["latents"].shape == (5, 4, 8, 8) and out["latents"][:2].eq(1).all() and out["latents"][2:].eq(2).all()
    losses = torch.tensor([1.0, 3.0, 2.0, 4.0, 6.0])
    assert torch.isclose((out["loss_weights"] * losses).mean(), torch.tensor(2.0 + 0.5 * 4.0))
    with pytest.raises(DataError, match="enable_bucket"):
        big = _batch(1, 0.0, "shape")
        big["latents"] = torch.zeros(1, 4, 8, 12)
        ci.pair_batches(_batch(1, 0.0, "x"), big, 1.0)


class _Fake:
    """Stands in for TrainData: `n` batches per epoch, position counted as the loop consumes them."""

    def __init__(self, n, tag):
        self.n, self.tag, self.steps_per_epoch, self.num_images, self.epoch, self.position = n, tag, n, n, 0, 0

    def set_epoch(self, e):
        if e != self.epoch or not 0 < self.position < self.n:
            self.epoch, self.position = e, 0

    def __iter__(self):
        while self.position < self.n:
            self.position += 1
            yield _batch(1, 0.0, f"{self.tag}{self.epoch}.{self.position}")

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, sd):
        self.epoch, self.position = sd["epoch"], sd["position"]


def _paired(classes):
    """DreamBooth's paired form over a stand-in inner method, with `classes` as its class data."""
    from library.methods.dreambooth import DreamBooth
    from library.methods.native import NativeFineTune

    method = DreamBooth(NativeFineTune(None, None), DreamBoothConfig(), None, None, Path("x"))
    method.classes = classes
    return method


def _take(method, data, k):
    """The captions of the next `k` batches the loop's loss sees: instance batch + class batch, in order."""
    out = []
    while len(out) < k:
        for b in data:
            out.append(method.batch_loss(b, len(out), lambda paired: paired["captions"]))
            if len(out) == k:
                return out
        data.set_epoch(data.epoch + 1)
    return out


def test_paired_class_batches_cycle_and_resume_exactly():
    inst, method = _Fake(3, "i"), _paired(_Fake(2, "c"))
    assert _take(method, inst, 4) == [["i0.1", "c0.1"], ["i0.2", "c0.2"], ["i0.3", "c1.1"], ["i1.1", "c1.2"]]
    inst_sd, sd = inst.state_dict(), method.extra_state()
    tail = _take(method, inst, 3)
    inst2, again = _Fake(3, "i"), _paired(_Fake(2, "c"))
    inst2.load_state_dict(inst_sd)
    again.load_extra_state(sd)
    assert _take(again, inst2, 3) == tail == [["i1.2", "c2.1"], ["i1.3", "c2.2"], ["i2.1", "c3.1"]]
    with pytest.raises(ConfigError, match="prior_mode"):
        again.load_extra_state(None)
