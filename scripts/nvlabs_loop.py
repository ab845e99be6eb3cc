"""Train with NVlabs/edm's own training loop, from edm-train's initial weights and on its data set.

    python scripts/nvlabs_loop.py --nvlabs-repo /path/to/edm --out runs/ref-s0 \
        dataset=fashion_mnist dataset.resolution=16 network=tiny total_kimg=96 seed=0

The reference arm of the side-by-side in docs/nvlabs.md. The Hydra overrides are edm-train's, and
they pick the data set, the network and the hyperparameters. Then the loop runs the reference's
code: EDMPrecond or VPPrecond around its SongUNet, EDMLoss or VPLoss (σ and n from the global RNG,
seeded as its training_loop.py seeds it), InfiniteSampler, torch.optim.Adam, its learning-rate
ramp, nan_to_num on the gradients and its EMA update. It starts from the weights that edm-train
builds for the same seed. OUT gets edm checkpoints (raw and EMA weights, the config), which
edm-sample and edm-study read, every checkpoint_every steps and at the end (keep_checkpoints of them); each
also holds what the loop needs to continue exactly (Adam's state, the global RNG), so --resume carries a
cut run on from its latest checkpoint, bit for bit as if it had not stopped.

--edm-draws order,noise replays edm-train's random draws for the same seed instead of the
reference's own: `order` its data order (edm.data.StreamBatchSampler), `noise` its σ and n (its
generator, seeded by edm.training.run.seed_draws, handed to EDMLoss in place of torch.randn).
With both, the two loops see the same numbers (but for dropout's, which the reference draws from its global RNG),
and --against CHECKPOINT (edm-train's, same seed and step) prints how far apart their weights ended.

This imports the checkout's Python code: --nvlabs-repo is the opt-in. The settings are checked as edm-train
checks them, and those that the reference loop of this script does not implement are refused: augmentation,
accumulation, lr decay, grad_clip, mixed precision, power-function EMAs, init=, objectives other than denoising,
latent data sets, schedules other than edm and vp, and networks other than SongUNet. One process at a time writes
OUT (a lock, as edm-train's on its run folder). With
dataset.cond=true the reference's network takes the data set's one-hot labels, as its training_loop.py
feeds them to EDMLoss.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import math
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from edm.models import checkpoint as ckpt
from edm.core.schedules import to_spec
from edm.training.build import loss_spec, resolve
from edm.cli import compose as edm_compose, user_errors
from edm.training.config import TrainConfig, check_config
from edm.files import FolderLock, to_container
from edm.data import StreamBatchSampler, build_dataset, to_model_space
from edm.models.nvlabs import convert_state_dict
from edm.training.run import RESUME_FREE, listed, seed_draws, setting_differences

REFERENCE_CLASSES = {"edm": ("EDMPrecond", "EDMLoss"), "vp": ("VPPrecond", "VPLoss")}  # schedule -> precond, loss
SONGUNET_NETWORKS = ("tiny", "ddpmpp", "ncsnpp")
OURS_ONLY = ("name", "img_resolution", "in_channels", "out_channels", "label_dim",  # set by the reference's precond
             "second_noise")  # MeanFlow's second noise input, which the reference's SongUNet lacks (refused when on)
REFERENCE_PRECOND_KEYS = {"edm": ("sigma_data",), "vp": ("beta_d", "beta_min", "M")}  # taken from our precond spec
REFERENCE_FILES = ("training/networks.py", "training/loss.py", "torch_utils/misc.py")  # what the loop imports
EDM_DRAWS = ("order", "noise")  # edm-train's streams that --edm-draws can replay
LOOP_STATE = "reference_loop"  # a checkpoint's entry with what the loop needs to continue (Adam, the RNG, draws)


def reference_iteration(net, ema, optimizer, loss_fn, images: torch.Tensor, cur_nimg: int, *, lr: float,
                        rampup_kimg: float, halflife_kimg: float, rampup_ratio: float | None,
                        labels: torch.Tensor | None = None) -> None:
    """One iteration of NVlabs/edm training/training_loop.py on one GPU without accumulation:
    zero grads, backward of loss.sum() / batch, lr·min(n / rampup, 1), nan_to_num on the gradients,
    Adam, then EMA ← lerp(θ, EMA, β) with β = 0.5^(batch / min(halflife, n·rampup_ratio)) (rampup_ratio None: the
    half-life alone)."""
    optimizer.zero_grad(set_to_none=True)
    loss_fn(net=net, images=images, labels=labels).sum().mul(1 / images.shape[0]).backward()
    for group in optimizer.param_groups:
        group["lr"] = lr * min(cur_nimg / max(rampup_kimg * 1000, 1e-8), 1)
    for p in net.parameters():
        if p.grad is not None:
            torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
    optimizer.step()
    halflife_nimg = halflife_kimg * 1000 if rampup_ratio is None else min(halflife_kimg * 1000, cur_nimg * rampup_ratio)
    beta = 0.5 ** (images.shape[0] / max(halflife_nimg, 1e-8))
    with torch.no_grad():
        for p_ema, p_net in zip(ema.parameters(), net.parameters()):
            p_ema.copy_(p_net.detach().lerp(p_ema, beta))


class EdmDraws:
    """edm-train's random draws for one process, replayed: its data order (`order`: StreamBatchSampler
    over the (seed, epoch) permutations) and its noise (`noise`: per step, edm.Loss draws u, then the
    normal z of ln σ = P_mean + P_std·z, then n, from the generator that seed_draws seeds for the step's place in
    the data stream)."""

    def __init__(self, streams: set[str], dataset: Any, loss: Any, seed: int, batch_size: int, nimg: int = 0) -> None:
        self.streams, self.dataset, self.loss, self.batch_size = streams, dataset, loss, batch_size
        self.order = iter(StreamBatchSampler(len(dataset), seed, batch_size, batch_size, start_nimg=nimg))
        self.generator, self.seed, self.nimg = torch.Generator(), seed, nimg

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch of edm-train's data order, as its loader stacks it: images in [0, 255], one-hot labels."""
        items = [self.dataset[i] for i in next(self.order)]
        return torch.stack([item[0] for item in items]), torch.stack([item[1] for item in items])

    def draw(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z [B], n) as edm.Loss draws them for y; checked against the library's own σ draw."""
        global_state = torch.get_rng_state()
        seed_draws(self.generator, self.seed, self.nimg)  # seeds the global RNG too: the reference's stays as it was
        torch.set_rng_state(global_state)
        self.nimg += y.shape[0]
        probe = torch.Generator().set_state(self.generator.get_state())
        sigma = self.loss.sample_sigma(y.shape[0], generator=probe)
        torch.rand(y.shape[0], generator=self.generator)
        z = torch.randn(y.shape[0], generator=self.generator)
        if not torch.equal(torch.exp(self.loss.P_mean + self.loss.P_std * z), sigma):
            raise RuntimeError("edm.Loss no longer draws u, then z: update EdmDraws.draw to its order")
        return z, torch.randn(y.shape, generator=self.generator)

    @contextlib.contextmanager
    def injected(self, y: torch.Tensor) -> Iterator[None]:
        """EDMLoss's torch.randn([B, 1, 1, 1]) and torch.randn_like(y) return edm-train's z and n."""
        z, n = self.draw(y)
        given = {"randn": z.reshape(-1, 1, 1, 1), "randn_like": n}
        saved = torch.randn, torch.randn_like

        def take(name: str, shape: torch.Size) -> torch.Tensor:
            value = given.pop(name, None)
            if value is None or value.shape != shape:
                raise RuntimeError(f"EDMLoss asked for torch.{name} of shape {list(shape)} beyond the injected draws")
            return value

        torch.randn = lambda shape, **kwargs: take("randn", torch.Size(shape))  # noqa: E731
        torch.randn_like = lambda x, **kwargs: take("randn_like", x.shape)  # noqa: E731
        try:
            yield
        finally:
            torch.randn, torch.randn_like = saved
        if given:
            raise RuntimeError(f"EDMLoss did not take the injected {sorted(given)}")


