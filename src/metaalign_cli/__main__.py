from metaalign_cli.cli import main

main()
