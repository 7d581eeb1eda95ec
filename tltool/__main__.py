"""`python -m tltool` (also what torchrun launches)."""

from tltool.cli import main

main()
