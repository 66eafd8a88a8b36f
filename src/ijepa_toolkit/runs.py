"""The run contract shared by every entrypoint: the runner with its exit codes, ``results.json``.

Every entrypoint's ``main(argv)`` ends in ``run_main(work)``:

- ``UserError`` (config, file, folder, checkpoint) and a missing input file or folder
  (``FileNotFoundError``, ``NotADirectoryError``) → one ``error:`` line on stderr, exit 2;
- ``TrainingDiverged`` (NaN/inf loss) → one ``error:`` line naming the last good checkpoint,
  exit 1; ``WriteError`` (disk full while writing an output) → one line, exit 1;
- ``KeyboardInterrupt`` → one ``interrupted`` line, exit 130;
- ``SystemExit`` (argparse's ``--help`` and bad flags, ``parse_config``'s config errors) → its
  status, returned: ``main(argv)`` returns in-process, it never exits;
- anything else is a bug: a normal traceback.

``results.json`` has one schema for every protocol (see ``results_record``), with the
``inputs`` that made it (see ``write_results``). Run folders are owned by one run at a time
(``run_folder.open_run``: a lock, no silent reuse of another run's outputs, resume checks).

Resume is explicit everywhere (``--resume``, see ``run_folder.open_run``), and every training loop
checks its loss with ``check_finite``, which names the newest checkpoint written before the loss
diverged.
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Union

from .errors import TrainingDiverged, UserError, WriteError
from .io.atomic import write_json
from .run_folder import run_inputs, saved_config

RESULTS_NAME = "results.json"
PATH_ERRORS = (FileNotFoundError, NotADirectoryError)  # a missing input: bad input, not a bug
EXIT_OK, EXIT_FAILED, EXIT_USER, EXIT_INTERRUPTED = 0, 1, 2, 130


def error_line(message: Any) -> str:
    """``error: <message>`` folded onto one line."""
    return "error: " + (" ".join(str(message).split()) or type(message).__name__)


def run_main(work: Callable[[], Any], cleanup: Optional[Callable[[bool], None]] = None) -> int:
    """Run ``work()`` under the error taxonomy above; returns the exit status (0 on success).

    ``cleanup(finished)`` (e.g. leaving the process group) runs whatever happens; ``finished``
    says whether ``work()`` returned.
    """
    finished = False
    try:
        work()
        finished = True
        return EXIT_OK
    except (UserError, *PATH_ERRORS) as e:
        print(error_line(e), file=sys.stderr)
        return EXIT_USER
    except (TrainingDiverged, WriteError) as e:
        print(error_line(e), file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or EXIT_OK
        print(e.code, file=sys.stderr)  # what the interpreter does with a message
        return EXIT_FAILED
    finally:
        if cleanup is not None:
            cleanup(finished)


def check_finite(
    loss: float, where: str, last_good: Optional[Union[str, os.PathLike]] = None
) -> None:
    """Raise ``TrainingDiverged`` if ``loss`` is NaN or inf, before the update it would make.

    ``where`` says when (``"step 12 (epoch 2)"``); ``last_good`` is the newest checkpoint the run
    wrote (or resumed from) before it, named in the message when it exists.
    """
    if not math.isfinite(loss):
        good = last_good if last_good is not None and Path(last_good).is_file() else None
        raise TrainingDiverged(f"loss is {loss} at {where}; stopping before the update", good)


def environment() -> dict:
    """Versions, device and thread count that produced a result (recorded in results.json)."""
    import timm
    import torch

    from . import __version__

    device = "cpu"
    if torch.cuda.is_available():
        device = f"cuda ({torch.cuda.get_device_name(0)})"
    return {
        "toolkit": __version__,
        "git_revision": git_revision(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "device": device,
        "threads": torch.get_num_threads(),
    }


def git_revision() -> Optional[str]:
    """The toolkit source's git commit (with ``-dirty`` for local changes); None when not a repo."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no", "."],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{rev}-dirty" if dirty else rev


def results_record(
    protocol: str,
    metrics: dict,
    *,
    encoder_checkpoint: Optional[str],
    which: Optional[str],
    settings: Optional[dict] = None,
    output_checkpoint: Optional[str] = None,
    **extra: Any,
) -> dict:
    """The one ``results.json`` schema.

    ``encoder_checkpoint``: the input encoder (None for a random init, then ``which`` is
    ``"random_init"``); ``output_checkpoint``: the file this run wrote (training runs), else None;
    ``metrics``: the numbers tables read; ``settings``: what the protocol ran with;
    ``environment``: see ``environment()``. ``extra`` keys are protocol-specific additions.
    """
    return {
        "protocol": protocol,
        "encoder_checkpoint": encoder_checkpoint,
        "which": which if encoder_checkpoint else "random_init",
        "output_checkpoint": output_checkpoint,
        "metrics": metrics,
        "settings": settings or {},
        "environment": environment(),
        **extra,
    }


def write_results(folder: Union[str, os.PathLike], protocol: str, metrics: dict, **fields: Any):
    """Write ``folder/results.json`` (``results_record(...)`` of the arguments) atomically.

    ``inputs`` records what made it (``run_folder.run_inputs``: the digest of the run's saved
    ``folder/config.yaml``, the encoder checkpoint's stamp, the data folders' stamps), so the
    demo and the tables reuse it only while those still match."""
    inputs = run_inputs(saved_config(folder), fields.get("encoder_checkpoint"))
    record = results_record(protocol, metrics, **fields, inputs=inputs)
    return write_json(record, Path(folder) / RESULTS_NAME)
