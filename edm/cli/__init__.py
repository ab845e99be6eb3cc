"""The command-line programs, installed by pip as console scripts (pyproject.toml [project.scripts]).

    edm-train    python -m edm.train        train a denoiser (edm.training)
    edm-sample   python -m edm.cli.sample   generate images from a model, optionally scored
    edm-eval     python -m edm.cli.evaluate one metric (FID and precision/recall, FD_cls, bits/dim), reference statistics
    edm-study    python -m edm.cli.nfe_study metrics against NFE for solvers x step counts
    edm-export   python -m edm.cli.export   a model folder without pickles (model.safetensors + model.json)
    edm-posthoc  python -m edm.cli.posthoc  post-hoc EMA (EDM2) from a run's power-EMA snapshots
    edm-convert-nvlabs                      an NVlabs/edm or edm2 .pkl into that folder, never running its code

All take Hydra key=value overrides, `--help` and Hydra's tab completion (`edm-train -sc install=bash`).
Their configs are the YAML files of configs/ (shipped inside the package as edm/configs), each typed
by its schema dataclass. Every command has the same shape: compose, `typed` (OmegaConf.to_object, refusing
keys the schema lacks), call the library inside `user_errors` (one error rule), print what it made; the device
rule is edm.hardware.use_cpu.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn, Sequence

__all__ = ["CONFIG_DIR", "USER_ERRORS", "compose", "typed", "fail", "user_errors", "CONTINUES", "hydra_errors", "one_line", "sweep_job_folder", "sweep_folder_name", "own_folder_files", "write_hydra_record", "folder_log",
           "log_to", "close_log", "LOG_FORMAT", "error_line"]

LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # as Hydra's console


def _config_dir() -> str:
    """The Hydra configs: edm/configs in an installed wheel, else configs/ at the top of the repo
    (a checkout or an editable install; Hydra names the folder if it is missing)."""
    package = Path(__file__).resolve().parent.parent
    packaged = package / "configs"
    return str(packaged if (packaged / "train.yaml").is_file() else package.parent / "configs")


CONFIG_DIR = _config_dir()


def sweep_folder_name(overrides: str) -> str:
    """A sweep job's overrides (Hydra's override_dirname, KEY-VALUE__KEY-VALUE) as one folder name that a command
    line takes back as a path: a path's '/' becomes '+', a list's or dict's brackets, quotes and spaces go, and
    every other character Hydra would not read unquoted (',' ':' '~', letters beyond ASCII ...) becomes '_'. The job
    number before it keeps two jobs' folders apart."""
    name = re.sub(r"[\[\]{}'\" ]", "", overrides.replace("/", "+"))
    return re.sub(r"[^A-Za-z0-9_.+\-@%]", "_", name)


