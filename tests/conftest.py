import os
import sys
from pathlib import Path

import pytest

# Tests must never reach a model hub, and build their tiny models into a private cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("SDTK_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "sdtk-tests"))

# One torch thread per test process: pytest runs two workers on two cores, and several OpenMP threads per process
# on an oversubscribed machine were measured 10-30x slower than one (spinning threads starve each other).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Test tiers (issue 16), one per test module; `python -m pytest -m unit` runs one tier, the plain command all.
#   unit:       pure functions, file formats, configs and command lines; no training run, no script doing its job.
#   e2e:        a script does its job (trains, captions, merges, checks a dataset) or the training loop runs, on tiny
#               models; a module is e2e when any of its tests is.
#   acceptance: the learning and quality checks: interop with diffusers to 1e-5, full-size layouts, memory estimates
#               against real allocations, loss falling / colours learnt where a module is about that.
# `slow` (over ~20 s) is a separate marker that combines with these: `-m "e2e and not slow"`.
TIERS = ("unit", "e2e", "acceptance")
TIER_OF_MODULE = {
    "test_bad_data.py": "e2e",
    "test_caption_keys.py": "unit",
    "test_caption_levels.py": "unit",
    "test_captioning_cli.py": "unit",
    "test_captioning_datasets.py": "e2e",
    "test_captioning_run.py": "e2e",
    "test_captioning_units.py": "unit",
    "test_cli_names.py": "unit",
    "test_comfy_rules.py": "unit",
    "test_config_core.py": "unit",
    "test_config_fuzz.py": "unit",
    "test_config_scripts.py": "unit",
    "test_configs.py": "unit",
    "test_data_buckets.py": "unit",
    "test_data_cache.py": "unit",
    "test_data_captions.py": "unit",
    "test_data_config.py": "unit",
    "test_data_dataset.py": "unit",
    "test_data_hf.py": "unit",
    "test_data_hf_train.py": "e2e",
    "test_data_sampler.py": "unit",
    "test_deepspeed.py": "e2e",
    "test_demo.py": "unit",
    "test_diffusion.py": "unit",
    "test_distributed.py": "e2e",
    "test_doctor.py": "e2e",
    "test_doctor_datasets.py": "e2e",
    "test_dreambooth.py": "unit",
    "test_dreambooth_train.py": "e2e",
    "test_estimate.py": "acceptance",
    "test_faults_run.py": "e2e",
    "test_hostile_files.py": "e2e",
    "test_hypernetwork.py": "unit",
    "test_hypernetwork_train.py": "e2e",
    "test_import_graph.py": "unit",
    "test_keymaps.py": "acceptance",
    "test_lean_start.py": "e2e",
    "test_load_index.py": "acceptance",
    "test_load_precision.py": "e2e",
    "test_lora_interop.py": "acceptance",
    "test_lora_keys.py": "acceptance",
    "test_lora_network.py": "unit",
    "test_lora_tools.py": "unit",
    "test_merge_blocks.py": "unit",
    "test_merge_configs.py": "unit",
    "test_merge_direct.py": "unit",
    "test_merge_lora.py": "e2e",
    "test_merge_modes.py": "unit",
    "test_merge_pipeline.py": "e2e",
    "test_merge_stream.py": "e2e",
    "test_meta_load.py": "unit",
    "test_models_load.py": "unit",
    "test_models_tiny.py": "unit",
    "test_native_resolution.py": "e2e",
    "test_optim.py": "unit",
    "test_python_support.py": "unit",
    "test_released_files.py": "unit",
    "test_resume.py": "e2e",
    "test_run_plan.py": "e2e",
    "test_safe_load.py": "unit",
    "test_save_overflow.py": "e2e",
    "test_schedule_shift.py": "unit",
    "test_sd3_dreambooth.py": "acceptance",
    "test_sd3_estimate.py": "unit",
    "test_sd3_flow.py": "unit",
    "test_sd3_lora.py": "acceptance",
    "test_sd3_merge.py": "acceptance",
    "test_sd3_merge_blocks.py": "unit",
    "test_sd3_models.py": "unit",
    "test_sd3_sample.py": "acceptance",
    "test_sd3_single_file.py": "acceptance",
    "test_sd3_text.py": "acceptance",
    "test_sd3_train.py": "e2e",
    "test_single_file.py": "acceptance",
    "test_text.py": "acceptance",
    "test_text_cache.py": "e2e",
    "test_text_cache_disk.py": "e2e",
    "test_textual_inversion.py": "unit",
    "test_textual_inversion_train.py": "e2e",
    "test_tiers.py": "unit",
    "test_train_lora.py": "e2e",
    "test_train_native.py": "e2e",
    "test_training_units.py": "unit",
    "test_validation.py": "e2e",
    "test_validation_model.py": "acceptance",
}


