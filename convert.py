"""Entry point: `python convert.py SOURCE OUTPUT_DIR` is the same as `mlx-sd convert SOURCE OUTPUT_DIR`."""

from mlx_sd.convert import convert_command

if __name__ == "__main__":
    convert_command(prog_name="convert.py")
