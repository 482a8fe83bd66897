"""What every `infl` command does around its work: the one place errors become exit codes (`run_command`,
SPEC's 0/1/2/3/4/130), SIGINT/SIGTERM as an interruption that keeps finished cache shards, loading the config
with the CLI's cache default and hook folders, torch's thread count for one command, and --shard parsing.
No torch at import (the CLI's --help stays instant)."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import typer

from . import render
from .config import Config, load_config
from .errors import ConfigError, InflError

_interrupted = threading.Event()


def _terminate(_signum: int, _frame: Any) -> None:
    _interrupted.set()  # an error raised while unwinding from here is still an interruption
    raise KeyboardInterrupt  # SIGTERM (cron timeouts, kill) stops like Ctrl-C: exit 130, finished shards kept


_resumable = threading.Event()  # set when this command keeps finished shards in the cache


def _interrupted_message() -> str:
    resume = (", finished shards are kept in the cache: rerun the same command to resume" if _resumable.is_set()
              else "")
    return f"error: interrupted; reports and checkpoints from earlier runs are untouched{resume}"


def end_torchrun_process(code: Any) -> None:
    """A process that joined torchrun's process group ends here, with its exit code, at once (stdout and stderr
    flushed): the group's backend threads can still be joinable after destroy_process_group, and the interpreter's
    normal exit then destroys them and aborts the process ('terminate called without an active exception',
    SIGABRT) instead of exiting 0 or 4 (seen on a rank that had finished its part, and on a rank whose collective
    failed). Elsewhere a no-op: the normal exit follows."""
    distributed = sys.modules.get("influence_cli.distributed")
    if distributed is None or not distributed.joined():
        return
    import os

    if code is not None and not isinstance(code, int):  # what the interpreter does with SystemExit("message")
        sys.stderr.write(f"{code}\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else (0 if code is None else 1))


@contextmanager
def run_command(debug: bool, ui: render.UI | None = None) -> Iterator[None]:
    """The one place errors become exit codes. `ui`'s status line and bars end (and its warnings print)
    before any error line."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        _interrupted.clear()
        _resumable.clear()
        previous = {s: signal.signal(s, _terminate) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            yield
        finally:
            if ui is not None:
                ui.close()
    except InflError as e:
        if debug:
            raise
        render.stderr_console().print(f"error: {e.message}")
        if e.hint:
            render.stderr_console().print(f"  hint: {e.hint}")
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        if debug:
            raise
        render.stderr_console().print(_interrupted_message())
        raise typer.Exit(130) from None
    except typer.Exit:
        raise
    except Exception as e:  # noqa: BLE001 - anything else is a bug
        if debug:
            raise
        if _interrupted.is_set():  # e.g. a KeyboardInterrupt that C++ code turned into a RuntimeError
            render.stderr_console().print(_interrupted_message())
            raise typer.Exit(130) from None
        render.stderr_console().print(f"error: internal error ({type(e).__name__}: {e}); rerun with --debug and report it")
        raise typer.Exit(4) from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def split_ids(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def out_dir(cfg: Config, out: Path | None) -> Path:
    return out.resolve() if out is not None else cfg.output.dir


def load_cli_config(config: Path, overrides: list[str] | None, out: Path | None = None, *, no_cache: bool = False,
          cache: bool = True) -> Config:
    """The validated config; cache.dir defaults to <report folder>/.infl-cache (off with --no-cache);
    the config's folder and the current directory go on sys.path, where `module:function` hooks live."""
    cfg = load_config(config, overrides or [])
    for folder in (str(Path.cwd()), str(cfg.source.parent) if cfg.source else None):
        if folder and folder not in sys.path:
            sys.path.insert(0, folder)
    if not cache:
        return cfg
    folder = cfg.cache.dir if cfg.cache.dir is not None else out_dir(cfg, out) / ".infl-cache"
    cfg = replace(cfg, cache=replace(cfg.cache, dir=folder, enabled=cfg.cache.enabled and not no_cache))
    if cfg.cache.enabled:
        _resumable.set()
    return cfg


def parse_shard(shard: str | None, merge: bool) -> tuple[int, int] | None:
    """--shard i/N as (i, N), 0 <= i < N; ConfigError for anything else."""
    if shard is not None and merge:
        raise ConfigError("--shard and --merge: give one (the jobs with --shard, then one run with --merge)")
    if shard is None:
        return None
    i, _, n = shard.partition("/")
    if not (i.strip().isdigit() and n.strip().isdigit()) or not 0 <= int(i) < int(n):
        raise ConfigError(f"--shard: {shard!r} is not i/N with 0 <= i < N", hint="for example --shard 0/4")
    return int(i), int(n)
