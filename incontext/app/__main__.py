"""``python -m incontext.app [--port N] [--host H] ...``: serve the one-shot personalisation web app."""

from __future__ import annotations

import argparse
import sys

from incontext.app.config import APP_MAX_FILE_SIZE, APP_MAX_PIXELS, APP_SAM, AppConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m incontext.app", description=__doc__)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--method", default=None,
                   help="method selected when the page opens (default: generalist if installed, else prototype)")
    p.add_argument("--sam", default=APP_SAM,
                   help="backbone config that turns clicks into masks (configs/backbone/<name>.yaml; "
                        f"default {APP_SAM})")
    p.add_argument("--bank", default=None, help="prompt bank folder offered in the bank panel")
    p.add_argument("--device", default="cpu", help="device for methods and SAM (default cpu)")
    p.add_argument("--max-pixels", type=int, default=APP_MAX_PIXELS,
                   help=f"refuse images with more pixels (default {APP_MAX_PIXELS:,})")
    p.add_argument("--max-file-size", default=APP_MAX_FILE_SIZE,
                   help=f"refuse uploads above this size (default {APP_MAX_FILE_SIZE})")
    p.add_argument("--workdir", default=None,
                   help="keep results and concepts here (default: a temporary folder removed at exit)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from incontext.errors import InputError

    args = parse_args(argv)
    try:
        from incontext.app import launch

        config = AppConfig(method=args.method, sam=args.sam, bank=args.bank, device=args.device,
                           max_pixels=args.max_pixels, max_file_size=args.max_file_size, workdir=args.workdir)
        launch(config, host=args.host, port=args.port)
    except InputError as err:
        print(f"incontext.app: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
