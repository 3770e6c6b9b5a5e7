from distill_runner.cli import main

main()
