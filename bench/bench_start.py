"""Start-up benchmark: time and peak memory from process start to the end of the first optimizer step.

    python bench/bench_start.py [--repeat 3] [--baseline-tree DIR] [--full sd15,sdxl] [--full-precision bf16]
        [--skip-tiny]

Tiny run (`tiny:sd15`, the issue 19 settings: LoRA rank 4, batch 2, 64 px, fp32 AdamW, no latent cache, one step),
as a user starts it (`python train_lora.py ...`), interleaved `--repeat` times with `python -c "import torch"`, an
empty interpreter and the floor of any PyTorch trainer (one AdamW step on a 4x4 linear layer: the step imports
TorchDynamo), so machine load hits every variant alike; with
`--baseline-tree` (a checkout of an older commit, e.g. `git worktree add /tmp/base <commit>`) the same run from
that tree too, so before / after come from one run. Wall seconds, CPU seconds (user + system, less sensitive to
other processes on a shared machine) and peak RSS of each child; medians.
Then one instrumented tiny run: wall-clock phases (interpreter, imports, config, model build, weight read,
tokenizer, data index, adapter, first step) and an `-X importtime` run summed by top-level package.
`--full sd15[,sdxl]`: a full-size single file with random weights in the real layout (fp16: SD1.5 2.1 GB, SDXL
6.9 GB; written once into the cache): the same LoRA run at 64 px against diffusers'
`from_single_file(path, config=<bundled config folder>)` + peft LoRA on the attention projections + one step;
"start_s" is process start to the first UNet forward (what loading costs), "first_step_done_s" adds the step
(our LoRA set to the same adapters: `network.target = "attn"`, `train_unet_only`), plus
peak RSS against the file size, and `load_model(dtype=None)` alone.
Writes bench/results/start.json (with the load average before and after).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
CONFIG = """
[model]
pretrained_model_name_or_path = "{model}"
[network]
network_dim = 4
network_alpha = 4
{network}[data]
train_data_dir = "demo:shapes"
resolution = 64
batch_size = {batch}
min_bucket_reso = 64
max_bucket_reso = 64
cache_latents = false
num_workers = 0
[train]
max_train_steps = 1
{train}[save]
output_dir = "{out}"
save_state = false
[log]
log_with = "none"
progress_bar = false
"""
ENV = {"OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}

# The least any PyTorch trainer pays before its first step: import torch, one forward / backward of a 4x4 linear
# layer and one torch.optim.AdamW step. The step imports TorchDynamo (torch/optim/optimizer.py
# `_use_grad_for_differentiable` calls torch._dynamo.graph_break()), which costs about as much as torch itself.
FLOOR_NAME = "floor: torch + one AdamW step"
FLOOR = ("import torch\nm = torch.nn.Linear(4, 4)\nopt = torch.optim.AdamW(m.parameters())\n"
         "m(torch.randn(2, 4)).sum().backward()\nopt.step()\n")

# The instrumented run: timestamps (seconds since the parent started the child) at each phase boundary, by
# wrapping the functions that do each phase; the first optimizer step ends at torch's global step post-hook.
# Both instrumented children: MiB resident now, and the peak so far.
RSS_NOW = r"""
def rss_now():
    import os, resource
    return (int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20,
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""
PHASES = RSS_NOW + r"""
import json, os, sys, time
T0 = float(os.environ["BENCH_T0"]); marks = {"interpreter": time.time() - T0}; spans = {}; mem = {}
def mark(name): marks.setdefault(name, time.time() - T0)
sys.modules["__main__"].__file__ = os.path.join(os.getcwd(), "train_lora.py")  # a script process, as users start it
sys.path.insert(0, os.getcwd()); import library.cli  # the script's first import (library/lean.py, 5)
import torch; mark("import torch")
def timed(obj, attr, phase, first=None):
    fn = getattr(obj, attr, None)
    if fn is None:  # renamed since: that phase is simply not reported
        return
    def wrapper(*a, **k):
        t = time.time()
        if first:
            mark(first)
        try:
            return fn(*a, **k)
        finally:
            spans[phase] = spans.get(phase, 0.0) + time.time() - t
    setattr(obj, attr, wrapper)
import library.config.cli as cli, library.models.load as load, library.models.meta_load as ml
import library.data.loader as loader, library.networks.lora as lora
timed(cli, "parse_cli", "config"); timed(load, "_component_class", "imports: model classes")
timed(ml, "empty", "model build (meta)"); timed(ml, "read_safetensors", "weight read")
timed(ml, "assign_weights", "weight assign"); timed(load, "load_tokenizers", "tokenizer")
timed(loader, "build_train_data", "data index"); timed(lora, "inject_network", "adapter inject")
timed(load, "load_model", "load_model total")
import library.lean as lean; timed(lean, "start_done", "start done (freeze, heap trim)")
import library.training.setup as setup
timed(setup, "make_accelerator", "accelerator")
def unet_pre_hook(module, args):  # the first UNet forward of the run: the first step starts
    if type(module).__name__ == "UNet2DConditionModel":
        mark("first step starts"); handle.remove(); mem["rss_at_step_start"], mem["peak_before_step"] = rss_now()
handle = torch.nn.modules.module.register_module_forward_pre_hook(unet_pre_hook)
def first_step(opt, args, kwargs):
    mark("first step done")
    print("BENCH " + json.dumps({"marks": marks, "spans": spans, "mem": mem}), file=sys.stderr, flush=True)
    os._exit(0)
from torch.optim.optimizer import register_optimizer_step_post_hook; register_optimizer_step_post_hook(first_step)
mark("library imported")
import runpy; sys.argv = ["train_lora.py", "--config", sys.argv[1]]; runpy.run_path("train_lora.py", run_name="__main__")
"""

# diffusers' own path to the same first step: from_single_file with the bundled config folder, peft LoRA on the
# UNet's attention projections (what diffusers' train_text_to_image_lora.py targets), one AdamW step on one 64 px
# image (VAE encode, text encode, DDPM noise, UNet, MSE).
DIFFUSERS_STEP = RSS_NOW + r"""
import json, os, sys, time
T0 = float(os.environ["BENCH_T0"]); marks = {{"interpreter": time.time() - T0}}; mem = {{}}
import torch
marks["import torch"] = time.time() - T0
def unet_pre_hook(module, args):
    if type(module).__name__ == "UNet2DConditionModel" and "first step starts" not in marks:
        marks["first step starts"] = time.time() - T0
        mem["rss_at_step_start"], mem["peak_before_step"] = rss_now()
torch.nn.modules.module.register_module_forward_pre_hook(unet_pre_hook)
from diffusers import DDPMScheduler, {pipe}
from peft import LoraConfig
torch.manual_seed(0)
dtype = getattr(torch, sys.argv[3])  # frozen weights, as diffusers' train_text_to_image_lora.py keeps them
pipe = {pipe}.from_single_file(sys.argv[1], config=sys.argv[2], local_files_only=True, torch_dtype=dtype)
unet, vae = pipe.unet, pipe.vae
for m in (unet, vae, pipe.text_encoder, *([pipe.text_encoder_2] if hasattr(pipe, "text_encoder_2") else [])):
    m.requires_grad_(False)
unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
params = [p for p in unet.parameters() if p.requires_grad]
for p in params:  # the script's cast_training_params: trained LoRA weights in fp32
    p.data = p.data.float()
vae.to(torch.float32)
opt = torch.optim.AdamW(params, lr=1e-4)
sched = DDPMScheduler.from_config(pipe.scheduler.config)
image = torch.rand(1, 3, 64, 64) * 2 - 1
with torch.no_grad():
    latents = (vae.encode(image).latent_dist.sample() * vae.config.scaling_factor).to(dtype)
    if hasattr(pipe, "text_encoder_2"):
        emb, _, pooled, _ = pipe.encode_prompt("a red circle", device="cpu", num_images_per_prompt=1,
                                               do_classifier_free_guidance=False)
        extra = dict(added_cond_kwargs={{"text_embeds": pooled, "time_ids": torch.tensor([[64., 64, 0, 0, 64, 64]])}})
    else:
        emb = pipe.encode_prompt("a red circle", "cpu", 1, False)[0]
        extra = {{}}
noise = torch.randn_like(latents); t = torch.tensor([500])
with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
    pred = unet(sched.add_noise(latents, noise, t), t, encoder_hidden_states=emb, **extra).sample
torch.nn.functional.mse_loss(pred.float(), noise.float()).backward(); opt.step()
marks["first step done"] = time.time() - T0
print("BENCH " + json.dumps({{"marks": marks, "mem": mem}}), file=sys.stderr, flush=True)
"""


# The loader alone as it is meant to be called (library/models/load.py `dtype=None`: weights as stored): the memory a
# fp16 run pays for the model, the figure to hold against the file size.
LOAD_ONLY_NAME = "toolkit load_model(dtype=None) only"
LOAD_ONLY = """
import sys; sys.path.insert(0, ".")
from library.lean import block_unused; block_unused()
from library.config.model import ModelConfig
from library.models.load import load_model
load_model(ModelConfig(pretrained_model_name_or_path=sys.argv[1]), dtype=None)
"""


def child(args: list[str], cwd: Path = REPO, env: dict | None = None) -> tuple[float, float, float, str]:
    """(wall s, CPU s, peak RSS MiB, stderr) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, cwd=cwd, env={**os.environ, **ENV, **(env or {})}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"benchmark child failed ({' '.join(args)[:200]}):\n{err[-3000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, err


def write_config(tmp: Path, name: str, model: str, batch: int = 2, network: str = "", train: str = "") -> Path:
    cfg = tmp / f"{name}.toml"
    cfg.write_text(CONFIG.format(model=model, out=tmp / f"out-{name}", batch=batch, network=network, train=train))
    return cfg


def summarise(samples: list[tuple[float, float, float, str]]) -> dict:
    return {"wall_s": round(statistics.median(s[0] for s in samples), 2),
            "cpu_s": round(statistics.median(s[1] for s in samples), 2),
            "peak_rss_mib": round(statistics.median(s[2] for s in samples)),
            "wall_all": [round(s[0], 2) for s in samples]}


def tiny(tmp: Path, repeat: int, baseline: Path | None) -> dict:
    cfg = write_config(tmp, "tiny", "tiny:sd15")
    run = [sys.executable, "train_lora.py", "--config", str(cfg)]
    variants = {"interpreter": ([sys.executable, "-c", "pass"], REPO), "import torch": (
        [sys.executable, "-c", "import torch"], REPO), FLOOR_NAME: ([sys.executable, "-c", FLOOR], REPO),
        "tiny run": (run, REPO)}
    if baseline is not None:
        variants["tiny run, baseline tree"] = (run, baseline)
    for args, cwd in variants.values():
        if args is run:
            child(args, cwd)  # warm the page cache and the tiny-model / demo-data caches
    samples: dict[str, list] = {name: [] for name in variants}
    for _ in range(repeat):
        for name, (args, cwd) in variants.items():
            samples[name].append(child(args, cwd))
    out = {name: summarise(s) for name, s in samples.items()}
    torch_s = out["import torch"]
    for name in [n for n in out if n.startswith("tiny run") or n == FLOOR_NAME]:
        out[name]["over_import_torch_wall"] = round(out[name]["wall_s"] / torch_s["wall_s"], 2)
        out[name]["over_import_torch_cpu"] = round(out[name]["cpu_s"] / torch_s["cpu_s"], 2)
        out[name]["over_floor_wall"] = round(out[name]["wall_s"] / out[FLOOR_NAME]["wall_s"], 2)
    return out


def _bench_line(stderr: str) -> dict:
    return json.loads(next(ln for ln in stderr.splitlines() if ln.startswith("BENCH "))[6:])


def phases(tmp: Path) -> dict:
    cfg = write_config(tmp, "phases", "tiny:sd15")
    *_, err = child([sys.executable, "-c", PHASES, str(cfg)], env={"BENCH_T0": repr(time.time())})
    data = _bench_line(err)
    data["mem"] = {k: round(v) for k, v in data["mem"].items()}
    data["marks"] = {k: round(v, 3) for k, v in data["marks"].items()}
    data["spans"] = {k: round(v, 3) for k, v in data["spans"].items()}
    *_, err = child([sys.executable, "-X", "importtime", "train_lora.py", "--config", str(cfg)])
    by_package: Counter = Counter()
    for m in re.finditer(r"import time:\s+(\d+) \|\s+\d+ \|\s*([\w.]+)", err):
        by_package[m[2].split(".")[0]] += int(m[1])
    data["importtime_self_s_by_package"] = {k: round(v / 1e6, 3) for k, v in by_package.most_common(15)}
    data["importtime_total_s"] = round(sum(by_package.values()) / 1e6, 2)
    return data


def full_size_file(kind: str) -> Path:
    """A single file with the released layout and random fp16 weights, scaled as a fresh init would be (so the
    first step stays finite), written once into the cache."""
    from library.paths import cache_dir

    path = cache_dir() / "bench" / f"{kind}-random-fp16.safetensors"
    if path.is_file():
        return path
    family = {"sd15": "sd1", "sdxl": "sdxl"}[kind]
    code = f"""
import sys, torch
sys.path.insert(0, {str(REPO)!r})
from library.config.model import ModelConfig
from library.models.configs import bundled_config_dir
from library.models.single_file import _build_empty, save_single_file
from library.models.model import SDModel
family = {family!r}
cfg_dir = bundled_config_dir({kind!r})
unet, vae, tes, toks = _build_empty(cfg_dir, family, cfg_dir)
g = torch.Generator().manual_seed(0)
for module in (unet, vae, *tes):
    for name, p in list(module.named_parameters()):
        if p.dim() >= 2:
            t = torch.randn(p.shape, generator=g, dtype=torch.float16) * (p[0].numel() ** -0.5)
        else:
            t = (torch.ones if name.endswith("weight") else torch.zeros)(p.shape, dtype=torch.float16)
        owner, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(owner), leaf, torch.nn.Parameter(t, requires_grad=False))