def _register_resolvers() -> None:
    """${edm_folder_name:...} for the configs' hydra.sweep.subdir (sweep_folder_name)."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("edm_folder_name", sweep_folder_name, replace=True)


_register_resolvers()


def compose(command: str, overrides: Sequence[str] = ()) -> Any:
    """A command's config as its schema's dataclass: configs/<command>.yaml with `overrides` as on its
    command line (e.g. compose("train", ["schedule=vp"]) is edm-train's TrainConfig), for tests,
    scripts and notebooks. The command's module (edm.cli.<command>) stores the schema."""
    import importlib

    from hydra import compose as hydra_compose, initialize_config_dir
    from omegaconf import OmegaConf

    importlib.import_module(f"{__name__}.{command}")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return typed(hydra_compose(command, overrides=list(overrides)))


def unknown_keys(node: Any, prefix: str = "") -> list[str]:
    """Dotted keys of a composed config that its schema dataclasses lack (Hydra's +KEY=V adds them past the
    schema's struct flag); free-form dict fields (sampler.options) take any key."""
    from omegaconf import DictConfig, OmegaConf

    if not isinstance(node, DictConfig) or node._is_none() or node._is_missing():  # (an unset optional group)
        return []
    kind = OmegaConf.get_type(node)
    fields = {f.name for f in dataclasses.fields(kind)} if dataclasses.is_dataclass(kind) else None
    found = []
    for key, child in node.items_ex(resolve=False):
        if fields is not None and key not in fields:
            found.append(f"{prefix}{key}")
        else:
            found += unknown_keys(child, f"{prefix}{key}.")
    return found


def typed(dcfg: Any) -> Any:
    """The command's schema dataclass of a composed config (OmegaConf.to_object); a key the schema lacks, or a required
    one left unset, is a ValueError naming it."""
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    unknown = sorted(unknown_keys(dcfg))
    if unknown:
        raise ValueError(f"{unknown_keys_message(unknown)}; a misspelt key given as +KEY=V would be ignored, so it is "
                         "refused")
    try:
        return OmegaConf.to_object(dcfg)
    except MissingMandatoryValue as err:
        raise ValueError(f"{err.full_key} is required: pass {err.full_key}=...") from None


# The errors whose message says what to do: bad config values, missing or foreign files, folders in use
# or holding other results, missing optional packages, a diverged training. Anything else is a bug and
# keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, ImportError, FloatingPointError)


def error_line(program: str, err: BaseException) -> str:
    """`program: error: ...`, the one line a command ends on for an error whose message says what to do."""
    return f"{program}: error: {err}"


def fail(program: str, err: BaseException) -> NoReturn:
    """End a command on an error whose message says what to do: error_line on stderr, exit 1."""
    print(error_line(program, err), file=sys.stderr)
    raise SystemExit(1) from None


CONTINUES = "rerun the same command to continue where it stopped"  # Ctrl-C's advice where a rerun resumes


@contextlib.contextmanager
def user_errors(program: str, on_interrupt: str = "rerun the same command") -> Iterator[None]:
    """Turn USER_ERRORS raised inside, and Hydra's errors of a config composed inside (one_line: "unknown key
    lr_x: ..."), into `fail(program, err)`; Ctrl-C into one line `program: stopped; <on_interrupt>`, exit 130."""
    from hydra.errors import HydraException

    try:
        yield
    except HydraException as err:
        fail(program, one_line(err))
    except USER_ERRORS as err:
        fail(program, err)
    except KeyboardInterrupt:
        print(f"{program}: stopped; {on_interrupt}", file=sys.stderr)
        raise SystemExit(130) from None


def hydra_errors(program: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a @hydra.main function so that Hydra's own errors of a command line (a misspelt key, a value of the
    wrong type, a group option that does not exist, an override that does not parse) end in one line
    `program: error: ...` (exit 1) instead of Hydra's report, whose hint "+KEY=V" `typed` refuses. Hydra raises
    them only with HYDRA_FULL_ERROR set, which also leaves a bug's traceback whole."""

    def decorate(hydra_main: Callable[..., Any]) -> Callable[..., Any]:
        task = getattr(hydra_main, "__wrapped__", None)  # the command's own function (hydra.main wraps it)

        @functools.wraps(hydra_main)
        def run(*args: Any, **kwargs: Any) -> Any:
            from hydra.errors import HydraException
            from omegaconf.errors import OmegaConfBaseException

            if "--version" in sys.argv[1:]:  # Hydra's own --version would name only Hydra's
                print(version_line(program))
                return None
            before = os.environ.get("HYDRA_FULL_ERROR")
            os.environ["HYDRA_FULL_ERROR"] = "1"
            try:
                return hydra_main(*args, **kwargs)
            except AssertionError as err:  # OmegaConf.update of a key under a null node (a group left unset)
                if _raised_in(err, task) or "Unexpected type for root" not in str(err):
                    raise
                fail(program, under_unset_group(sys.argv[1:]))
            except (HydraException, OmegaConfBaseException, FileExistsError, NotADirectoryError) as err:
                if _raised_in(err, task):  # a bug in the command itself (user_errors took its users' errors)
                    raise
                if isinstance(err, (FileExistsError, NotADirectoryError)):  # a sweep's (-m) folder is a file
                    fail(program, f"{err.filename} is a file, not a folder: give a folder's path")
                fail(program, one_line(err))
            finally:
                if before is None:
                    os.environ.pop("HYDRA_FULL_ERROR", None)
                else:
                    os.environ["HYDRA_FULL_ERROR"] = before

        return run

    return decorate


def version_line(program: str) -> str:
    """`program --version`: this package's version, then Hydra's and torch's."""
    import hydra
    import torch

    from .. import __version__

    return f"{program} {__version__} (Hydra {hydra.__version__}, torch {torch.__version__})"


def _raised_in(err: BaseException, fn: Callable[..., Any] | None) -> bool:
    """Whether `err` went through a call of `fn` (its traceback holds a frame of fn's code)."""
    code = getattr(fn, "__code__", None)
    tb = err.__traceback__
    while tb is not None and code is not None:
        if tb.tb_frame.f_code is code:
            return True
        tb = tb.tb_next
    return False


def under_unset_group(overrides: list[str]) -> str:
    """The refusal of an override that sets a key under a group the command leaves unset (null, e.g. edm-sample's
    dataset): OmegaConf has no node to set it in. Names the first KEY.SUB=V whose KEY no override sets."""
    keys = [arg.split("=", 1)[0].lstrip("+~") for arg in overrides if "=" in arg and not arg.startswith("-")]
    heads = {key for key in keys if "." not in key}
    key = next((key for key in keys if "." in key and key.split(".", 1)[0] not in heads), None)
    if key is None:
        return "an override sets a key under an option this command leaves unset: name that option first"
    head = key.split(".", 1)[0]
    return (f"{key} sets a key of {head}, which this command leaves unset: name it first ({head}=NAME {key}=...; "
            "--help lists the options)")


def unknown_keys_message(keys: list[str], close: list[str] = ()) -> str:
    """The one wording of the rule for keys that no option of the command has; `close`: options they may have meant."""
    many = len(keys) > 1
    meant = f"did you mean {' or '.join(close)}? " if close else ""
    return (f"unknown key{'s' if many else ''} {', '.join(keys)}: not {'options' if many else 'an option'} of this "
            f"command ({meant}--help lists them)")


def close_options(key: str, unknown: str, options: Any) -> list[str]:
    """`key` with its first part that is no option, `unknown` (its full key: OmegaConf's error names the deepest
    node that exists, `options`, and the key under it, which need not be the last part of `key`), replaced by each
    option of that node close to it under which the rest of `key` is an option too (or a free-form mapping's key)."""
    import difflib

    from omegaconf import DictConfig, OmegaConf

    def holds(node: Any, parts: list[str]) -> bool:  # nodes, not values: a value may be missing (???)
        for part in parts:
            if not isinstance(node, DictConfig):
                return False
            if part not in node.keys():
                return OmegaConf.get_type(node) is dict  # sampler.options: its keys are added with +
            node = node._get_node(part)
        return True

    prefix, _, name = unknown.rpartition(".")
    rest = key[len(unknown):].split(".")[1:] if key.startswith(unknown + ".") else []
    names = [str(option) for option in (options.keys() if isinstance(options, DictConfig) else ())]
    return [".".join([prefix, match, *rest] if prefix else [match, *rest])
            for match in difflib.get_close_matches(name, names, n=2) if holds(options._get_node(match), rest)]


def _no_solver_option(key: str) -> str | None:
    """For sampler.options.NAME that no solver takes, the message naming the close ones; else None."""
    import difflib

    from ..core.samplers import SOLVERS, solver_options

    name = key.removeprefix("sampler.options.")
    if name == key or "." in name:
        return None
    known = sorted({option for fn in SOLVERS.values() for option in solver_options(fn)})
    if name in known:
        return None
    close = difflib.get_close_matches(name, known, n=3)
    return (f"{key}: no solver takes an option {name!r}" + (f" (did you mean {', '.join(close)}?)" if close else "")
            + f"; the solvers' options: {', '.join(known)}")


def one_line(err: BaseException) -> str:
    """Hydra's multi-line message of a command-line error as one line: an unknown key named as such (Hydra's hint
    +KEY=V is dropped), a bad value with OmegaConf's reason, a missing group option with the options."""
    from hydra.errors import OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    text, cause = str(err), err.__cause__
    override = re.match(r"Could not override '([^']+)'", text)
    if override and isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
        key = override.group(1)
        if "object_type=dict" in str(cause):  # a free-form mapping (sampler.options): its keys are added with +
            value = re.search(r"use \+(\S+)", text)
            unknown = _no_solver_option(key)
            return unknown or (f"{key} is not in the config file: pass +{value.group(1) if value else key + '=V'} to "
                               "add it (e.g. a solver option its sampler file does not list)")
        return unknown_keys_message([key], close_options(key, str(getattr(cause, "full_key", key)),
                                                         getattr(cause, "parent_node", None)))
    if override and "No match in the defaults list" in text:  # a group of another command (Hydra: "use +GROUP=...")
        return f"{override.group(1)} is not a config group of this command (--help lists its options)"
    merging = re.match(r"Error merging override (.+)", text)
    if (override or merging) and cause is not None:
        given, reason = (override or merging).group(1), str(cause).splitlines()[0]
        key, _, value = given.partition("=")
        if "is not a ListConfig" in reason and value:  # a list key given one value
            return f"{given}: {reason.rstrip('.')}; give a list: '{key}=[{value}]'"
        return f"{given}: {reason}"
    if isinstance(err, OverrideParseException):
        return f"an override does not parse: {text.splitlines()[0]} (quote lists and strings for the shell: 'KEY=[a,b]')"
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and not line.strip().startswith(("full_key:", "object_type=", "provider=", "Config search path"))]
    if lines and lines[0].startswith("In '") and "Could not find" in lines[0] and len(lines) > 1:
        return f"{lines[0]}; {lines[1].rstrip(':')}: {', '.join(lines[2:])}"
    return "; ".join(lines)


