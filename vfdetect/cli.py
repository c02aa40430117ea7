"""The ``vfdetect`` command line: one click group, each subcommand a thin wrapper.

Subcommands live in ``vfdetect/commands/<module>.py`` and are imported only when invoked, so
``vfdetect --help`` and the commands that do not need TensorFlow start fast. Library code raises
:class:`vfdetect.errors.VfdetectError`; this module turns it into a one-line message on stderr.

Every error is one line in one style, ``vfdetect: error: <file>: <problem>`` (or
``vfdetect: error: <problem>`` when no file is at fault), and no traceback:

- exit status 2: a usage error found while parsing the command line (an unknown option, a value
  out of an option's range, a missing argument), as is conventional; ``--help`` shows the usage;
- exit status 1: everything else: bad input files, an output folder that cannot be written, a
  full disk (:class:`OSError`), a scan too large for memory (:class:`MemoryError`), failed cases;
- exit status 130: interrupted (Ctrl-C).

TensorFlow's start-up chatter (oneDNN notices, CUDA probing errors, absl warnings) is hidden unless
``vfdetect --verbose``. ``--device`` (or ``$VFDETECT_DEVICE``) chooses where the network runs:
``auto`` uses a GPU when the machine has an NVIDIA driver and otherwise hides CUDA so that it is
not probed; ``cpu`` never uses a GPU; ``gpu`` leaves every device visible. A
``CUDA_VISIBLE_DEVICES`` set by the user is always kept.
"""

from __future__ import annotations

import errno
import importlib
import os
import sys

import click

from vfdetect import __version__
from vfdetect.errors import VfdetectError
from vfdetect.startup import finish_tensorflow_import, import_tensorflow_quietly

# name -> (module under vfdetect.commands, one-line help shown by `vfdetect --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "phantoms": ("phantoms", "Generate the synthetic spine CT dataset (scans, centroids, grades, manifest)."),
    "synth-labels": ("synth_labels", "Build label images (ellipsoids) from centroids and Genant grades."),
    "simulate-fractures": ("simulate_fractures", "Plant Genant-graded compression fractures into real CT scans with vertebra masks."),
    "preprocess": ("preprocess", "Cache the prepared scans and labels of a manifest for faster training."),
    "train": ("train", "Train the dual-pathway network on a manifest and its label images."),
    "predict": ("predict", "Predict fracture probability maps and vertebra/patient scores."),
    "models": ("models", "List the trained models bundled with this installation."),
    "evaluate": ("evaluate", "ROC, convex-hull and bootstrapped AUC from saved predictions."),
    "cv": ("cv", "Stratified k-fold cross-validation end to end."),
    "figures": ("figures", "Reproduce the paper's figures from saved outputs."),
}


