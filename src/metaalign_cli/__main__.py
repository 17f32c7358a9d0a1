from metaalign_cli.cli import main

# Guarded: engines that start worker processes with "spawn" (vLLM) import this module again.
if __name__ == "__main__":
    main()
