"""``vfdetect models``: the trained models bundled with this installation."""

from __future__ import annotations

import click


@click.command()
def command() -> None:
    """List the bundled models: name, headline, model card, and which one `predict` uses by default."""
    from vfdetect.models import bundled_models, default_model

    models = bundled_models()
    if not models:
        click.echo("no bundled model in this installation; pass --model RUN_OR_FILE to `vfdetect predict`")
        return
    chosen = default_model().name
    for model in models:
        marker = " (default)" if model.name == chosen else ""
        click.echo(f"{model.name}{marker}: {model.headline or 'no headline'}")
        click.echo(f"    weights: {model.weights}")
        threshold = model.patient_threshold
        click.echo(f"    patient threshold: {0.5 if threshold is None else threshold:g}")
        click.echo(f"    card: {model.card if model.card is not None else 'none'}")
