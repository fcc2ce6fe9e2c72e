"""The ``pruneflow`` command line: typed functions, one per command, in modules by command group — models
(``model``: prune, calibrate, evaluate, demo), the pipeline (``pipeline``: stage, run, serve, deploy, sweep,
report), the local stack (``stack``: up, status, down) and what pruneflow ships (``tools``: methods, export,
reference, corpus); ``common`` holds the Typer apps and what every command shares. The composition root: only
here does the library meet the flows, the tasks and the infra. It may import every room (a command's modules
load when it runs, so ``pruneflow --help`` loads no torch); nothing in the library imports it."""

from __future__ import annotations

import logging
import os
import sys

from pruneflow.cli import model, pipeline, stack, tools  # noqa: F401 (each registers its commands, in this order)
from pruneflow.cli.common import app

__all__ = ["app", "main"]


def main() -> None:
    """The console script. After the command, exit handlers run, threads are joined and streams flushed, then
    the process ends without tearing down every module object: that teardown takes ~1.5 s once Prefect,
    MLflow and DVC are loaded, and a `pruneflow run` with nothing to do is ~10 s. (Tests invoke ``app``.)"""
    import atexit
    import threading

    try:
        app()
        code = 0
    except SystemExit as exit_:
        if exit_.code is not None and not isinstance(exit_.code, int):
            raise  # a message to print: let Python's own exit do it
        code = exit_.code or 0
    # as the interpreter does at exit: threading's own exit callbacks first (they stop idle thread pools such as
    # MLflow's artifact uploader, whose workers wait for work forever), then every non-daemon thread is joined
    # (joining before those callbacks kept `pruneflow sweep` alive ~5 min after its flow had finished)
    threading._shutdown()
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