model = SDModel(family=family, prediction_type="epsilon", unet=unet, vae=vae, text_encoders=tes, tokenizers=toks,
                scheduler_config={{}}, source="bench", config_dir=cfg_dir)
save_single_file(model, {str(path)!r}, dtype=torch.float16)
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    child([sys.executable, "-c", code])
    return path


TORCH_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "no": "float32"}


def full(tmp: Path, kinds: list[str], repeat: int, precision: str) -> dict:
    from library.models.configs import bundled_config_dir

    out = {}
    for kind in kinds:
        path = full_size_file(kind)
        # The adapters diffusers' LoRA script trains (UNet attention projections), so both steps do the same work.
        cfg = write_config(tmp, f"full-{kind}", str(path), batch=1, network='target = "attn"\ntrain_unet_only = true\n',
                           train=f'mixed_precision = "{precision}"\n')
        pipe = "StableDiffusionXLPipeline" if kind == "sdxl" else "StableDiffusionPipeline"
        ours = [sys.executable, "-c", PHASES, str(cfg)]  # train_lora.py, stopped right after the first step
        theirs = [sys.executable, "-c", DIFFUSERS_STEP.format(pipe=pipe), str(path), str(bundled_config_dir(kind)),
                  TORCH_DTYPE[precision]]
        load_only = [sys.executable, "-c", LOAD_ONLY, str(path)]
        samples: dict[str, list] = {"toolkit": [], "diffusers from_single_file": [], LOAD_ONLY_NAME: []}
        marks: dict[str, list] = {"toolkit": [], "diffusers from_single_file": []}
        for _ in range(repeat):
            for name, args in (("toolkit", ours), ("diffusers from_single_file", theirs)):
                _read_through(path)  # the file in the page cache for each run alike (writing or reading the other
                # size's file can have evicted it: a cold read cost one run 10 s more)
                sample = child(args, env={"BENCH_T0": repr(time.time())})
                samples[name].append(sample)
                marks[name].append(_bench_line(sample[3]))
            _read_through(path)
            samples[LOAD_ONLY_NAME].append(child(load_only))
        size_mib = path.stat().st_size / 2**20
        res = {name: summarise(s) for name, s in samples.items()}
        for name, lines in marks.items():  # start = process start to the first UNet forward; then the step itself
            res[name]["start_s"] = round(statistics.median(ln["marks"]["first step starts"] for ln in lines), 2)
            res[name]["first_step_done_s"] = round(statistics.median(ln["marks"]["first step done"] for ln in lines), 2)
            # What loading cost (the peak before the UNet's first forward) and, at most, what the step itself held
            # (activations, gradients, optimizer state): the run's peak less the resident size when the step began
            # (where the peak came before the step, this bounds the step's need from above).
            before = statistics.median(ln["mem"]["peak_before_step"] for ln in lines)
            res[name]["peak_rss_before_step_mib"] = round(before)
            res[name]["peak_rss_before_step_over_file"] = round(before / size_mib, 2)
            res[name]["step_rss_at_most_mib"] = round(res[name]["peak_rss_mib"] - statistics.median(
                ln["mem"]["rss_at_step_start"] for ln in lines))
        for r in res.values():
            r["peak_rss_over_file"] = round(r["peak_rss_mib"] / size_mib, 2)
        ref = res["diffusers from_single_file"]
        out[kind] = {"file_mib": round(size_mib), "mixed_precision": precision, **res,
                     "toolkit_over_diffusers_start": round(res["toolkit"]["start_s"] / ref["start_s"], 2),
                     "toolkit_over_diffusers_wall": round(res["toolkit"]["wall_s"] / ref["wall_s"], 2)}
    return out


