"""Entry point: `python convert.py SOURCE OUTPUT_DIR` is the same as `mlx-sd convert SOURCE OUTPUT_DIR`."""

from mlx_sd.cli import install_signal_handlers
from mlx_sd.convert import convert_command

if __name__ == "__main__":
    install_signal_handlers()
    convert_command(prog_name="convert.py")
