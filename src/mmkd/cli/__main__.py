"""`python -m mmkd.cli ...` (e.g. under torchrun): the same command line as `mmkd`."""

from mmkd.cli import app

app()