def sweep_job_folder(hydra_cfg: Any, key: str | None = None) -> str | None:
    """In a Hydra multirun (-m), this job's own folder, hydra.sweep.dir/<job number>-<its overrides>, beside
    the sweep's multirun.yaml; None in a single run. `key`: an option that names the output folder and
    so may not be given on a sweep's command line (it would be one folder for all jobs)."""
    from hydra.types import RunMode

    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    if key is not None and any(o.split("=", 1)[0].lstrip("+~") == key for o in hydra_cfg.overrides.task):
        raise ValueError(f"in a sweep (-m) each job writes to its own folder under hydra.sweep.dir: "
                         f"pass hydra.sweep.dir=DIR instead of {key}")
    return hydra_cfg.runtime.output_dir


def own_folder_files(folder: Path, dcfg: Any, hydra_cfg: Any, log_name: str) -> logging.Handler:
    """What a command keeps in its output folder, written by the main process once it owns the folder
    (a refused run writes nothing there, so it cannot overwrite the owner's record): write_hydra_record's
    .hydra/ files and folder_log's `log_name`, whose handler is returned for `close_log`."""
    write_hydra_record(folder, dcfg, hydra_cfg)
    return folder_log(folder, log_name)


def write_hydra_record(folder: Path, dcfg: Any, hydra_cfg: Any) -> None:
    """.hydra/{config,hydra,overrides}.yaml in `folder`, as Hydra writes them: the commands' configs set output_subdir
    null and log to stderr only, so Hydra itself writes nothing."""
    from omegaconf import OmegaConf

    from ..files import atomic_write

    for name, node in (("config.yaml", dcfg), ("hydra.yaml", OmegaConf.create({"hydra": hydra_cfg})),
                       ("overrides.yaml", hydra_cfg.overrides.task)):
        text = OmegaConf.to_yaml(node).encode()
        atomic_write(Path(folder) / ".hydra" / name, lambda f, text=text: f.write(text), durable=False)


def folder_log(folder: Path, log_name: str) -> logging.Handler:
    """The root logger also writes to folder/log_name (appended to); the handler, for `close_log`."""
    handler = logging.FileHandler(Path(folder) / log_name, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.getLogger().addHandler(handler)
    return handler


def log_to(handlers: Sequence[logging.Handler], message: str) -> None:
    """An error record of `message` in these handlers only (a folder's log), not on the console."""
    record = logging.makeLogRecord({"name": "edm", "levelno": logging.ERROR, "levelname": "ERROR", "msg": message})
    for handler in handlers:
        handler.handle(record)


def close_log(handler: logging.Handler) -> None:
    """Detach and close a handler of folder_log."""
    logging.getLogger().removeHandler(handler)
    handler.close()