def relative_distance(a: dict, b: dict, start: dict) -> float:
    """‖a − b‖ / ‖b − start‖ over the parameters of three state dicts (float64 sums)."""
    def norm(x: dict, y: dict) -> float:
        return math.sqrt(sum(float((x[k].double() - y[k].double()).pow(2).sum()) for k in y))
    return norm(a, b) / max(norm(b, start), 1e-30)


def compose(overrides: list[str], out: Path) -> TrainConfig:
    """edm-train's config for these overrides (run_dir = out)."""
    return edm_compose("train", [*overrides, f"run_dir={out}"])


def reference_loss(ref_loss: Any, ours: Any, schedule: Any) -> Any:
    """The reference's EDMLoss or VPLoss with the values of our resolved loss and schedule."""
    if schedule.name == "edm":
        return ref_loss.EDMLoss(P_mean=ours.P_mean, P_std=ours.P_std, sigma_data=ours.sigma_data)
    return ref_loss.VPLoss(beta_d=schedule.beta_d, beta_min=schedule.beta_min, epsilon_t=ours.epsilon_t)


def check_supported(cfg: TrainConfig, schedule: Any, spec: dict, loss: Any) -> None:
    """Refuse what this script's reference loop does not implement, naming the setting (loss and precond resolved)."""
    unsupported = {  # the objective first: another one also changes the loss named below
        "objective": cfg.objective != "denoising", "schedule": schedule.name not in REFERENCE_CLASSES,
        "network": spec["network"]["name"] not in SONGUNET_NETWORKS,
        "loss.kind": loss.kind != schedule.parameterization,
        "precond.kind": spec["precond"]["kind"] != schedule.parameterization,
        "loss.learned_weighting": loss.learned_weighting,
        "augment.p": cfg.augment.p > 0,
        "batch_per_device": cfg.batch_per_device not in (None, cfg.batch_size), "lr_decay_kimg": cfg.lr_decay_kimg > 0,
        "grad_clip": cfg.grad_clip is not None, "mixed_precision": cfg.mixed_precision not in (None, "no"),
        "network.second_noise": bool(spec["network"].get("second_noise")),
        "ema_sigma_rel": bool(cfg.ema_sigma_rel), "init": cfg.init is not None,
        "dataset (latent)": cfg.dataset.name == "latent",
    }
    named = [key for key, bad in unsupported.items() if bad]
    if named:
        raise SystemExit(f"nvlabs_loop.py: error: the reference loop here does not implement {', '.join(named)} "
                         f"(schedules {list(REFERENCE_CLASSES)}, networks {list(SONGUNET_NETWORKS)}, "
                         "no augmentation, accumulation, lr decay, grad_clip, mixed precision, power-function EMAs, "
                         "init= or latents; objective=denoising)")


