"""A web app for one-shot personalisation: mark an object once, find it in other photos, download the masks and
the concept.

    python -m incontext.app [--port 7860] [--host 127.0.0.1] [--method prototype] [--sam sam_default]

Modules: :mod:`~incontext.app.config` (settings), :mod:`~incontext.app.logic` (the work, no gradio),
:mod:`~incontext.app.handlers` (events to logic, errors to readable lines), :mod:`~incontext.app.ui` (layout).
Needs the ``app`` extra (``pip install -e '.[app]'``: gradio).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from incontext.app.config import AppConfig

__all__ = ["AppConfig", "create_app", "launch"]

# No usage reports leave the machine (gradio sends them unless told otherwise).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def _import_gradio() -> Any:
    try:
        import gradio
    except ImportError as err:
        from incontext.errors import InputError

        raise InputError(
            "app: gradio is not installed; install the app extra with `pip install -e '.[app]'` "
            "(or `pip install gradio`)"
        ) from err
    return gradio


def create_app(config: AppConfig | None = None) -> tuple[Any, dict]:
    """Build the page.

    Returns:
        (``gr.Blocks``, keyword arguments for its ``launch``: upload size cap, allowed output folder, CSS).
    """
    _import_gradio()
    from incontext.app import logic
    from incontext.app.handlers import Handlers
    from incontext.app.ui import CSS, build_blocks
    from incontext.registry import available

    config = config or AppConfig()
    methods = available()
    if config.method is not None and config.method not in methods:
        from incontext.errors import InputError

        raise InputError(f"--method {config.method!r}: unknown; available: {', '.join(methods)}")
    default = config.method or logic.default_method(methods)
    if config.workdir:
        root = Path(config.workdir).expanduser().resolve()
        root.mkdir(parents=True, exist_ok=True)
    else:
        root = Path(tempfile.mkdtemp(prefix="incontext-app-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
    handlers = Handlers(config, root, methods)
    demo = build_blocks(handlers, default)
    demo.queue(default_concurrency_limit=1)
    launch_kwargs = {
        "max_file_size": config.max_file_size,
        "allowed_paths": [str(root)],
        "css": CSS,
        "show_error": False,
    }
    return demo, launch_kwargs


def launch(config: AppConfig | None = None, host: str = "127.0.0.1", port: int | None = 7860,
           block: bool = True) -> Any:
    """Build and serve the page on ``host:port`` (127.0.0.1 = this machine only)."""
    demo, kwargs = create_app(config)
    demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block, **kwargs)
    return demo
