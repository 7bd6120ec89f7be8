"""End to end: train_textual_inversion.py on the tiny models; the files load in diffusers with the trained vectors,
every other embedding row stays bit-identical, and (slow) the token learns a colour."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from library.config.core import load_config
from library.config.embedding import TextualInversionConfig
from library.config.model import ModelConfig
from library.models.load import load_model
from library.models.tiny import resolve_model_ref
from library.training.run import run_training
from tests.test_textual_inversion import a1111_read
from library.methods.textual_inversion import TextualInversion, make_method

TOKEN = "<red-thing>"


def ti_cfg(tmp_path, family: str, steps: int, **tables) -> TextualInversionConfig:
    data = {
        "model": {"pretrained_model_name_or_path": f"tiny:{family}"},
        "data": {"train_data_dir": "demo:red", "resolution": 64, "batch_size": 2, "min_bucket_reso": 64,
                 "max_bucket_reso": 128, "num_workers": 0},
        "train": {"max_train_steps": steps, "seed": 1},
        # Weight decay on purpose: it would move every row of the matrix if the row guard did not restore them.
        "optimizer": {"learning_rate": 2e-2, "weight_decay": 0.1},
        "embedding": {"token_string": TOKEN, "init_word": "shape"},
        "save": {"output_dir": str(tmp_path / "out"), "output_name": "emb", "save_precision": "fp32"},
        "log": {"progress_bar": False},
    }
    for table, values in tables.items():
        data.setdefault(table, {}).update(values)
    return load_config(TextualInversionConfig, data, source="test")


def base_embeddings(family: str) -> list[torch.Tensor]:
    model = load_model(ModelConfig(pretrained_model_name_or_path=f"tiny:{family}"))
    return [enc.get_input_embeddings().weight.detach().clone() for enc in model.text_encoders]


def check_rows(method: TextualInversion, family: str) -> list[torch.Tensor]:
    """Every old row bit-identical to the base model's; the new rows moved off their init word ("shape")."""
    trained = []
    for guard, base in zip(method.guards, base_embeddings(family)):
        weight = guard.weight.detach()
        assert torch.equal(weight[: base.shape[0]], base)
        assert guard.ids.tolist()[0] == base.shape[0] and weight.shape[0] == base.shape[0] + len(guard.ids)
        rows = guard.rows().clone()
        init = base[model_ids("shape")]
        assert len(init) == 1 and not torch.equal(rows, init.expand_as(rows))
        trained.append(rows)
    return trained


