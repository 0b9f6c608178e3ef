"""Settings of one running web app (command-line flags of ``python -m incontext.app``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from incontext.errors import InputError

# A phone photo is 12-50 MP; segmenting more than this on a shared CPU takes minutes, so the app refuses it with a
# message asking for a smaller copy (the Python API's own cap, 50 MP, stays for scripted use).
APP_MAX_PIXELS = 20_000_000
# Uploads above this size are refused by the web server before any decoding.
APP_MAX_FILE_SIZE = "25mb"
# The SAM that turns clicks into a mask: the released ViT-H when its file is found locally, else the SAM trained
# in this project (configs/backbone/sam_default.yaml).
APP_SAM = "sam_default"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_BANK = REPO_ROOT / "prompts_bank" / "synthetic-mini"


@dataclass
class AppConfig:
    """What ``build_app`` needs to know.

    Attributes:
        method: the method selected when the page opens (None = the generalist preset when installed, else
            ``prototype``).
        sam: backbone config name (``configs/backbone/<sam>.yaml``) used for click-to-mask.
        bank: prompt bank folder offered in the bank tab (None = the shipped demo bank when present).
        device: device every method and SAM is built on.
        max_pixels: images with more pixels are refused with a message.
        max_file_size: uploads above this (gradio size string, e.g. ``"25mb"``) are refused by the server.
        workdir: where results and concepts are written (None = a temporary folder removed at exit).
    """

    method: str | None = None
    sam: str = APP_SAM
    bank: str | None = None
    device: str = "cpu"
    max_pixels: int = APP_MAX_PIXELS
    max_file_size: str | int = APP_MAX_FILE_SIZE
    workdir: str | None = None

    def __post_init__(self) -> None:
        if int(self.max_pixels) < 1:
            raise InputError(f"max_pixels: {self.max_pixels}; pass a positive pixel count such as 20000000")
        self.max_pixels = int(self.max_pixels)

    def default_bank(self) -> str:
        """The bank folder shown when the page opens ('' when none is configured or shipped)."""
        if self.bank:
            return str(self.bank)
        return str(DEMO_BANK) if (DEMO_BANK / "BANK.json").is_file() else ""
