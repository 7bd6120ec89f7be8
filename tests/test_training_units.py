"""Exact-value tests of the training loop's small pieces: prompt syntax, seeds, step counts, EMA, resume states."""

import pytest
import torch

from library.config.train import TrainConfig
from library.errors import ConfigError, UserError
from library.training import state as st
from library.training.ema import EMA
from library.training.loop import _due, batch_seed, total_steps
from library.training.sample import SamplePrompt, parse_prompt_line


def test_prompt_line_all_options():
    p = parse_prompt_line("a red circle, white background --n blurry, dark --w 768 --h 512 --d 7 --s 30 --l 5.5",
                          SamplePrompt(prompt=""))
    assert p == SamplePrompt("a red circle, white background", "blurry, dark", 768, 512, 7, 30, 5.5)


def test_prompt_line_defaults_and_order():
    d = SamplePrompt(prompt="", width=64, height=96, steps=8, cfg_scale=3.0)
    assert parse_prompt_line("a cat --s 4 --d 2", d) == SamplePrompt("a cat", "", 64, 96, 2, 4, 3.0)
    assert parse_prompt_line("  just a prompt  ", d).prompt == "just a prompt"


def test_prompt_line_errors_name_the_option():
    with pytest.raises(ConfigError, match="unknown option --x"):
        parse_prompt_line("a cat --x 1", SamplePrompt(prompt=""))
    with pytest.raises(ConfigError, match="--w needs a int"):
        parse_prompt_line("a cat --w wide", SamplePrompt(prompt=""))


def test_batch_seed_is_unique_and_stable():
    assert batch_seed(42, 0) == 42 << 32
    assert batch_seed(42, 5) == (42 << 32) + 5
    assert len({batch_seed(s, n) for s in range(3) for n in range(100)}) == 300


def test_total_steps():
    assert total_steps(TrainConfig(max_train_steps=17), 10) == 17
    assert total_steps(TrainConfig(max_train_epochs=3), 10) == 30
    assert total_steps(TrainConfig(max_train_epochs=3, gradient_accumulation_steps=4), 10) == 9  # ceil(10/4) * 3


def test_due():
    assert _due(10, 5, False, 0, 0) and not _due(11, 5, False, 0, 0)
    assert _due(3, 0, True, 1, 2)  # end of the 2nd epoch, every 2 epochs
    assert not _due(3, 0, True, 0, 2) and not _due(3, 0, False, 1, 2)


def test_ema_warmup_and_values():
    p = torch.nn.Parameter(torch.tensor([0.0]))
    ema = EMA([p], decay=0.9)
    assert ema.current_decay() == pytest.approx(0.1)  # (1+0)/(10+0)
    p.data.fill_(1.0)
    ema.step()  # shadow = 0 + (1 - 0.1) * (1 - 0)
    assert ema.shadow[0].item() == pytest.approx(0.9)
    for _ in range(100):
        ema.step()
    assert ema.current_decay() == 0.9
    with ema.applied():
        assert p.item() == pytest.approx(ema.shadow[0].item())
    assert p.item() == 1.0


def test_state_round_trip_and_incomplete_ignored(tmp_path):
    c = st.Counters(step=12, epoch=3, nan_steps=1)
    w = {"a": torch.arange(4.0)}
    st.save_state(tmp_path, c, w, {"optimizer": {"state": {}, "param_groups": []}, "rng": st.rng_state()}, keep_last=2)
    st.save_state(tmp_path, st.Counters(step=20), w, {"rng": st.rng_state()}, keep_last=2)
    st.save_state(tmp_path, st.Counters(step=30), w, {"rng": st.rng_state()}, keep_last=2)
    names = [p.name for p in st.list_states(tmp_path)]
    assert names == ["step-00000020", "step-00000030"]  # pruned to the newest 2
    (st.state_root(tmp_path) / "step-00000040").mkdir()  # killed mid-save: no 'done' marker
    assert st.find_resume_dir("auto", tmp_path).name == "step-00000030"
    counters, trainable, rest = st.load_state(st.list_states(tmp_path)[-1])
    assert counters.step == 30 and torch.equal(trainable["a"], w["a"])
    with pytest.raises(UserError, match="not a complete resume state"):
        st.find_resume_dir(str(st.state_root(tmp_path) / "step-00000040"), tmp_path)
    assert st.find_resume_dir("", tmp_path) is None


def test_cpu_threads_option_sets_torch_threads_and_rejects_negatives():
    from library.training.run import apply_cpu_threads

    before = torch.get_num_threads()
    try:
        apply_cpu_threads(TrainConfig(cpu_threads=0))
        assert torch.get_num_threads() == before  # 0: PyTorch's own choice is left alone
        apply_cpu_threads(TrainConfig(cpu_threads=before + 1))
        assert torch.get_num_threads() == before + 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ConfigError, match="train.cpu_threads"):
        TrainConfig(cpu_threads=-1).validate()