def test_sd15_multivector_run_loads_in_diffusers_with_token_in_negative_prompt(tmp_path):
    from diffusers import StableDiffusionPipeline

    cfg = ti_cfg(tmp_path, "sd15", 4, embedding={"num_vectors_per_token": 2},
                 sample={"prompts": [f"a {TOKEN} --n {TOKEN}, blurry --s 2 --d 1"], "steps": 2})
    method = make_method(cfg)
    result = run_training(cfg, method, script="train_textual_inversion.py")
    out = tmp_path / "out"
    assert result.steps == 4 and all(np.isfinite(result.losses))
    assert result.result_path == out / "emb.safetensors"
    assert (out / "sample" / "final_step00000004_00.png").is_file() and (out / "emb.config.toml").is_file()

    (rows,) = check_rows(method, "sd1")
    data = load_file(str(result.result_path))
    assert list(data) == ["emb_params"] and torch.equal(data["emb_params"], rows)
    assert torch.equal(a1111_read(data)["te"], rows)

    pipe = StableDiffusionPipeline.from_pretrained(str(resolve_model_ref("tiny:sd15")), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.load_textual_inversion(str(result.result_path), token=TOKEN)
    ids = pipe.tokenizer.convert_tokens_to_ids([TOKEN, f"{TOKEN}_1"])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids].detach(), rows)
    image = pipe(f"a {TOKEN}", negative_prompt=TOKEN, num_inference_steps=2, height=64, width=64,
                 output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def model_ids(word: str) -> list[int]:
    from transformers import CLIPTokenizer

    from library.models.configs import CONFIGS_ROOT

    return CLIPTokenizer.from_pretrained(str(CONFIGS_ROOT / "clip_tokenizer"))(word, add_special_tokens=False).input_ids


def test_sdxl_trains_both_encoders_and_loads_in_diffusers_once_per_encoder(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    cfg = ti_cfg(tmp_path, "sdxl", 2, embedding={"format": "safetensors"})
    method = make_method(cfg)
    result = run_training(cfg, method, script="train_textual_inversion.py")
    rows_l, rows_g = check_rows(method, "sdxl")
    data = load_file(str(result.result_path))
    assert sorted(data) == ["clip_g", "clip_l"] and data["clip_l"].shape == (1, 48) and data["clip_g"].shape == (1, 96)
    assert torch.equal(data["clip_l"], rows_l) and torch.equal(data["clip_g"], rows_g)
    read = a1111_read(data)
    assert torch.equal(read["clip_g"], rows_g)

    pipe = StableDiffusionXLPipeline.from_pretrained(str(resolve_model_ref("tiny:sdxl")))
    pipe.load_textual_inversion(data["clip_l"], token=TOKEN, text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(data["clip_g"], token=TOKEN, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    for tok, enc, rows in [(pipe.tokenizer, pipe.text_encoder, rows_l), (pipe.tokenizer_2, pipe.text_encoder_2,
                                                                         rows_g)]:
        (i,) = tok.convert_tokens_to_ids([TOKEN])
        assert torch.equal(enc.get_input_embeddings().weight[i].detach(), rows[0])


def test_resume_state_and_pt_output_and_init_from_result(tmp_path):
    """A .pt result, then a second run that starts from it (init_from): its first rows equal the file's vectors."""
    cfg = ti_cfg(tmp_path, "sd15", 2, embedding={"format": "pt"})
    method = make_method(cfg)
    result = run_training(cfg, method, script="train_textual_inversion.py")
    assert result.result_path.suffix == ".pt"
    data = torch.load(result.result_path, weights_only=True)
    (rows,) = [g.rows() for g in method.guards]
    assert torch.equal(data["string_to_param"]["*"], rows) and data["step"] == 2 and data["name"] == TOKEN

    from library.training.state import list_states, load_state

    _, trainable, _ = load_state(list_states(cfg.save.output_dir)[-1])
    assert list(trainable) == ["te0.rows"] and torch.equal(trainable["te0.rows"], rows)

    cfg2 = ti_cfg(tmp_path / "second", "sd15", 1, embedding={"init_from": str(result.result_path)})
    model = load_model(cfg2.model)
    method2 = make_method(cfg2)
    method2.setup(model)
    assert torch.equal(method2.guards[0].rows(), rows)


def redness(images) -> float:
    a = np.stack([np.asarray(i, dtype=np.float32) for i in images])
    return float((a[..., 0] - a[..., 2]).mean())


@pytest.mark.slow
def test_token_learns_the_colour_of_its_concept(tmp_path):
    """On a base that knows colours (tests/colour_base.py: the tiny model fine-tuned on demo:shapes), only the
    token trains, starting from "blue", on red shapes whose captions never say 'red': samples of the token go from
    blue to red.

    (A random tiny UNet is no base for this: its output hardly depends on the text, so no embedding shifts it.)
    Measured: mean R - B -51 before, +121 after (8 seeds; 0-255 scale).
    """
    from library.networks import embeddings as ti
    from library.training.sample import SamplePrompt, generate
    from tests.colour_base import colour_base

    model_ref = colour_base()
    cfg = ti_cfg(tmp_path, "sd15", 150, model=model_ref, data={"batch_size": 4},
                 embedding={"num_vectors_per_token": 2, "init_word": "blue"},
                 optimizer={"learning_rate": 5e-2, "weight_decay": 0.0},
                 save={"save_state": False})
    result = run_training(cfg, make_method(cfg), script="train_textual_inversion.py")
    prompts = [SamplePrompt(f"a {TOKEN} on a white background", width=64, height=64, steps=15, cfg_scale=4.0, seed=i)
               for i in range(6)]
    before, after = load_model(cfg.model), load_model(cfg.model)
    ti.add_token(before.tokenizers[0], before.text_encoders[0], TOKEN, 2, "blue")
    (vectors,) = ti.embedding_vectors(ti.read_embedding_file(result.result_path), "sd1", [48], "result")
    ti.add_token(after.tokenizers[0], after.text_encoders[0], TOKEN, 2, "", vectors)
    images_before = generate(before, prompts, sampler="euler_a", base_seed=0)
    images_after = generate(after, prompts, sampler="euler_a", base_seed=0)
    shifts = [redness([a]) - redness([b]) for b, a in zip(images_before, images_after)]
    assert redness(images_before) < 0, redness(images_before)  # the token starts as "blue"
    assert min(shifts) > 0 and np.mean(shifts) > 50, shifts  # mean (R - B) on a 0-255 scale