class LazyGroup(click.Group):
    """A click group that imports a subcommand's module only when that subcommand runs."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module_name, short_help = COMMANDS[cmd_name]
        if ctx.resilient_parsing or "--help" in sys.argv[1:2]:
            # Listing: avoid importing every module just to print one line each.
            return click.Command(cmd_name, short_help=short_help, help=short_help)
        module = importlib.import_module(f"vfdetect.commands.{module_name}")
        command: click.Command = module.command
        command.name = cmd_name
        return command

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # type: ignore[no-untyped-def,override]
        """Run the command line; in standalone mode every error becomes one line (see the module docstring)."""
        words = sys.argv[1:] if args is None else list(args)
        self.asks_help = any(word in ("-h", "--help") for word in words)
        if not standalone_mode:
            try:
                return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            finally:
                finish_tensorflow_import(raise_error=False)
        try:
            try:
                result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            finally:
                finish_tensorflow_import(raise_error=False)
        except click.exceptions.Exit as done:  # pragma: no cover - click returns it in non-standalone mode
            sys.exit(done.exit_code)
        except click.exceptions.Abort:
            click.echo("vfdetect: error: interrupted", err=True)
            sys.exit(130)
        except click.UsageError as error:
            sys.exit(_usage_error(error))
        except click.ClickException as error:
            click.echo(f"vfdetect: error: {error.format_message()}", err=True)
            sys.exit(error.exit_code)
        except VfdetectError as error:
            click.echo(f"vfdetect: error: {error}", err=True)
            sys.exit(1)
        except OSError as error:
            click.echo(f"vfdetect: error: {describe_os_error(error)}", err=True)
            sys.exit(1)
        except MemoryError:
            click.echo("vfdetect: error: out of memory (a scan too large for this machine? try a smaller "
                       "--memory-gib or fewer --workers)", err=True)
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)


def _usage_error(error: click.UsageError) -> int:
    """Print a usage error as one line (plus where to find the usage); its exit status (2)."""
    command = error.ctx.command_path if error.ctx is not None else "vfdetect"
    message = " ".join(error.format_message().split())
    click.echo(f"vfdetect: error: {message} (see `{command} --help`)", err=True)
    return error.exit_code


def describe_os_error(error: OSError) -> str:
    """``<file>: <problem>`` for an operating-system error (permission denied, disk full, ...)."""
    problem = error.strerror or str(error) or type(error).__name__
    if getattr(error, "errno", None) == errno.ENOSPC:
        problem = f"{problem}; free some space and run again (files being written were not completed)"
    filename = error.filename if error.filename is not None else None
    return f"{filename}: {problem}" if filename is not None else problem


DEVICES: tuple[str, ...] = ("auto", "cpu", "gpu")


def nvidia_driver_present() -> bool:
    """Whether this machine has an NVIDIA driver loaded (without starting CUDA)."""
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidia0")


def runtime_environment(
    verbose: bool, device: str, environ: dict[str, str] | None = None, gpu_present: bool | None = None
) -> dict[str, str]:
    """Environment variables to set before TensorFlow is imported (only those not set already).

    Quiet (not ``verbose``): ``TF_CPP_MIN_LOG_LEVEL=3`` (C++ logs, oneDNN notices) and
    ``GRPC_VERBOSITY=ERROR``. ``device="cpu"``, or ``"auto"`` on a machine without an NVIDIA
    driver: ``CUDA_VISIBLE_DEVICES=""``, so that CUDA is not probed (and does not complain).
    """
    environ = dict(os.environ) if environ is None else environ
    if device not in DEVICES:
        raise VfdetectError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    settings: dict[str, str] = {}
    if not verbose:
        settings["TF_CPP_MIN_LOG_LEVEL"] = "3"
        settings["GRPC_VERBOSITY"] = "ERROR"
    if device == "cpu" or (device == "auto" and not (nvidia_driver_present() if gpu_present is None else gpu_present)):
        settings["CUDA_VISIBLE_DEVICES"] = ""
    return {key: value for key, value in settings.items() if key not in environ}


TENSORFLOW_COMMANDS: frozenset[str] = frozenset({"train", "predict", "cv"})
"""Subcommands that run the network: TensorFlow is imported (quietly) before they start; for
``predict`` in a thread beside the checking of its scans (:mod:`vfdetect.startup`)."""


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vfdetect")
@click.option("--verbose", is_flag=True, help="Show TensorFlow's start-up messages and warnings.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", envvar="VFDETECT_DEVICE", show_default=True,
              help="Where the network runs: auto (a GPU when an NVIDIA driver is present, else the CPU without "
              "probing CUDA), cpu, or gpu. Environment: VFDETECT_DEVICE.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool, device: str) -> None:
    """Find osteoporotic vertebral compression fractures in CT scans."""
    os.environ.update(runtime_environment(verbose, device))
    asks_help = bool(getattr(ctx.command, "asks_help", False))  # nothing to compute: no TensorFlow
    if not verbose and ctx.invoked_subcommand in TENSORFLOW_COMMANDS and not asks_help:
        import_tensorflow_quietly(background=ctx.invoked_subcommand == "predict")


def main() -> None:
    """Console-script entry point."""
    cli()


if __name__ == "__main__":
    main()
