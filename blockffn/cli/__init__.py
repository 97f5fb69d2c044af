"""The `blockffn` command line.  Every command defaults to the bundled tiny model (`blockffn.default_model_path()`).

Commands only parse flags, call into the library and print; errors the user can fix (`BlockFFNError`) become one
line on stderr and exit code 1.

The commands live in modules by what they work on (`model_commands`, `run_commands`, `artifact_commands`); this
package wires them into the `blockffn` group and the two console scripts.
"""

from __future__ import annotations

import errno
import os
import sys
import time

import click

from blockffn.cli import artifact_commands, model_commands, onnx_commands, run_commands  # noqa: F401 - registers
from blockffn.cli.artifact_commands import compile_entry
from blockffn.cli.base import _echo_err, cli, configure_logging
from blockffn.errors import BlockFFNError
from blockffn.validation import OptionError

__all__ = ["cli", "compile_main", "main"]

# optional packages -> the extra that installs them
EXTRAS = {"torch": "compile", "safetensors": "compile", "onnx": "onnx", "onnxruntime": "onnx", "onnxscript": "onnx"}
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def _run(command: click.Command, argv, prog_name: str) -> None:
    """Run a Click command; user errors become one line on stderr and a non-zero exit."""
    start = time.time()
    configure_logging()
    try:
        command.main(args=argv, prog_name=prog_name, standalone_mode=False)
    except click.exceptions.Abort:
        _echo_err("aborted")
        sys.exit(1)
    except click.exceptions.NoArgsIsHelpError as e:  # `blockffn` alone: the help text
        e.show()
        sys.exit(e.exit_code)
    except click.UsageError as e:  # one line, not Click's usage block (the hint to --help is in every command)
        _echo_err(e.format_message().rstrip("."))
        sys.exit(2)
    except click.ClickException as e:
        _echo_err(e.format_message())
        sys.exit(e.exit_code)
    except OptionError as e:
        _echo_err(str(e))
        sys.exit(2)
    except BlockFFNError as e:
        _echo_err(str(e))
        sys.exit(1)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in EXTRAS:
            raise
        # the runtime installs without PyTorch (deploy machines); model, compile and train commands need it
        name = e.name.split(".")[0]
        _echo_err(f"this command needs {name}, which is not installed: pip install 'blockffn[{EXTRAS[name]}]'")
        sys.exit(2)
    except OSError as e:
        if e.errno not in DISK_ERRORS:
            raise
        # a full, read-only or forbidden disk is the user's to fix: one line naming the path
        _echo_err(f"{e.filename or 'output'}: {e.strerror or os.strerror(e.errno)}")
        sys.exit(1)
    except KeyboardInterrupt:
        _echo_err(f"interrupted after {time.time() - start:.0f}s")
        sys.exit(130)


def main(argv=None) -> None:
    _run(cli, argv, "blockffn")


def compile_main(argv=None) -> None:
    _run(compile_entry, argv, "blockffn-compile")

