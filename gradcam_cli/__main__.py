"""`python -m gradcam_cli` runs the `gradcam` command."""

from .cli import main

main(prog_name="gradcam")
