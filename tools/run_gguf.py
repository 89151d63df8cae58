"""Run a GGUF model: the same as the kvcells-run console script."""
from kvcells.cli import main

if __name__ == "__main__":
    main()