@contextlib.contextmanager
def sampler_init_without_arguments() -> Iterator[None]:
    """NVlabs' InfiniteSampler calls Sampler.__init__(dataset), which torch >= 2.4 no longer takes."""
    saved = torch.utils.data.Sampler.__init__
    torch.utils.data.Sampler.__init__ = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        torch.utils.data.Sampler.__init__ = saved


def to_reference(state: dict) -> dict:
    """Our SongUNet denoiser's state dict -> the reference Precond's: net.<name> -> model.<name> (convert_state_dict's
    inverse; the layer names are shared)."""
    return {"model." + k.removeprefix("net."): v for k, v in state.items()}


class Skipped:
    """A sampler's indices after its first `count`: a resumed loop's place in the reference's InfiniteSampler order."""

    def __init__(self, sampler: Any, count: int) -> None:
        self.sampler, self.count = sampler, count

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.sampler), self.count, None)


def continued_state(path: Path, cfg: TrainConfig, edm_draws: set[str]) -> dict:
    """The checkpoint `path` of this loop, to continue the run `cfg` describes; refused, naming what differs, when
    another trainer wrote it or it was trained with other settings (RESUME_FREE's aside) or other --edm-draws."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if LOOP_STATE not in state:
        raise SystemExit(f"nvlabs_loop.py: error: {path} holds no state of this loop to continue from (edm-train "
                         "wrote it, or it holds weights only); choose another --out")
    changed = [f"{key}: run {a!r}, now {b!r}" for key, a, b in setting_differences(state["config"], to_container(cfg))
               if not listed(key, RESUME_FREE)]
    run_draws, now_draws = ",".join(state[LOOP_STATE]["edm_draws"]), ",".join(sorted(edm_draws))
    if run_draws != now_draws:
        changed.append(f"--edm-draws: run {run_draws!r}, now {now_draws!r}")
    if changed:
        raise SystemExit(f"nvlabs_loop.py: error: {path} was trained with other settings ({'; '.join(changed)}): resume "
                         "with the run's settings, or choose another --out")
    return state


def check_repo(nvlabs_repo: str | Path) -> Path:
    """`nvlabs_repo` as a path, refused (ValueError naming the flag) unless it holds the NVlabs/edm files the loop
    imports (REFERENCE_FILES): a wrong folder fails before any data is read or any arm trained, not on an import."""
    repo = Path(nvlabs_repo).expanduser()
    missing = [name for name in REFERENCE_FILES if not (repo / name).is_file()]
    if missing:
        raise ValueError(f"--nvlabs-repo {nvlabs_repo} is not an NVlabs/edm checkout (it lacks {', '.join(missing)}): "
                         "give the folder of a clone of https://github.com/NVlabs/edm")
    return repo


def train_reference(nvlabs_repo: str, overrides: list[str], out: Path, log_every: int = 100,
                    edm_draws: set[str] = frozenset(), resume: bool = False) -> Path:
    """Run the reference loop for the config's total_kimg, with edm-train's draws where `edm_draws`
    names them, from the start or (resume) from out's latest checkpoint; returns the last checkpoint it wrote."""
    cfg = compose(overrides, out)
    check_config(cfg)
    with FolderLock(out, key="--out", owner="reference loop"):  # one writer of OUT, this loop's or edm-train's
        return _train_reference(nvlabs_repo, cfg, out, log_every, edm_draws, resume)


