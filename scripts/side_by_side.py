"""Train arms side by side on paired seeds and compare their sample quality with paired differences.

    python scripts/side_by_side.py --out runs/side-by-side --seeds 0-4 --num-images 10000 \\
        --nvlabs-repo /path/to/edm --arm ours=edm-train --arm reference=nvlabs \\
        --arm "fast=edm-train lr=4e-3" \\
        dataset=fashion_mnist dataset.resolution=16 network=tiny total_kimg=96 dataset.num_workers=0
    python scripts/side_by_side.py --out runs/side-by-side --report-only      # the table again, from OUT's records

An arm is LABEL=KIND [OVERRIDE ...]: KIND `edm-train` trains with edm.training.loop.train, `nvlabs` with
NVlabs/edm's own loop (scripts/nvlabs_loop.py; needs --nvlabs-repo, whose code it runs),
`nvlabs:order,noise` with that loop on edm-train's data order and/or σ and n, and `recipe-small` runs
recipe=small's four commands (docs/training.md), or those of the recipe its overrides name (recipe=small-edm):
edm-train recipe=small, its guide (the same run with half the channels and a quarter of the images, as
recipe=small-guide), post-hoc EMA σ_rel 0.10, and scores that model autoguided (w = 1.5 on σ ∈ (0.28, 2.9])
in place of the EMA. The recipe's power-EMA snapshots change nothing it trains, so an edm-train arm whose
settings differ from a recipe-small arm's only in those snapshots scores that arm's run of the seed (its EMA)
instead of training the same weights again, and says so in its seed folder (same-run.json). The arm's overrides
go on top of the shared ones (the positional arguments, edm-train's keys); a recipe-small arm whose shared
settings replace one its recipe makes (a shared network=tiny over recipe=small's edm2-tiny) is refused, naming
the keys and the arm that keeps the recipe's. Every arm trains once per
seed k (seed=k) and is scored on the same samples seeds 0..N−1 (EMA weights, Heun 18 steps, FD_cls of
edm.evaluation.quality, through edm-study's run_study), so seed k pairs the arms: the table gives each
arm's scores per seed, mean ± sd, and the mean paired difference from the first arm with its 95 %
Student-t interval (edm.evaluation.stats).

OUT/<label>/seed-<k>/ holds each run and its score/; OUT/table.md, table.json and scores.png the result.
A rerun continues where the last stopped: finished runs and scores are kept and a cut run resumes; a run
whose recorded settings are not the arm's (a recipe file changed since, say) is refused, naming the settings;
settings are compared as trained, the preconditioning and loss as the resolved specs a checkpoint records (under
schedule=edm, precond.kind=edm names what precond.kind unset trains).
OUT/provenance.json records the shared settings and OUT/<label>/provenance.json each arm's: a rerun
with other shared settings, or an arm label given another definition, is refused; a new arm may join. `--only LABEL`
trains and scores one arm, so several processes (one thread each) can share the work; the table is
written from every score present, of any seeds (a run of `--seeds 3` adds a column to those of `--seeds 0-2`).
One process at a time trains or scores an arm's seed (OUT/.units holds the locks; a second is refused, naming the
first), and --overwrite, which deletes every arm's runs and scores in OUT, is refused while any is in progress.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import shlex
import sys
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from edm.cli import compose, user_errors
from edm.data import dataset_record, resolved_root, root_contents_key
from edm.evaluation.nfe_study import StudyConfig, run_study
from edm.evaluation.quality import ClassifierConfig
from edm.evaluation.scorers import EvalConfig, FdClsConfig
from edm.evaluation.plots import plot_paired_scores
from edm.evaluation.stats import mean_sd, paired_difference
from edm.files import FolderInUseError, FolderLock, atomic_write, differences, to_container, write_json
from edm.provenance import ProvenanceError, claim, run_marks
from edm.models import checkpoint as ckpt
from edm.networks import presets
from edm.training.posthoc import PosthocConfig, output_name, reconstruct
from edm.training.build import loss_spec, resolve
from edm.training.config import check_config
from edm.training.run import RESUME_FREE, checkpoint_settings, listed, setting_differences, settings_as_trained

REPO = Path(__file__).resolve().parents[1]
KINDS = ("edm-train", "nvlabs", "recipe-small")
# recipe=small's sampling half (configs/recipe/small.yaml's commands; tests/test_side_by_side.py holds them equal)
SMALL_SIGMA_REL, SMALL_GUIDANCE, SMALL_INTERVAL = 0.10, 1.5, [0.28, 2.9]
SCORE = "fd_cls"
NUM_IMAGES = 10000  # samples scored per run unless --num-images
SOLVER, STEPS = "heun", 18
POWER_EMA_KEYS = frozenset({"ema_sigma_rel", "ema_snapshot_kimg"})  # snapshots for edm-posthoc: tracked, not trained
UNITS = ".units"  # OUT/.units/.lock guards the claims, OUT/.units/<label>/seed-<k>/.lock one arm's seed
REPORT_FILES = ("table.md", "table.json", "scores.png")


@dataclass(frozen=True)
class Arm:
    """One arm: its label, how it trains (KINDS; draws: edm-train's streams the nvlabs loop replays), its overrides."""

    label: str
    kind: str
    draws: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> "Arm":
        """LABEL=KIND[:order,noise] [OVERRIDE ...]."""
        try:
            head, *overrides = shlex.split(text)
        except ValueError:  # nothing given, or an unclosed quote: the usage below
            head, overrides = "", []
        label, sep, kind = head.partition("=")
        kind, _, draws = kind.partition(":")
        if not sep or not label or kind not in KINDS or (draws and kind != "nvlabs"):
            raise SystemExit(f"side_by_side.py: error: --arm {text!r}: expected LABEL=KIND [OVERRIDE ...], KIND one of "
                             f"{', '.join(KINDS)} (nvlabs:order,noise replays edm-train's draws)")
        if "/" in label or label.startswith("."):
            raise SystemExit(f"side_by_side.py: error: arm label {label!r} names a folder: use letters, digits, - or _")
        return cls(label, kind, tuple(d for d in draws.split(",") if d), tuple(overrides))


def parse_seeds(text: str) -> list[int]:
    """'0-4' or '0,2,5' (or both: '0-2,7'); anything else (a negative seed, a range high to low) is refused."""
    seeds: list[int] = []
    for part in text.split(","):
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not (hi.isdigit() and int(hi) >= int(lo))):
            raise SystemExit(f"side_by_side.py: error: --seeds {text!r}: expected seeds 0 or more, as 0-4 (low to high), "
                             "0,3,7 or 0-2,7")
        seeds += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
    return list(dict.fromkeys(seeds))


