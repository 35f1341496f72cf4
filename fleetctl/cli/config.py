"""placeholder: owned by the config helper"""
import typer

app = typer.Typer(help="Validate, show and edit the configuration.")


def init() -> None:
    """Write a commented config and create the database."""