def _train_reference(nvlabs_repo: str, cfg: TrainConfig, out: Path, log_every: int, edm_draws: set[str],
                     resume: bool) -> Path:
    check_repo(nvlabs_repo)  # after the settings and the folder (they need no checkout), before the data is read
    existing = ckpt.find_latest(out)
    if existing is not None and not resume:
        raise SystemExit(f"nvlabs_loop.py: error: {out} already holds {existing.name}; pass --resume to continue that "
                         "run, or choose another --out")
    resolved = resolve(cfg)
    schedule, loss = resolved.schedule, resolved.loss
    dataset = build_dataset(cfg.dataset)
    spec = resolved.denoiser_spec(cfg, dataset)
    check_supported(cfg, schedule, spec, loss)
    unknown = set(edm_draws) - set(EDM_DRAWS)
    if unknown or ("noise" in edm_draws and schedule.name != "edm"):
        raise SystemExit(f"nvlabs_loop.py: error: --edm-draws takes {', '.join(EDM_DRAWS)} (noise: schedule=edm only), "
                         f"got {','.join(sorted(edm_draws))}")
    saved = continued_state(existing, cfg, set(edm_draws)) if existing is not None else None
    sys.path.insert(0, str(Path(nvlabs_repo).resolve()))
    from torch_utils import misc as ref_misc
    from training import loss as ref_loss, networks as ref_networks

    torch.manual_seed(cfg.seed)  # edm-train's initial weights (edm.training.loop._setup_run)
    ours = ckpt.build_denoiser(spec)
    np.random.seed(cfg.seed % (1 << 31))  # training_loop.py's seeding of one process
    torch.manual_seed(np.random.randint(1 << 31))
    precond_class, loss_class = REFERENCE_CLASSES[schedule.name]
    net_kwargs = {k: v for k, v in spec["network"].items() if k not in OURS_ONLY}
    precond_kwargs = {k: v for k, v in spec["precond"].items() if k in REFERENCE_PRECOND_KEYS[schedule.name]}
    net = getattr(ref_networks, precond_class)(img_resolution=dataset.resolution, img_channels=dataset.channels,
                                               label_dim=spec["network"]["label_dim"], use_fp16=False, model_type="SongUNet",
                                               **precond_kwargs, **net_kwargs)
    net.load_state_dict(to_reference(ours.state_dict() if saved is None else saved["model"]), strict=True)
    net.train().requires_grad_(True)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    loss_fn = reference_loss(ref_loss, loss, schedule)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps)
    cur_nimg = 0 if saved is None else saved["cur_nimg"]
    total_nimg, start = int(round(cfg.total_kimg * 1000)), time.time()
    with sampler_init_without_arguments():
        sampler = ref_misc.InfiniteSampler(dataset=dataset, seed=cfg.seed)
    loader = iter(torch.utils.data.DataLoader(dataset, sampler=Skipped(sampler, cur_nimg) if cur_nimg else sampler,
                                              batch_size=cfg.batch_size, num_workers=cfg.dataset.num_workers))
    if saved is not None:  # the loader's creation has drawn from the global RNG: the saved state replaces it
        ema.load_state_dict(to_reference(saved["ema"]), strict=True)
        optimizer.load_state_dict(saved[LOOP_STATE]["optimizer"])
        torch.set_rng_state(saved[LOOP_STATE]["rng"])
        print(f"resuming from {existing} at step {saved['step']}", flush=True)
    draws = EdmDraws(set(edm_draws), dataset, loss, cfg.seed, cfg.batch_size, cur_nimg) if edm_draws else None

    def save(step: int) -> Path:
        path = ckpt.checkpoint_path(out, step)
        ckpt.save_checkpoint(path, {
            "format": "edm-checkpoint-v1", "denoiser": spec, "schedule": to_spec(schedule), "loss": loss_spec(loss),
            "model": convert_state_dict(net.state_dict()), "ema": convert_state_dict(ema.state_dict()),
            "config": to_container(cfg), "step": step, "cur_nimg": cur_nimg,
            "trained_by": f"NVlabs/edm training_loop.py ({precond_class}, {loss_class}) through scripts/nvlabs_loop.py"
                          + (f" with edm-train's draws ({','.join(sorted(edm_draws))})" if edm_draws else ""),
            LOOP_STATE: {"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
                         "edm_draws": sorted(edm_draws)},
        })
        ckpt.prune_checkpoints(out, cfg.keep_checkpoints)
        return path

    path = existing
    while cur_nimg < total_nimg:
        images, labels = draws.batch() if draws and "order" in draws.streams else next(loader)[:2]
        images, labels = to_model_space(images), labels if spec["network"]["label_dim"] else None
        with draws.injected(images) if draws and "noise" in draws.streams else contextlib.nullcontext():
            reference_iteration(net, ema, optimizer, loss_fn, images, cur_nimg, lr=cfg.lr,
                                rampup_kimg=cfg.lr_rampup_kimg, halflife_kimg=cfg.ema_halflife_kimg,
                                rampup_ratio=cfg.ema_rampup_ratio, labels=labels)
        cur_nimg += cfg.batch_size
        step = cur_nimg // cfg.batch_size
        if step % log_every == 0:
            print(f"step {step}  kimg {cur_nimg / 1000:.1f}  {time.time() - start:.0f} s", flush=True)
        if step % cfg.checkpoint_every == 0 or cur_nimg >= total_nimg:
            path = save(step)
    return path