def _nvlabs_loop():
    """scripts/nvlabs_loop.py, the reference loop, as a module."""
    spec = importlib.util.spec_from_file_location("edm_nvlabs_loop", REPO / "scripts" / "nvlabs_loop.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def config_trained(cfg: object) -> dict:
    """settings_as_trained of an edm-train config: its precond and loss resolved (edm.training.build.resolve), as
    checkpoint_settings reads a run's."""
    resolved = resolve(cfg)
    return settings_as_trained(cfg, loss_spec(resolved.loss), resolved.precond)


def run_differences(state: dict, cfg: object) -> list[str]:
    """'key: run A, arm B' for each setting that a run's checkpoint and the arm's config train differently (the
    preconditioning and loss as resolved specs); keys that say only how a run is carried out or reported
    (RESUME_FREE, total_kimg aside) and keys that one of the two records lacks are not compared."""
    free = tuple(key for key in RESUME_FREE if key != "total_kimg")
    return [f"{key}: run {a!r}, arm {b!r}" for key, a, b in setting_differences(checkpoint_settings(state),
                                                                                  config_trained(cfg))
            if not listed(key, free)]


def finished_checkpoint(run_dir: Path, overrides: list[str], launched: bool = True) -> Path | None:
    """run_dir's latest checkpoint if it has reached the config's total_kimg, else None; a run of other settings
    is refused. launched: the run is edm-train's, which records mixed_precision and compile as launched (the
    NVlabs loop records the config as given)."""
    from edm.training.loop import as_launched

    latest = ckpt.find_latest(run_dir)
    if latest is None:
        return None
    cfg = compose("train", overrides)
    cfg = as_launched(cfg)[0] if launched else cfg
    state = torch.load(latest, map_location="cpu", weights_only=True)
    try:
        differs = run_differences(state, cfg)
    except (ckpt.CheckpointError, ValueError) as err:
        raise SystemExit(f"side_by_side.py: error: {latest} cannot be compared with this arm's settings ({err}): move "
                         "that run away, give the arm another label, or pass --overwrite to delete OUT's runs") from None
    if differs:
        raise SystemExit(f"side_by_side.py: error: {latest} was trained with other settings than this arm's "
                         f"({'; '.join(differs)}): move that run away, give the arm another label, or pass --overwrite "
                         "to delete OUT's runs")
    return latest if state["cur_nimg"] >= round(cfg.total_kimg * 1000) else None


@dataclass(frozen=True)
class Scored:
    """What an arm's seed scores: the model, and for recipe-small its guide (else None)."""

    model: Path
    guide: Path | None = None


def train_edm(overrides: list[str], run_dir: Path) -> Path:
    """edm-train's final checkpoint in run_dir for these overrides: trained now, resumed, or found; a run stopped on
    request (Ctrl-C, SIGTERM) ends the script instead of being guided, post-hoc averaged or scored."""
    from edm.training.loop import train

    overrides = [*overrides, f"run_dir={run_dir}", "progress=false"]
    done = finished_checkpoint(run_dir, overrides)
    if done is not None:
        return done
    resume = bool(run_marks(run_dir))  # a checkpoint, or a cut run's records or snapshots: continue or start it over
    result = train(compose("train", [*overrides, f"resume={str(resume).lower()}"]))
    if result.interrupted:  # Ctrl-C, SIGTERM: the checkpoint is saved, the run is not finished
        raise SystemExit(f"side_by_side.py: error: the run in {run_dir} stopped at step {result.state.step}, before its "
                         "total_kimg, and is not used; rerun the same command to resume it")
    return result.checkpoint


def small_main(overrides: list[str]) -> list[str]:
    """recipe=small's main run for these overrides (or the recipe they name)."""
    return overrides if any(item.startswith("recipe=") for item in overrides) else ["recipe=small", *overrides]


def replaced_by_shared(arm: Arm, shared: list[str]) -> list[tuple[str, object, object]]:
    """(key, the recipe's value, the shared settings' value) for each setting that a recipe-small arm's recipe makes
    and the shared settings replace. A command-line group or key beats a recipe's (Hydra's order), so a shared
    `network=tiny` would train recipe=small on `tiny`; the arm's own overrides come last and are taken as meant."""
    recipe = to_container(compose("train", small_main(list(arm.overrides))))
    made = {key for key, _, _ in differences(to_container(compose("train", [])), recipe)}
    with_shared = to_container(compose("train", small_main([*shared, *arm.overrides])))
    free = (*RESUME_FREE, "dataset.")  # how a run is carried out, and the data: the comparison's, shared by every arm
    return [(key, a, b) for key, a, b in differences(recipe, with_shared) if key in made and not listed(key, free)]


def check_recipe_arms(arms: list[Arm], shared: list[str]) -> None:
    """Refuse a recipe-small arm whose shared settings replace its recipe's (replaced_by_shared), naming them and
    the overrides that keep the recipe's."""
    for arm in (arm for arm in arms if arm.kind == "recipe-small"):
        replaced = replaced_by_shared(arm, shared)
        if replaced:
            keep = [f"{key.removesuffix('.name')}={a}" if key.endswith(".name") else  # a group by its name
                    f"{key}={a if isinstance(a, str) else json.dumps(a, separators=(',', ':'))}"  # null, true, [..]
                    for key, a, _ in replaced]
            raise SystemExit(
                f"side_by_side.py: error: arm {arm.label}: the shared settings replace what its recipe sets "
                f"({'; '.join(f'{key}: recipe {a!r}, shared {b!r}' for key, a, b in replaced)}), so the arm would not "
                f"train its recipe; give the arm the values it should train (--arm "
                f"{shlex.quote(shlex.join([f'{arm.label}={arm.kind}', *arm.overrides, *keep]))} keeps the recipe's) or "
                "leave them out of the shared settings")


def differing_keys(a: list[str], b: list[str]) -> list[str]:
    """The dotted keys of edm-train's config that the two override lists train differently (sorted; the
    preconditioning and loss as resolved specs, config_trained)."""
    return [key for key, _, _ in differences(config_trained(compose("train", a)), config_trained(compose("train", b)))]


def same_run(arm: Arm, arms: list[Arm], seed: int, shared: list[str], out: Path) -> tuple[Arm, Path, list[str]] | None:
    """A recipe-small arm, its finished main run of `seed` and the keys where its config differs, when that run
    trains what edm-train arm `arm` trains: they differ only in POWER_EMA_KEYS, which leave the weights and their EMA
    bit for bit the same."""
    if arm.kind != "edm-train":
        return None
    mine = [*shared, *arm.overrides, f"seed={seed}"]
    for other in arms:
        theirs = small_main([*shared, *other.overrides, f"seed={seed}"])
        if other.kind == "recipe-small" and set(differs := differing_keys(mine, theirs)) <= POWER_EMA_KEYS:
            run_dir = out / other.label / f"seed-{seed}"
            done = finished_checkpoint(run_dir, [*theirs, f"run_dir={run_dir}"])
            if done is not None:
                return other, done, differs
    return None


def guide_overrides(main: list[str]) -> list[str]:
    """The guide of the main run's overrides: half its channels and a quarter of its images, no power EMAs (what
    recipe=small-guide is to recipe=small)."""
    cfg = compose("train", main)
    channels = cfg.network.model_channels or presets.resolve(cfg.network.name)[1]["model_channels"]
    return [*main, f"network.model_channels={channels // 2}", f"total_kimg={cfg.total_kimg / 4}",
            "ema_sigma_rel=[]", "ema_snapshot_kimg=0"]


def train_arm(arm: Arm, arms: list[Arm], seed: int, shared: list[str], out: Path, nvlabs_repo: str | None) -> Scored:
    """The arm's model for `seed` (trained now, resumed, or found, also as a recipe-small arm's same run): the
    final checkpoint, or recipe-small's post-hoc EMA folder and guide."""
    overrides = [*shared, *arm.overrides, f"seed={seed}"]
    run_dir = out / arm.label / f"seed-{seed}"
    if arm.kind == "edm-train":
        twin = None if ckpt.find_latest(run_dir) is not None else same_run(arm, arms, seed, shared, out)
        if twin is not None:
            other, checkpoint, differs = twin
            write_json(run_dir / "same-run.json", {"arm": other.label, "checkpoint": str(checkpoint), "differs_in": differs})
            logging.getLogger("side_by_side").info("%s seed %d: the run of arm %s (%s), the same training", arm.label,
                                                   seed, other.label, checkpoint)
            return Scored(checkpoint)
        return Scored(train_edm(overrides, run_dir))
    if arm.kind == "recipe-small":
        main = small_main(overrides)
        train_edm(main, run_dir)
        guide = train_edm(guide_overrides(main), run_dir / "guide")
        posthoc = run_dir / "posthoc"
        if not (posthoc / output_name(SMALL_SIGMA_REL) / "model.json").is_file():
            reconstruct(PosthocConfig(run_dir=str(run_dir), sigma_rel=[SMALL_SIGMA_REL], out=str(posthoc)))
        return Scored(posthoc / output_name(SMALL_SIGMA_REL), guide)
    if nvlabs_repo is None:
        raise SystemExit(f"side_by_side.py: error: arm {arm.label} runs NVlabs/edm's loop: pass --nvlabs-repo PATH")
    done = finished_checkpoint(run_dir, [*overrides, f"run_dir={run_dir}"], launched=False)
    return Scored(done or _nvlabs_loop().train_reference(nvlabs_repo, overrides, run_dir, edm_draws=set(arm.draws),
                                                         resume=True))  # a cut run of the arm's settings continues


def score_arm(model: Scored, out: Path, num_images: int, batch: int, classifier: ClassifierConfig) -> float:
    """FD_cls of the model (a checkpoint's EMA, or recipe-small's autoguided post-hoc EMA) on seeds
    0..num_images−1 (Heun, 18 steps), kept in out/ for reruns."""
    metrics = EvalConfig(metrics=[SCORE], fd_cls=FdClsConfig(classifier=classifier))
    guidance = {} if model.guide is None else dict(guidance=SMALL_GUIDANCE, guide=str(model.guide),
                                                    guidance_interval=list(SMALL_INTERVAL))
    cfg = StudyConfig(checkpoint=str(model.model), solvers=[SOLVER], steps=[STEPS], num_images=num_images, batch=batch,
                      out=str(out), eval=metrics, progress=False, **guidance)
    try:
        return float(run_study(cfg)[0][SCORE])
    except ProvenanceError as err:  # edm-study's ways out name its own options, not this script's
        raise SystemExit(f"side_by_side.py: error: {err.finding}; move {out} away to score the run again, or pass "
                         "--overwrite to delete OUT's runs and scores") from None


def claim_out(out: Path, shared: dict, arms: list[Arm], overwrite: bool = False) -> None:
    """Make OUT hold runs of the `shared` settings only, and OUT/<label> runs of its arm (a new arm may join), under
    OUT's claim lock; a mismatch is refused naming the settings. overwrite deletes every arm's runs and scores first
    (of this command's arms or not), refused while any arm's seed is being trained or scored."""
    with FolderLock(out / UNITS, key="--out", owner="side-by-side", wait=True), ExitStack() as units:
        if overwrite:
            for unit in sorted((out / UNITS).glob("*/seed-*")):
                try:
                    units.enter_context(FolderLock(unit, key="--out", owner="side-by-side"))
                except FolderInUseError as err:
                    raise SystemExit(f"side_by_side.py: error: --overwrite would delete arm {unit.parent.name} "
                                     f"{unit.name} of {out}, which {err.holder} is training or scoring; wait for it to "
                                     "finish (or stop it), then overwrite") from None
        results = [*(p for p in sorted(out.iterdir()) if p.is_dir() and not p.name.startswith(".")),
                   *(out / name for name in REPORT_FILES)] if out.is_dir() else []
        try:
            claim(out, shared, results, command="side_by_side.py", overwrite=overwrite, overwrite_key="--overwrite",
                  out_key="--out")
        except ProvenanceError as err:
            raise SystemExit(f"side_by_side.py: error: {err}") from None
        for arm in arms:
            try:
                claim(out / arm.label, dataclasses.asdict(arm), list((out / arm.label).glob("seed-*")), command="side_by_side.py")
            except ProvenanceError as err:  # OUT's other arms are kept: a new label, or all of them go
                raise SystemExit(f"side_by_side.py: error: arm {arm.label}: {err.finding}; give the arm another label, "
                                 "or pass --overwrite to delete OUT's runs and scores") from None


@contextmanager
def seed_lock(out: Path, label: str, seed: int) -> Iterator[None]:
    """Own arm `label`'s seed of OUT while training and scoring it; a second process on it is refused, naming the
    first."""
    lock = FolderLock(out / UNITS / label / f"seed-{seed}", key="--out", owner="side-by-side")
    try:
        lock.acquire()
    except FolderInUseError as err:
        raise SystemExit(f"side_by_side.py: error: arm {label} seed {seed} of {out} is being trained or scored by "
                         f"{err.holder}; wait for it to finish, or give each process its own arms (--only LABEL) or "
                         "seeds (--seeds)") from None
    try:
        yield
    finally:
        lock.release()


def collect(out: Path, arms: list[Arm]) -> dict[str, dict[int, float]]:
    """scores[label][seed] of every finished score under out, of this command's seeds or earlier ones (OUT's
    provenance holds every run there to the same arms and shared settings)."""
    scores: dict[str, dict[int, float]] = {}
    for arm in arms:
        tables = {int(folder.name.removeprefix("seed-")): folder / "score" / "table.json"
                  for folder in (out / arm.label).glob("seed-*") if folder.name.removeprefix("seed-").isdigit()}
        scores[arm.label] = {seed: float(json.loads(table.read_text())["rows"][0][SCORE])
                             for seed, table in sorted(tables.items()) if table.is_file()}
    return scores


def report(out: Path, arms: list[Arm], scores: dict[str, dict[int, float]], shared: list[str], num_images: int) -> str:
    """table.md, table.json and scores.png from the scores; returns the markdown."""
    seeds = sorted({k for per_seed in scores.values() for k in per_seed})
    base = arms[0].label
    model = "the EMA" + (f" (recipe-small: post-hoc σ_rel {SMALL_SIGMA_REL}, guidance {SMALL_GUIDANCE} on "
                         f"{tuple(SMALL_INTERVAL)})" if any(arm.kind == "recipe-small" for arm in arms) else "")
    lines = [f"{SCORE} of {model}, {num_images} samples (seeds 0-{num_images - 1}, {SOLVER} {STEPS} steps) per run; "
             f"shared settings: {' '.join(shared)}", "",
             "| arm | " + " | ".join(f"seed {k}" for k in seeds) + " | mean ± sd | paired difference from "
             f"{base} (95 % interval) |", "|---" * (len(seeds) + 3) + "|"]
    rows = []
    for arm in arms:
        per_seed = scores[arm.label]
        cells = [f"{per_seed[k]:.3f}" if k in per_seed else "" for k in seeds]
        mean, sd = mean_sd(list(per_seed.values())) if per_seed else (None, None)
        sd = sd if len(per_seed) >= 2 else None  # undefined: JSON null, and no "± nan" in the table
        summary = "" if mean is None else f"{mean:.3f}" + ("" if sd is None else f" ± {sd:.3f}")
        paired = [k for k in seeds if k in per_seed and k in scores[base]]
        row = {"arm": arm.label, "kind": arm.kind, "draws": list(arm.draws), "overrides": list(arm.overrides),
               "scores": {str(k): per_seed[k] for k in sorted(per_seed)}, "mean": mean, "sd": sd}
        difference = ""
        if arm.label != base and len(paired) >= 2:
            d = paired_difference([scores[base][k] for k in paired], [per_seed[k] for k in paired])
            row["paired_difference"] = dataclasses.asdict(d)
            base_mean = sum(scores[base][k] for k in paired) / len(paired)
            difference = (f"{d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}] over {d.n} seeds "
                          f"({100 * d.mean / base_mean:+.1f} %{'' if d.excludes_zero() else ', interval holds 0'})")
        rows.append(row)
        name = arm.label + (f" ({' '.join(arm.overrides)})" if arm.overrides else "")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {summary} | {difference} |")
    text = "\n".join(lines) + "\n"
    atomic_write(out / "table.md", lambda f: f.write(text.encode()))
    write_json(out / "table.json", {"score": SCORE, "num_images": num_images, "shared": shared, "rows": rows})
    if seeds:
        plot_paired_scores(scores, out / "scores.png", score=SCORE, title=f"{num_images} samples per run; lines join seeds")
    return text


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="folder of the comparison (runs, scores, table)")
    p.add_argument("--arm", action="append", metavar="'LABEL=KIND [OVERRIDE ...]'",
                   help="an arm, one quoted argument; the first is the baseline of the paired differences (give two or "
                        "more; with --report-only and none, OUT's arms, its last table's baseline first)")
    p.add_argument("--seeds", default="0-2", help="training seeds shared by every arm: 0-4 or 0,3,7 (default 0-2)")
    p.add_argument("--num-images", type=int, help=f"samples scored per run (default {NUM_IMAGES})")
    p.add_argument("--batch", type=int, default=250, help="samples per forward pass")
    p.add_argument("--classifier-steps", type=int,
                   help=f"training steps of FD_cls's classifier (default {ClassifierConfig.steps}; trained once, cached)")
    p.add_argument("--nvlabs-repo", metavar="PATH", help="an NVlabs/edm checkout, for nvlabs arms (its code is run)")
    p.add_argument("--only", metavar="LABEL", help="train and score this arm only (others may run in other processes)")
    p.add_argument("--report-only", action="store_true",
                   help="write the table from the scores present; train nothing (--out alone: OUT's recorded settings)")
    p.add_argument("--overwrite", action="store_true", help="delete OUT's earlier runs and scores first")
    p.add_argument("overrides", nargs="*", help="edm-train overrides shared by every arm: dataset=, network=, total_kimg=, ...")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    with user_errors("side_by_side.py"):  # an unknown key in the overrides, a bad value, a full disk: one line
        return run(args)


