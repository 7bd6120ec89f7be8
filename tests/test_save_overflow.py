"""Issue 20 item 4: weights that are finite in fp32 but overflow the saving precision are never written as inf.

fp16 tops out at 65504; a LoRA up weight at 1.4e7 (seen in a user's file) becomes inf in an fp16 file while the fp32
weights, which the old check looked at, are finite. The check now runs on the cast tensors.
"""

import pytest
import torch
from safetensors.torch import load_file

from library.training.saving import overflow_message, overflowing_tensors
from library.training.state import list_states, load_state
from tests.tinyrun import assert_outputs_intact, method_class, train_in_process, write_config

BIG = 1.4e7


def test_overflowing_tensors_checks_the_cast_values():
    t = {"small": torch.tensor([1.0, -65504.0]), "edge": torch.tensor([65519.0]),  # rounds to 65504: fits
         "over": torch.tensor([65520.0, 1.0]), "up": torch.tensor([[BIG, 0.0]]), "inf": torch.tensor([float("inf")]),
         "ids": torch.tensor([70000])}  # integers are not cast
    assert overflowing_tensors(t, "fp16") == {"over": 65520.0, "up": BIG}
    assert overflowing_tensors(t, "bf16") == {} and overflowing_tensors(t, "fp32") == {}
    assert overflowing_tensors({"h": torch.tensor([70000.0], dtype=torch.float16)}, "fp16") == {}


def test_overflow_message_names_the_tensors_and_the_fix(tmp_path):
    over = {f"t{i}": float(10 ** (5 + i)) for i in range(5)}
    msg = overflow_message(over, "fp16", 4, tmp_path / "run-step00000002.safetensors", [tmp_path / "state" / "s4"])
    assert msg.startswith("at step 4 the trained weights do not fit in fp16 (largest value 65504): 5 tensors would be "
                          "saved as inf: t4 (max |x| = 1e+09), t3 (max |x| = 1e+08), t2 (max |x| = 1e+07) and 2 more.")
    assert f"the last good result {tmp_path / 'run-step00000002.safetensors'} is kept" in msg
    assert "save.save_precision = 'bf16' (or 'fp32') and resume with train.resume = 'auto'" in msg


class UpWeightGrows:
    """The LoRA method, whose first up (lora_B) weight reaches 1.4e7 after optimizer step `at` (finite in fp32)."""

    def __new__(cls, at: int):
        base = method_class("lora")

        class Growing(base):
            def after_optimizer_step(self, model, step):
                if step + 1 == at:
                    m = self.network.modules[0]
                    with torch.no_grad():
                        m.layer.lora_B[self.network.adapter_name].weight[0, 0] = BIG
                return super().after_optimizer_step(model, step)

        return Growing


def test_a_lora_that_overflows_fp16_is_not_saved_and_the_previous_result_is_intact(tmp_path):
    from library.training.loop import TrainingStopped

    out = tmp_path / "out"
    cfg = write_config(tmp_path / "run.toml", out, "lora", train={"max_train_steps": 6},
                       save={"save_every_n_steps": 2, "save_last_n": 0, "save_precision": "fp16"})
    with pytest.raises(TrainingStopped) as err:
        train_in_process("lora", cfg, method_cls=UpWeightGrows(at=4))
    msg = str(err.value)
    good = out / "run-step00000002.safetensors"
    assert msg.startswith("at step 4 the trained weights do not fit in fp16 (largest value 65504): 1 tensors would be "
                          "saved as inf: unet."), msg
    assert ".lora_B (max |x| = 1.4e+07)." in msg and f"the last good result {good} is kept" in msg, msg
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["run-step00000002.safetensors"]
    # The fp32 weights are finite and kept in a resume state of step 4, from which another precision continues.
    assert [p.name for p in list_states(out)] == ["step-00000002", "step-00000004"]
    assert f"resume state {out / 'state' / 'step-00000004'}" in msg
    state = load_state(list_states(out)[-1])[1]
    assert max(float(v.abs().max()) for v in state.values()) == BIG
    assert_outputs_intact(out)
    assert all(torch.isfinite(v).all() for v in load_file(str(good)).values())


def test_the_last_result_is_a_result_not_the_config_beside_it(tmp_path):
    from library.training.saving import _last_result

    (tmp_path / "run.config.toml").write_text("")
    (tmp_path / "run-step00000002.safetensors.optim").write_text("")
    assert _last_result(tmp_path, "run") is None
    (tmp_path / "run-step00000002.pt").write_text("")
    assert _last_result(tmp_path, "run") == tmp_path / "run-step00000002.pt"


def test_save_kohya_refuses_inf_after_the_cast_and_keeps_the_old_file(tmp_path):
    from library.errors import ModelFileError
    from library.networks.kohya import save_kohya

    path = tmp_path / "lora.safetensors"
    down = torch.ones(2, 8)
    save_kohya(path, {"lora_unet_x.lora_down.weight": down}, {})
    before = path.read_bytes()
    up = torch.tensor([[BIG, 1.0]] * 8).to(torch.float16)  # what network_state_dict_kohya(dtype=fp16) gives
    with pytest.raises(ModelFileError) as err:
        save_kohya(path, {"lora_unet_x.lora_down.weight": down.half(), "lora_unet_x.lora_up.weight": up}, {})
    assert str(err.value) == (f"refusing to write {path}: 1 tensors hold inf or NaN (float16), e.g. "
                              "lora_unet_x.lora_up.weight; nothing was written. Values above 65504 overflow fp16: "
                              "save in bf16 or fp32 (save.save_precision / output.precision)")
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors"]
