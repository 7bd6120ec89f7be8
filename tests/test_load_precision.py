"""Half-precision runs never hold a full-precision copy of a half-precision model (issue 19): the run loads the
weights as stored (training.setup.load_dtype), casts one tensor at a time (precision.cast_floating_), and the
frozen weights end in the autocast dtype, the VAE in fp32, the adapters in fp32."""

from __future__ import annotations

import copy

import pytest
import torch

from library.config.train import TrainConfig
from library.models.save import save_diffusers
from library.models.tiny import build_tiny
from library.precision import cast_floating_
from library.training.setup import load_dtype
from tests.tinyrun import train_in_process, write_config


@pytest.mark.parametrize(("device", "precision", "expected"), [
    ("cpu", "no", torch.float32), ("cpu", "bf16", None), ("cpu", "fp16", torch.float32),  # fp16 trains fp32 on CPU
    ("auto", "no", torch.float32),
])
def test_load_dtype(device, precision, expected):
    assert load_dtype(TrainConfig(device=device, mixed_precision=precision)) is expected


def test_cast_floating_is_module_to_one_tensor_at_a_time():
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Embedding(5, 2))
    a[1].register_buffer("extra", torch.ones(2, dtype=torch.float16), persistent=False)
    b = copy.deepcopy(a)
    ids = {id(p) for p in b.parameters()}
    a.to(dtype=torch.bfloat16)
    cast_floating_(b, torch.bfloat16)
    assert {id(p) for p in b.parameters()} == ids  # the same Parameter objects (optimizers keep them)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert b[1].num_batches_tracked.dtype == torch.int64  # integers untouched
    assert b[1].extra.dtype == torch.bfloat16 and "extra" not in sb  # non-persistent stays non-persistent


def test_bf16_run_on_an_fp16_model_keeps_frozen_weights_in_16_bits(tmp_path):
    """In a forked process whose accelerate state is reset: AcceleratorState is one per process, and an earlier
    in-process run of this worker may have set another mixed precision."""
    import multiprocessing

    proc = multiprocessing.get_context("fork").Process(target=_bf16_run, args=(tmp_path,))
    proc.start()
    proc.join(600)
    assert proc.exitcode == 0, "the bf16 run's checks failed (traceback above)"


def _bf16_run(tmp_path) -> None:
    from accelerate.state import AcceleratorState

    import library.models.load as load

    AcceleratorState._reset_state(reset_partial_state=True)  # this fork's own: the parent's is untouched

    loaded_as = []

    def spy(*a, **k):  # what the run holds right after loading: the stored fp16, not an fp32 copy
        model = real(*a, **k)
        loaded_as.append({m.dtype for m in (model.unet, *model.text_encoders)})
        return model

    real = load.load_model
    load.load_model = spy
    stored = build_tiny("sd1", seed=3)
    folder = save_diffusers(stored, tmp_path / "fp16", dtype=torch.float16)
    cfg = write_config(tmp_path / "run.toml", tmp_path / "out", "lora",
                       model={"pretrained_model_name_or_path": str(folder)},
                       data={"cache_latents": True},
                       train={"max_train_steps": 2, "mixed_precision": "bf16", "device": "cpu"})
    result = train_in_process("lora", cfg)
    model = result.model
    assert loaded_as == [{torch.float16}]
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert model.vae.dtype == torch.float32
    trained = [p for p in model.unet.parameters() if p.requires_grad]
    assert trained and {p.dtype for p in trained} == {torch.float32}
    frozen = dict(model.unet.named_parameters())
    for k, v in stored.unet.state_dict().items():  # base weights: fp32 -> fp16 (stored) -> bf16, untouched
        name = next(n for n in (k, k.replace(".weight", ".base_layer.weight"), k.replace(".bias", ".base_layer.bias"))
                    if n in frozen)
        assert frozen[name].dtype == torch.bfloat16 and torch.equal(frozen[name], v.half().bfloat16()), k
