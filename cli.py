"""Entry point: `python cli.py generate "a prompt"` is the same as `mlx-sd generate "a prompt"`."""

from mlx_sd.cli import main

if __name__ == "__main__":
    main()
