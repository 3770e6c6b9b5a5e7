"""python -m distill_runner: the same as distill-run (what torchrun starts).

Docs: docs/guide/configuration.md
"""

from distill_runner.cli import main

main()
