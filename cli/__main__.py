"""``python -m tamp_fx.cli`` (and ``torchrun ... -m tamp_fx.cli plan ...``) runs the command line."""

from tamp_fx.cli import main

main()