class _Unclassified(pytest.Module):
    """A test module missing from TIER_OF_MODULE: collecting it is an error that says what to add (a collection
    error, so pytest-xdist's workers report it as well)."""

    def collect(self):
        raise self.CollectError(
            f"{self.path.name} has no tier: add it to TIER_OF_MODULE in tests/conftest.py as one of "
            f"{', '.join(TIERS)} (the definitions are above the table)")


def pytest_pycollect_makemodule(module_path, parent):
    if module_path.name not in TIER_OF_MODULE:
        return _Unclassified.from_parent(parent, path=module_path)
    return None


def pytest_collection_modifyitems(config, items):
    """Mark every collected test of this folder with its module's tier."""
    here = Path(__file__).resolve().parent
    for item in items:
        if item.path.parent == here and item.path.name in TIER_OF_MODULE:
            item.add_marker(getattr(pytest.mark, TIER_OF_MODULE[item.path.name]))


@pytest.fixture(scope="session")
def one_thread():
    """One intra-op torch thread for the tiny models: on the shared 2-core machine a second thread only adds
    contention (measured 8-30x slower). Used by modules with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _fingerprint(model) -> tuple:
    """What a test could change in a shared model: every tensor's name, shape, dtype, device, requires_grad and
    value sum, the modules there are (an injected adapter adds some), and each tokenizer's vocabulary size."""
    import torch

    parts = []
    for part in (model.unet, model.vae, *model.text_encoders):
        with torch.no_grad():
            tensors = [(n, tuple(t.shape), str(t.dtype), str(t.device), t.requires_grad, float(t.double().sum()))
                       for n, t in [*part.named_parameters(), *part.named_buffers()]]
        parts.append((type(part).__name__, tuple(n for n, _ in part.named_modules()), tuple(tensors)))
    return (model.family, model.prediction_type, repr(model.extra), tuple(parts),
            tuple(len(t) for t in model.tokenizers))


@pytest.fixture(scope="session")
def tiny_models():
    """`tiny_models(family, seed=0, prediction_type=None)`: library.models.tiny.build_tiny's model, built once per
    session and shared. Read-only: a test that changes a model (injects a network, sets requires_grad, adds
    tokens, loads weights, edits `extra`) takes `copy.deepcopy` of it. At the end of the session every shared
    model is checked to be unchanged, so a test that broke that rule fails the run, naming the model."""
    from library.models.tiny import build_tiny

    built: dict[tuple, tuple] = {}

    def get(family: str, seed: int = 0, prediction_type: str | None = None):
        key = (family, seed, prediction_type)
        if key not in built:
            model = build_tiny(family, seed=seed, prediction_type=prediction_type)
            built[key] = (model, _fingerprint(model))
        return built[key][0]

    yield get
    changed = [key for key, (model, before) in built.items() if _fingerprint(model) != before]
    assert not changed, f"a test changed the shared tiny model(s) {changed}: deepcopy a shared model before changing it"


@pytest.fixture(scope="session")
def full_size_meta():
    """{"sd15" | "sd21" | "sdxl": SDModel}: the released architectures at full size on the meta device (no memory,
    no weights), built from the bundled config folders once per session; read-only, and checked at the session's end
    to have the same modules and trainable tensors (their values cannot change: there are none)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from library.models.configs import bundled_config_dir
    from library.models.model import SDModel

    def build(name: str, family: str) -> SDModel:
        d = bundled_config_dir(name)
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(d / "unet"))
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(d / "vae"))
            tes = [CLIPTextModel(CLIPTextConfig.from_pretrained(d / "text_encoder"))]
            if family == "sdxl":
                tes.append(CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(d / "text_encoder_2")))
        return SDModel(family, "epsilon", unet, vae, tes, [], {}, f"meta:{name}", d)

    def shape(model) -> tuple:
        return tuple((tuple(n for n, _ in part.named_modules()),
                      tuple((n, tuple(p.shape), p.requires_grad) for n, p in part.named_parameters()))
                     for part in (model.unet, model.vae, *model.text_encoders))

    models = {name: build(name, family) for name, family in (("sd15", "sd1"), ("sd21", "sd2"), ("sdxl", "sdxl"))}
    before = {name: shape(m) for name, m in models.items()}
    yield models
    changed = [name for name, m in models.items() if shape(m) != before[name]]
    assert not changed, f"a test changed the shared full-size meta model(s) {changed}: build its own instead"


@pytest.fixture(scope="session")
def tiny_sd1(tiny_models):
    """The shared tiny SD1 model (build_tiny("sd1")); read-only, see tiny_models."""
    return tiny_models("sd1")


@pytest.fixture(scope="session")
def tiny_sd3(tiny_models):
    """The shared tiny SD3 model (build_tiny("sd3")); read-only, see tiny_models."""
    return tiny_models("sd3")
