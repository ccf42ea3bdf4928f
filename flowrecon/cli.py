"""The ``flowrecon`` command line: a thin layer over the library."""

import click


@click.group()
@click.version_option(package_name="flowrecon")
def main() -> None:
    """Conditional generative models for Coulomb explosion imaging."""