def compare(path: Path, against: Path) -> dict[str, float]:
    """How far two checkpoints of the same run length lie apart: ‖θ − θ'‖ / ‖θ' − θ_0‖ for the raw and
    EMA weights (θ' = `against`'s, θ_0 = edm-train's initial weights for its config's seed)."""
    ours, theirs = (torch.load(p, map_location="cpu", weights_only=True) for p in (path, against))
    if ours["cur_nimg"] != theirs["cur_nimg"]:
        raise SystemExit(f"nvlabs_loop.py: error: {path} is at {ours['cur_nimg']} images, {against} at {theirs['cur_nimg']}")
    torch.manual_seed(theirs["config"]["seed"])
    start = ckpt.build_denoiser(theirs["denoiser"]).state_dict()
    return {key: relative_distance(ours[key], theirs[key], start) for key in ("model", "ema")}


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nvlabs-repo", required=True, metavar="PATH", help="an NVlabs/edm checkout (its code is run)")
    p.add_argument("--out", required=True, type=Path, help="folder for the checkpoints (must hold none yet, or --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run whose checkpoints --out holds (same settings)")
    p.add_argument("--log-every", type=int, default=100, metavar="STEPS")
    p.add_argument("--edm-draws", default="", metavar="order,noise",
                   help="replay edm-train's data order and/or σ and n (same seed) instead of the reference's own")
    p.add_argument("--against", type=Path, metavar="CHECKPOINT",
                   help="an edm-train checkpoint of the same length: print the relative distance of the weights")
    p.add_argument("overrides", nargs="*", help="edm-train overrides: dataset=, network=, seed=, total_kimg=, lr= ...")
    args = p.parse_args(argv)
    if args.log_every < 1:
        p.error(f"--log-every {args.log_every}: give 1 or more steps")
    if args.against is not None and not args.against.is_file():  # checked now, not after the training
        p.error(f"--against {args.against}: no such file; give an edm-train checkpoint of the same run length")
    draws = {name for name in args.edm_draws.split(",") if name}
    # a bad override or value, a folder in use: one line; Ctrl-C: a rerun without --resume would be refused
    with user_errors("nvlabs_loop.py", on_interrupt="rerun with --resume to continue from OUT's latest checkpoint"):
        path = train_reference(args.nvlabs_repo, args.overrides, args.out, args.log_every, draws, args.resume)
        print(f"saved {path}")
        if args.against is not None:
            for key, value in compare(path, args.against).items():
                print(f"{key}: |theta - theta_edm| / |theta_edm - theta_0| = {value:.3e}")
    return path


if __name__ == "__main__":
    main()
