"""Training images: `llamafarm images build cpu|cuda`, `llamafarm images list`."""

from __future__ import annotations

import click

from orchestrator.cli.base import cli, emit_json


@cli.group()
def images():
    """The CPU and CUDA training images that the container runner starts.

    \b
    Example:
      llamafarm images build cpu
    """


@images.command("build")
@click.argument("kind")
@click.option("--base-image", default=None,
              help="Base image (build argument BASE_IMAGE); default: the Dockerfile's pinned python:3.11 slim image.")
def build(kind, base_image):
    """Build the KIND image (cpu or cuda) from its Dockerfile and lock, installing from a local wheelhouse.

    \b
    Example:
      llamafarm images build cpu --base-image localhost/llamafarm-base:bookworm
    """
    from orchestrator import images as img

    tag = img.build(kind, base_image, echo=click.echo)
    click.echo(f"built {tag}")


@images.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_cmd(as_json):
    """Which training images the container engine holds, with the commit each was built from.

    \b
    Example:
      llamafarm images list
    """
    from orchestrator import images as img
    from orchestrator.runners import engine

    client, where = engine.connect()
    rows = []
    for spec in img.IMAGES.values():
        found = engine.find_image(client, spec.tag)
        labels = (found.labels or {}) if found else {}
        rows.append({"kind": spec.kind, "tag": spec.tag, "present": found is not None,
                     "commit": labels.get("org.opencontainers.image.revision")})
    if as_json:
        emit_json({"engine": where, "images": rows})
        return
    click.echo(f"engine: {where}")
    for row in rows:
        state = f"built from {row['commit']}" if row["present"] else f"missing (`llamafarm images build {row['kind']}`)"
        click.echo(f"{row['tag']:<28} {state}")