def _read_through(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(1 << 24):
            pass


def _commit(tree: Path) -> str:
    proc = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no", "--", ".",
                            ":!bench/results"],  # the results this benchmark writes are not a change to the code
                           capture_output=True, text=True).stdout.strip()
    return proc.stdout.strip() + (" + uncommitted changes" if dirty else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--baseline-tree", type=Path, default=None, help="an older checkout to run the tiny run from")
    ap.add_argument("--full", default="", help="comma-separated: sd15, sdxl (full-size single files)")
    ap.add_argument("--full-repeat", type=int, default=1)
    ap.add_argument("--full-precision", default="bf16", choices=sorted(TORCH_DTYPE),
                    help="train.mixed_precision of the full-size runs (frozen weights in it; bf16 is the CPU's "
                         "half precision, fp16 trains in fp32 there)")
    ap.add_argument("--skip-tiny", action="store_true")
    args = ap.parse_args()
    result: dict = {"cpus": os.cpu_count(), "load_before": [round(x, 2) for x in os.getloadavg()],
                    "repeat": args.repeat, "commit": _commit(REPO)}
    if args.baseline_tree is not None:
        result["baseline_commit"] = _commit(args.baseline_tree)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if not args.skip_tiny:
            result["tiny"] = tiny(tmp, args.repeat, args.baseline_tree)
            result["phases"] = phases(tmp)
        if args.full:
            result["full"] = full(tmp, [k for k in args.full.split(",") if k], args.full_repeat,
                                  args.full_precision)
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result, indent=1))
    out = REPO / "bench" / "results" / "start.json"
    if args.skip_tiny and out.is_file():  # keep the tiny sections of the last run that measured them
        last = json.loads(out.read_text())
        if "tiny" in last:
            result.update(tiny_run={"commit": last.get("tiny_run", {}).get("commit", last.get("commit")),
                                    "load_before": last.get("load_before")}, tiny=last["tiny"], phases=last["phases"])
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
