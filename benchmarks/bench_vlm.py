"""The transformers VLM backbone (issue 16): parameter counts, CPU memory and time.

    python benchmarks/bench_vlm.py tiny                 # DPPO iterations on `place` with the tiny test models
    python benchmarks/bench_vlm.py counts               # ~0.5B / ~2B VLMs built on the meta device: counts only
    python benchmarks/bench_vlm.py step --size 0.5b --dtype float32 --mode lora --batch 4
                                                        # one policy step of a realistic size class on CPU

``step`` writes the VLM (random weights, built from its config: no hub) to a temp directory, loads it
through ``VLAPolicy`` as a user's checkpoint is, and times what one DPPO iteration does per observation
batch: ``sample`` (one VLM forward, no grad, 10 denoising steps of the head), then the update's
``log_prob`` + backward (frozen / head-only: the cached features, no VLM pass; LoRA / full trained: one
VLM forward + backward per minibatch). Each configuration runs in its own process so that the peak RSS
(``ru_maxrss``) is its own. Results go to stdout as JSON lines and to benchmarks/results/vlm_*.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def cpu_s() -> float:
    """Process CPU seconds (user + system, all threads): less sensitive than wall time to other jobs on a
    shared machine (with 2 threads on 2 idle cores, wall time is about cpu_s / 2)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB -> GiB (Linux)


def emit(row: dict, name: str) -> None:
    row["loadavg_1m"] = round(os.getloadavg()[0], 1)  # the machine is shared: how busy it was at the end
    print(json.dumps(row), flush=True)
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / f"vlm_{name}.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def policy_cfg(path, mode, state_dim, action_dim, image, cameras=("front",), d_model=64, dtype="auto"):
    from vla_rl.policy.config import DiTConfig, NoiseConfig, PolicyConfig
    from vla_rl.policy.vlm_backbone import VLMConfig

    return PolicyConfig(action_dim=action_dim, state_dim=state_dim, horizon=4, exec_steps=2, cameras=list(cameras),
                        image_size=[image, image], language_encoder="hash", fusion_layers=0, backbone="transformers",
                        vlm=VLMConfig(path=str(path), mode=mode, tokens=8, dtype=dtype),
                        dit=DiTConfig(d_model=d_model, n_layers=2, n_heads=4),
                        noise=NoiseConfig(kind="flow", sample_steps=10, stochastic_steps=4))