def recorded_comparison(out: Path) -> tuple[list[Arm], list[str], int, int]:
    """(arms, shared overrides, samples per score, classifier steps) that OUT's records hold, for --report-only
    without --arm: the arms in the order of OUT's last table (its baseline first), then any others by label."""
    try:
        record = json.loads((out / "provenance.json").read_text())
        arms = {folder.name: Arm(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(
                    (folder / "provenance.json").read_text()).items() if k != "command"})
                for folder in sorted(out.iterdir()) if (folder / "provenance.json").is_file()}
        shared, num_images, steps = list(record["shared"]), int(record["num_images"]), int(record["classifier"]["steps"])
        last = [row["arm"] for row in json.loads((out / "table.json").read_text())["rows"]]  # its baseline first
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"side_by_side.py: error: --report-only without --arm reads the arms, their order and the "
                         f"settings OUT records (provenance.json, table.json), and {out} holds no readable record of "
                         f"them ({type(err).__name__}: {err}): give --arm and the shared settings as its comparison was "
                         "run") from None
    return [arms[label] for label in last if label in arms] + [arm for label, arm in arms.items() if label not in last], \
        shared, num_images, steps


def run(args: argparse.Namespace) -> str:
    """main's work: the arms' claims, their training and scoring seed by seed, then the table."""
    if not args.arm:
        if not args.report_only:
            raise SystemExit("side_by_side.py: error: give two or more arms (--arm 'LABEL=KIND [OVERRIDE ...]')")
        given = [*args.overrides, *(f"--{key.replace('_', '-')}" for key in ("num_images", "classifier_steps")
                                    if getattr(args, key) is not None)]
        if given:
            raise SystemExit("side_by_side.py: error: --report-only without --arm takes OUT's recorded settings: drop "
                             f"{' '.join(given)}, or give the arms too")
        arms, args.overrides, args.num_images, args.classifier_steps = recorded_comparison(args.out)
    else:
        arms = [Arm.parse(text) for text in args.arm]
    args.num_images = NUM_IMAGES if args.num_images is None else args.num_images
    args.classifier_steps = ClassifierConfig.steps if args.classifier_steps is None else args.classifier_steps
    for key, least in (("num_images", 2), ("batch", 1), ("classifier_steps", 1)):  # before OUT records them
        if getattr(args, key) < least:
            raise SystemExit(f"side_by_side.py: error: --{key.replace('_', '-')} {getattr(args, key)}: give {least} or "
                             "more" + (" (a Fréchet distance needs two images)" if key == "num_images" else ""))
    labels = [arm.label for arm in arms]
    if len(arms) < 2 or len(set(labels)) != len(labels):
        raise SystemExit(f"side_by_side.py: error: give two or more arms with distinct labels, got {labels}")
    if args.report_only and args.overwrite:
        raise SystemExit("side_by_side.py: error: --report-only writes the table of the scores present, which "
                         "--overwrite would delete first: give one of the two")
    if args.only is not None and args.only not in labels:
        raise SystemExit(f"side_by_side.py: error: --only {args.only}: no such arm (arms: {', '.join(labels)})")
    needs_repo = [arm.label for arm in arms if arm.kind == "nvlabs" and args.only in (None, arm.label)]
    if needs_repo and args.nvlabs_repo is None and not args.report_only:
        raise SystemExit(f"side_by_side.py: error: arm {needs_repo[0]} runs NVlabs/edm's loop: pass --nvlabs-repo PATH")
    if needs_repo and not args.report_only:
        _nvlabs_loop().check_repo(args.nvlabs_repo)  # before any arm trains
    if not args.report_only:
        for arm in arms:  # an unknown key or a bad value of any arm, before any work
            overrides = [*args.overrides, *arm.overrides]
            check_config(compose("train", small_main(overrides) if arm.kind == "recipe-small" else overrides))
        check_recipe_arms([arm for arm in arms if args.only in (None, arm.label)], args.overrides)
    seeds = parse_seeds(args.seeds)
    classifier = ClassifierConfig(steps=args.classifier_steps)
    data = compose("train", args.overrides).dataset
    root = resolved_root(data.root)
    shared = {"shared": args.overrides, "num_images": args.num_images, "score": SCORE, "sampler": [SOLVER, STEPS],
              "classifier": dataclasses.asdict(classifier),
              "dataset": dataset_record(data) | {"root": root},  # the images, not only their keys
              "dataset_contents": root_contents_key(root) if root else None}
    claim_out(args.out, shared, arms, overwrite=args.overwrite)
    if not args.report_only:
        order = sorted(arms, key=lambda arm: arm.kind != "recipe-small")  # an edm-train arm may score their runs
        for seed in seeds:
            for arm in order:
                if args.only not in (None, arm.label):
                    continue
                unit = args.out / arm.label / f"seed-{seed}"
                with seed_lock(args.out, arm.label, seed):
                    claim_out(args.out, shared, [arm])  # still OUT's settings: no --overwrite came in between
                    model = train_arm(arm, arms, seed, args.overrides, args.out, args.nvlabs_repo)
                    value = score_arm(model, unit / "score", args.num_images, args.batch, classifier)
                print(f"{arm.label} seed {seed}: {SCORE} {value:.4f}", flush=True)
    text = report(args.out, arms, collect(args.out, arms), args.overrides, args.num_images)
    print(text)
    return text


if __name__ == "__main__":
    sys.exit(main() and 0)
