"""How a trainer process reports: progress bars while it runs, and the one line (and
exit status) it ends with on a user error, a full disk, a finished run or Ctrl-C."""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable, Iterable
from typing import Any

from trainers.run_dirs import RunFinished, RunRefused, release_all


class TrainingDiverged(RuntimeError):
    """Raised when a loss became NaN or infinite; the message says where."""


#: Where the process is, for the line a Ctrl-C prints (see :func:`main_guard`):
#: "epoch" is the epoch being trained, "evaluating" is set once model/ is saved.
STAGE = {"epoch": None, "evaluating": False}


def interrupted_message() -> str:
    """The one line a Ctrl-C prints: where it stopped and that re-typing resumes."""
    if STAGE["evaluating"]:
        return "interrupted during evaluation; the same command resumes at evaluation"
    if STAGE["epoch"] is None:
        return "interrupted before training; the same command starts it again"
    return f"interrupted at epoch {STAGE['epoch']}; the same command resumes"


def progress(iterable: Iterable, quiet: bool, **kwargs: Any) -> Iterable:
    """A tqdm progress bar on stderr unless ``quiet``."""
    if quiet:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, file=sys.stderr, **kwargs)


def main_guard(main: Callable[[], Any]) -> Any:
    """Run a trainer's main, turning expected user errors into one clear line and exit 2."""
    from keras_vae_attn.data import DataError
    from keras_vae_attn.extras import MissingExtra
    from keras_vae_attn.runs import DiskFull, ModelLoadError

    try:
        return main()
    except KeyboardInterrupt:
        print(interrupted_message(), file=sys.stderr)
        raise SystemExit(130) from None
    except DiskFull as error:
        print(
            f"error: {error}; free space and run the same command to resume", file=sys.stderr
        )
        raise SystemExit(2) from None
    except RunFinished as finished:
        print(finished, file=sys.stderr)
        raise SystemExit(0) from None
    except RunRefused as refused:
        print(f"error: {refused}", file=sys.stderr)
        raise SystemExit(2) from None
    except ModelLoadError as error:
        print(f"error: {error} [see --model-dir]", file=sys.stderr)
        raise SystemExit(2) from None
    except (DataError, MissingExtra, TrainingDiverged, FileNotFoundError) as error:
        option = getattr(error, "option", None)
        hint = f" [see --{option.replace('_', '-')}]" if option else ""
        print(f"error: {error}{hint}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise
        name = f" {error.filename}" if error.filename else ""
        print(
            f"error: cannot write{name}: {error.strerror}; the same command resumes "
            "once it can",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    finally:
        release_all()
