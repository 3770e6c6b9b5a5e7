from distill_runner.search.cli import main

main()
