"""The ``vfdetect`` command line: one click group, each subcommand a thin wrapper.

Subcommands live in ``vfdetect/commands/<module>.py`` and are imported only when invoked, so
``vfdetect --help`` and the commands that do not need TensorFlow start fast. Library code raises
:class:`vfdetect.errors.VfdetectError`; this module turns it into a one-line message on stderr
and exit status 1.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

from vfdetect import __version__
from vfdetect.errors import VfdetectError

# name -> (module under vfdetect.commands, one-line help shown by `vfdetect --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "phantoms": ("phantoms", "Generate the synthetic spine CT dataset (scans, centroids, grades, manifest)."),
    "synth-labels": ("synth_labels", "Build label images (ellipsoids) from centroids and Genant grades."),
    "simulate-fractures": ("simulate_fractures", "Plant Genant-graded compression fractures into real CT scans with vertebra masks."),
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

    def invoke(self, ctx: click.Context):  # type: ignore[no-untyped-def]
        try:
            return super().invoke(ctx)
        except VfdetectError as error:
            click.echo(f"vfdetect: error: {error}", err=True)
            ctx.exit(1)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vfdetect")
def cli() -> None:
    """Find osteoporotic vertebral compression fractures in CT scans."""


def main() -> None:
    """Console-script entry point."""
    # TensorFlow's C++ start-up chatter (CUDA probes, oneDNN notices) is noise on a command line;
    # a user who wants it sets TF_CPP_MIN_LOG_LEVEL themselves.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cli()


if __name__ == "__main__":
    main()