# ---------------------------------------------------------------------- tiny models, whole DPPO iterations
def bench_tiny(args) -> None:
    from vla_rl.algos import DPPOConfig
    from vla_rl.envs import make_env
    from vla_rl.policy import VLAPolicy
    from vla_rl.policy.vlm_backbone import build_tiny_vlm
    from vla_rl.runner import Runner, RunnerConfig, TrainConfig

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp())
    try:
        path = build_tiny_vlm(args.family, tmp / args.family, image_size=args.image)
        env = make_env("place", args.num_envs, seed=0, cameras=["front"], image_size=[args.image, args.image])
        state_dim, action_dim = env.reset()["state"].shape[1], env.spec.action_dim
        torch.manual_seed(0)
        policy = VLAPolicy(policy_cfg(path, args.mode, state_dim, action_dim, args.image))
        counts = policy.print_parameter_counts()
        calls = [0]
        policy.vlm.model.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
        cfg = TrainConfig(algo="dppo", dppo=DPPOConfig(update_epochs=args.epochs, num_minibatches=4,
                                                       train_encoders=args.train_encoders),
                          runner=RunnerConfig(iterations=args.iters, num_envs=args.num_envs,
                                              steps_per_iter=args.steps, eval_every=0, checkpoint_every=0,
                                              log_dir=str(tmp / "run"), progress=False))
        runner = Runner(cfg, policy=policy, env=env)
        rows = []
        for _ in range(args.iters):  # one DPPO iteration = the runner's rollout + the algorithm's update
            c0, t0, u0 = calls[0], time.perf_counter(), cpu_s()
            buf, _ = runner.collect()
            c1, t1, u1 = calls[0], time.perf_counter(), cpu_s()
            runner.algo.update(buf)
            rows.append((t1 - t0, time.perf_counter() - t1, c1 - c0, calls[0] - c1, u1 - u0, cpu_s() - u1))
        timed = rows[1:] or rows  # the first iteration pays one-off costs
        mid = sorted(timed, key=lambda r: r[0] + r[1])[len(timed) // 2]  # the median iteration
        rollout_s, update_s, roll_calls, upd_calls, rollout_cpu, update_cpu = mid
        per_iter = rollout_s + update_s
        emit({"bench": "tiny_dppo", "family": args.family, "mode": args.mode, "train_encoders": args.train_encoders,
              "num_envs": args.num_envs, "steps_per_iter": args.steps, "update_epochs": args.epochs, "minibatches": 4,
              "image": args.image, "threads": args.threads, **counts, "iters": args.iters,
              "s_per_iter": round(per_iter, 3), "rollout_s": round(rollout_s, 3), "update_s": round(update_s, 3),
              "rollout_cpu_s": round(rollout_cpu, 3), "update_cpu_s": round(update_cpu, 3),
              "vlm_forwards_rollout": roll_calls, "vlm_forwards_update": upd_calls,
              "decisions_per_iter": args.num_envs * args.steps, "peak_rss_gib": round(rss_gib(), 3)}, "tiny")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------- realistic sizes
def _tokenizer(family):
    from vla_rl.policy.vlm_backbone import _byte_tokenizer

    if family == "qwen2_vl":
        return _byte_tokenizer(["<|endoftext|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
                               eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    return _byte_tokenizer(["<pad>", "<bos>", "<eos>", "<image>"], pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


def bench_counts(args) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    from vla_rl.policy.vlm_backbone import tiny_vlm_config

    for family, size in (("qwen2_vl", "0.5b"), ("qwen2_vl", "2b"), ("paligemma", "2b")):
        cfg = tiny_vlm_config(family, _tokenizer(family), size)
        with torch.device("meta"):
            model = AutoModel.from_config(cfg)
        total = sum(p.numel() for p in model.parameters())
        vision = sum(p.numel() for n, p in model.named_parameters() if "vision" in n or "visual" in n)
        lora = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        adapters = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
        emit({"bench": "counts", "family": family, "size": size, "vlm_params": total, "vision_params": vision,
              "lora_r16_qkvo_params": adapters, "fp32_gib": round(total * 4 / 2**30, 2),
              "bf16_gib": round(total * 2 / 2**30, 2)}, "counts")


def bench_step(args) -> None:
    """One realistic-size VLM as a user's checkpoint: build, save, load through VLAPolicy, time a DPPO step."""
    if not args.child:  # one process per configuration: its own peak RSS
        import subprocess

        cmd = [sys.executable, __file__, "step", "--child", "--size", args.size, "--family", args.family,
               "--dtype", args.dtype, "--mode", args.mode, "--batch", str(args.batch), "--image", str(args.image),
               "--threads", str(args.threads), "--repeats", str(args.repeats)]
        sys.exit(subprocess.call(cmd))
    from transformers import AutoModel

    from vla_rl.policy import VLAPolicy
    from vla_rl.policy.vlm_backbone import tiny_vlm_config

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(dir=os.environ.get("BENCH_TMP")))
    try:
        tok = _tokenizer(args.family)
        cfg = tiny_vlm_config(args.family, tok, args.size, image_size=args.image)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
        t0 = time.perf_counter()
        torch.manual_seed(0)
        model = AutoModel.from_config(cfg, dtype=dtype)
        path = tmp / "vlm"
        model.save_pretrained(path, safe_serialization=True)
        del model
        tok.save_pretrained(path)
        if args.family == "qwen2_vl":
            from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

            side = args.image * args.image
            ip = Qwen2VLImageProcessorPil(min_pixels=side, max_pixels=side, patch_size=14, merge_size=2,
                                          temporal_patch_size=2)
        else:
            from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

            ip = SiglipImageProcessorPil(size={"height": 224, "width": 224})
            ip.image_seq_length = 256
        ip.save_pretrained(path)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        # vlm.dtype=bfloat16: the VLM's weights and compute in bf16 (the head stays fp32)
        policy = VLAPolicy(policy_cfg(path, args.mode, 8, 7, args.image, d_model=256,
                                      dtype="bfloat16" if dtype == torch.bfloat16 else "auto"))
        load_s = time.perf_counter() - t0
        counts = policy.print_parameter_counts()
        b = args.batch
        g = torch.Generator().manual_seed(0)
        obs = {"state": torch.randn(b, 8, generator=g),
               "rgb": torch.randint(0, 256, (b, 1, 3, args.image, args.image), generator=g, dtype=torch.uint8),
               "instruction": ["put the red cube into the blue box"] * b}
        opt = torch.optim.Adam([p for p in policy.actor_parameters() if p.requires_grad], lr=1e-5)
        rows = []
        for r in range(args.repeats):
            policy.vlm._cache.clear()
            t0, u0 = time.perf_counter(), cpu_s()
            with torch.no_grad():
                chain = policy.sample(obs)  # rollout: one VLM forward, 10 head steps
            t1, u1 = time.perf_counter(), cpu_s()
            lp = policy.log_prob(obs, chain)  # update: cached features (frozen) or forward with grad (lora/full)
            loss = -lp.mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            t2 = time.perf_counter()
            rows.append((t1 - t0, t2 - t1, u1 - u0, cpu_s() - u1))
        timed = rows[1:] or rows  # the first repeat pays one-off costs (allocator, kernels): reported apart
        sample_s = sorted(r[0] for r in timed)[len(timed) // 2]
        update_s = sorted(r[1] for r in timed)[len(timed) // 2]
        sample_cpu = sorted(r[2] for r in timed)[len(timed) // 2]
        update_cpu = sorted(r[3] for r in timed)[len(timed) // 2]
        emit({"bench": "step", "family": args.family, "size": args.size, "dtype": args.dtype, "mode": args.mode,
              "batch": b, "image": args.image, "cameras": 1, "threads": args.threads, **counts,
              "prompt_tokens": int(policy.vlm.hidden_states(obs["rgb"], obs["instruction"])[1].sum(1)[0]),
              "build_s": round(build_s, 1), "load_s": round(load_s, 1),
              "sample_s": round(sample_s, 3), "update_s": round(update_s, 3),
              "sample_cpu_s": round(sample_cpu, 2), "update_cpu_s": round(update_cpu, 2),
              "first_sample_s": round(rows[0][0], 3), "peak_rss_gib": round(rss_gib(), 2)}, "step")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["tiny", "counts", "step"])
    p.add_argument("--family", default="qwen2_vl", choices=["qwen2_vl", "paligemma"])
    p.add_argument("--mode", default="frozen", choices=["frozen", "lora", "full"])
    p.add_argument("--size", default="0.5b", choices=["0.5b", "2b"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--image", type=int, default=None, help="camera side in pixels (tiny: 32, step: 224)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--num-envs", type=int, default=8)
    p.add_argument("--steps", type=int, default=4, help="decisions per env per iteration")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--train-encoders", action="store_true", help="DPPO also trains the VLM (LoRA/full) and projector")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.image = args.image or (32 if args.what == "tiny" else 224)
    {"tiny": bench_tiny, "counts": bench_counts, "step": bench_step}[args.what](args)


if __name__ == "__main__":
    main()
