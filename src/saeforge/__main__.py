from saeforge.cli import main

main()
