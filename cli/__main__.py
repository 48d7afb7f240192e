"""``python -m tamp_fx.cli`` (and ``torchrun ... -m tamp_fx.cli plan ...``) runs the command line."""
import sys

from tamp_fx.cli import run

sys.exit(run())
