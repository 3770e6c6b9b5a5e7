"""python -m distill_runner.search: the same as distill-search.

Docs: docs/guide/search.md
"""

from distill_runner.search.cli import main

main()
