"""Hostile and mismatched files through each script's real loading path (the script's main(), as the shell runs it):
code-running pickles are refused before anything in them runs; malformed or lying .safetensors are refused; LoRA,
embedding and hypernetwork files for another family, width or rank are refused naming the mismatch. Every case is
exit code 2 with one `error:` line naming the file, never a traceback."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import merge_models
import train_hypernetwork
import train_lora
import train_native
import train_textual_inversion

ROOT = Path(__file__).resolve().parent.parent


class _Payload:
    """Unpickling this calls open(marker, "w"): the marker file appearing is proof that code from the file ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_pickle(path: Path, content) -> Path:
    torch.save(content, path)
    return path


def _lying_safetensors(path: Path) -> Path:
    """A header that promises a 4x4 float tensor (64 bytes) while the data area holds 16 bytes."""
    header = json.dumps({"model.diffusion_model.out.2.weight": {"dtype": "F32", "shape": [4, 4],
                                                                 "data_offsets": [0, 64]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    return path


def _garbage_header(path: Path) -> Path:
    path.write_bytes(struct.pack("<Q", 12) + b"{not json!!}" + bytes(8))
    return path


TRAIN_TOML = """
[model]
pretrained_model_name_or_path = "tiny:sd15"
[data]
train_data_dir = "demo:shapes"
resolution = 64
batch_size = 1
min_bucket_reso = 64
max_bucket_reso = 64
num_workers = 0
[train]
max_train_steps = 1
[save]
output_dir = {out}
output_name = "x"
[log]
progress_bar = false
log_with = "none"
"""


def _run(main, tmp_path, capsys, *flags: str, extra: str = "") -> str:
    """Run a script's main with the base config and `flags`; assert exit code 2 and one error line; return it."""
    cfg = tmp_path / "run.toml"
    cfg.write_text(TRAIN_TOML.format(out=json.dumps(str(tmp_path / "out"))) + extra, encoding="utf-8")
    capsys.readouterr()
    rc = main(["--config", str(cfg), *flags])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------------------------ code-running pickles


def test_code_running_pickles_are_refused_through_every_loading_path(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = {"state_dict": {"model.diffusion_model.out.2.bias": torch.zeros(4), "x": _Payload(marker)}}
    ckpt = _evil_pickle(tmp_path / "evil.ckpt", evil)
    emb = _evil_pickle(tmp_path / "evil_embedding.pt", {"string_to_param": {"*": _Payload(marker)}})
    hyper = _evil_pickle(tmp_path / "evil_hypernet.pt", {768: [_Payload(marker)], "name": "x"})
    refused = r"refused to load: the pickle asks to call code.*nothing from it was run"

    # model.pretrained_model_name_or_path (every training script loads the base model through load_model)
    line = _run(train_native.main, tmp_path, capsys, f"--model.pretrained_model_name_or_path={ckpt}")
    assert str(ckpt) in line and re.search(refused, line), line
    # embedding.init_from
    line = _run(train_textual_inversion.main, tmp_path, capsys, f"--embedding.init_from={emb}",
                "--embedding.token_string=<t>", "--embedding.init_word=cat")
    assert str(emb) in line and re.search(refused, line), line
    # hypernetwork.network_weights (continue a file)
    line = _run(train_hypernetwork.main, tmp_path, capsys, f"--hypernetwork.network_weights={hyper}")
    assert str(hyper) in line and re.search(refused, line), line
    # network.network_weights: LoRA files are read from .safetensors only, a pickle is refused by its type
    lora_pt = _evil_pickle(tmp_path / "evil_lora.pt", {"lora_unet_x.lora_down.weight": _Payload(marker)})
    line = _run(train_lora.main, tmp_path, capsys, f"--network.network_weights={lora_pt}")
    assert str(lora_pt) in line and "only .safetensors LoRA files are read" in line, line
    # merge inputs
    line = _merge(tmp_path, capsys, model_a=str(ckpt), model_b="tiny:sd15")
    assert str(ckpt) in line and re.search(refused, line), line
    assert not marker.exists()

    # The payload is real: an unrestricted load runs it (so the checks above can fail).
    torch.load(ckpt, weights_only=False)
    assert marker.exists()


def _merge(tmp_path, capsys, **merge) -> str:
    cfg = tmp_path / "merge.toml"
    table = "\n".join(f"{k} = {json.dumps(v)}" for k, v in {"mode": "weighted_sum", **merge}.items())
    cfg.write_text(f"[merge]\n{table}\n[output]\npath = {json.dumps(str(tmp_path / 'merged.safetensors'))}\n",
                   encoding="utf-8")
    capsys.readouterr()
    rc = merge_models.main(["--config", str(cfg)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    return next(ln for ln in err.splitlines() if ln.startswith("error: "))


def test_code_running_pickle_in_a_resume_state_is_refused(tmp_path, capsys):
    marker = tmp_path / "pwned"
    state = tmp_path / "out" / "state" / "step-00000001"
    state.mkdir(parents=True)
    save_file({"w": torch.zeros(1)}, str(state / "trainable.safetensors"))
    _evil_pickle(state / "training_state.pt", {"counters": {"step": 1, "epoch": 0, "nan_steps": 0},
                                               "x": _Payload(marker)})
    (state / "done").write_text("ok\n")
    line = _run(train_lora.main, tmp_path, capsys, f"--train.resume={state}")
    assert "training_state.pt" in line and "refused to load" in line, line
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ malformed safetensors


@pytest.mark.parametrize("make,message", [
    (_lying_safetensors, r"malformed safetensors header at key 'model\.diffusion_model\.out\.2\.weight' \(data_offsets"),
    (_garbage_header, r"malformed safetensors header \(not JSON"),
])
def test_malformed_safetensors_model_is_refused(tmp_path, capsys, make, message):
    path = make(tmp_path / "model.safetensors")
    line = _run(train_lora.main, tmp_path, capsys, f"--model.pretrained_model_name_or_path={path}")
    assert str(path) in line and re.search(message, line), line
    line = _merge(tmp_path, capsys, model_a="tiny:sd15", model_b=str(path))
    assert str(path) in line and re.search(message, line), line


def test_malformed_safetensors_lora_and_embedding_are_refused(tmp_path, capsys):
    make = _lying_safetensors  # the header checks themselves are unit-tested in test_safe_load.py
    lora = make(tmp_path / "lora.safetensors")
    line = _run(train_lora.main, tmp_path, capsys, f"--network.network_weights={lora}")
    assert str(lora) in line and ("cannot read as safetensors" in line or "malformed" in line), line
    emb = make(tmp_path / "emb.safetensors")
    line = _run(train_textual_inversion.main, tmp_path, capsys, f"--embedding.init_from={emb}",
                "--embedding.token_string=<t>", "--embedding.init_word=cat")
    assert str(emb) in line and "malformed safetensors header" in line, line


# ------------------------------------------------------------------------------------------ wrong family / width


def test_lora_for_another_family_or_rank_is_refused(tmp_path, capsys):
    from library.config.model import ModelConfig
    from library.config.network import NetworkConfig
    from library.models.load import load_model
    from library.networks.kohya import network_state_dict_kohya, save_kohya
    from library.networks.lora import inject_network

    # An SDXL LoRA (SGM key names) into the SD1 model.
    xl = tmp_path / "xl_lora.safetensors"
    save_file({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(2, 64),
               "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(64, 2)},
              str(xl))
    line = _run(train_lora.main, tmp_path, capsys, f"--network.network_weights={xl}")
    assert str(xl) in line and "is a SDXL LoRA" in line and "the model is sd1" in line, line

    # A rank-4 SD1 LoRA into a rank-8 network.
    model = load_model(ModelConfig(pretrained_model_name_or_path="tiny:sd15"))
    net = inject_network(model, NetworkConfig(network_dim=4, network_alpha=1.0))
    r4 = save_kohya(tmp_path / "r4.safetensors", network_state_dict_kohya(model, net, dtype=torch.float32), {})
    line = _run(train_lora.main, tmp_path, capsys, f"--network.network_weights={r4}", "--network.network_dim=8")
    assert str(r4) in line and re.search(r"has shape \[4, \d+\], this network needs \[8, \d+\]; "
                                                       r"check network_dim", line), line


def test_embedding_for_another_family_or_width_is_refused(tmp_path, capsys):
    sd1 = tmp_path / "sd1_emb.safetensors"
    save_file({"emb_params": torch.zeros(1, 48)}, str(sd1))  # the tiny SD1 text encoder is 48 wide (real: 768)
    line = _run(train_textual_inversion.main, tmp_path, capsys, f"--embedding.init_from={sd1}",
                "--embedding.token_string=<t>", "--embedding.init_word=cat", "--model.pretrained_model_name_or_path=tiny:sdxl")
    assert f"{sd1}: holds an SD1/SD2 (one tensor) embedding but the model is sdxl with 2 text encoder(s)" in line, line
    wide = tmp_path / "sd2_emb.safetensors"
    save_file({"emb_params": torch.zeros(1, 80)}, str(wide))  # tiny SD2 width into the SD1 model
    line = _run(train_textual_inversion.main, tmp_path, capsys, f"--embedding.init_from={wide}",
                "--embedding.token_string=<t>", "--embedding.init_word=cat")
    # (exact phrases: bare "80" and "48" could also come from the temporary path, e.g. pytest-480)
    assert f"{wide}: its vectors are 80 wide but the model's text encoder 1 (sd1) is 48 wide" in line, line


def test_hypernetwork_for_other_widths_is_refused(tmp_path, capsys):
    from library.networks.hypernetwork import HypernetworkSpec, create_hypernetwork
    from library.networks.hypernetwork_file import HypernetworkInfo, save_hypernetwork

    # Made for context width 80 (the tiny SD2's); the tiny SD1 UNet has 48 (cross-attention) and 16/32/64 (self).
    hn = create_hypernetwork(HypernetworkSpec(), [80], torch.Generator().manual_seed(0))
    path = save_hypernetwork(tmp_path / "sd2_hn.pt", hn, HypernetworkInfo(name="sd2"))
    line = _run(train_hypernetwork.main, tmp_path, capsys, f"--hypernetwork.network_weights={path}")
    assert "context widths [80] match none of this UNet's attention widths [16, 32, 48, 64]" in line, line


# ------------------------------------------------------------------------------------------ the shell entry point


def test_hostile_model_through_the_shell_exits_2_without_traceback(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = _evil_pickle(tmp_path / "evil.ckpt", {"state_dict": {"a": torch.zeros(1), "x": _Payload(marker)}})
    cfg = tmp_path / "run.toml"
    cfg.write_text(TRAIN_TOML.format(out=json.dumps(str(tmp_path / "out"))), encoding="utf-8")
    proc = subprocess.run([sys.executable, str(ROOT / "train_lora.py"), "--config", str(cfg),
                           f"--model.pretrained_model_name_or_path={ckpt}"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"error: {ckpt}: refused to load" in proc.stderr and not marker.exists()
