"""Whether a backbone checkpoint can be opened here, answered in one line before any worker starts.

A checkpoint is ``logmel``, a BEATs or EAT checkpoint file (one ``torch.save`` archive; its contents are checked
when it loads), a local directory (``config.json`` and the weights, as ``save_pretrained`` writes them) or a hub id.
A hub id that is neither in the local hub cache nor downloadable (no network, or ``HF_HUB_OFFLINE=1``) used to
surface as the traceback of every embedding actor that tried to load it; here it is one ``BackboneError`` that
says what to pass instead. Imports neither torch nor transformers: the
driver of a Ray run calls it before Ray starts.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

from asd_ray.errors import BackboneError

# the command-line flag of each config key that names a checkpoint, for the "pass instead" hint
FLAGS = {"embed.backbone": "--backbone", "finetune.init": "--init"}


def is_local(checkpoint: str) -> bool:
    """Whether ``checkpoint`` names a directory rather than a hub id: it exists, starts like a path, or is not
    a valid hub id (``org/name`` at most; ``runs/ft/checkpoint`` can only be a path)."""
    if Path(checkpoint).exists() or checkpoint.startswith((".", "/", "~")):
        return True
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(checkpoint)
    except HFValidationError:
        return True
    return False


def check_available(checkpoint: str, setting: str = "embed.backbone") -> None:
    """Raise a one-line ``BackboneError`` unless ``checkpoint`` (the value of ``setting``) can be opened here:
    ``logmel``; a directory with ``config.json``; a hub id whose ``config.json`` is in the hub cache or can be
    downloaded (fetching it is what transformers does first anyway)."""
    if checkpoint == "logmel":
        return
    if Path(checkpoint).expanduser().is_file():  # a BEATs or EAT checkpoint is one torch.save file, a zip archive
        if not zipfile.is_zipfile(Path(checkpoint).expanduser()):
            raise BackboneError(f"{setting}={checkpoint}: a file, but not a torch checkpoint (a BEATs or EAT "
                                "checkpoint is the .pt file of the official release; other backbones are directories)")
        return
    if is_local(checkpoint):
        if Path(checkpoint).suffix in (".pt", ".pth") and not Path(checkpoint).expanduser().exists():
            raise BackboneError(f"{setting}={checkpoint}: checkpoint file not found")
        if not (Path(checkpoint).expanduser() / "config.json").is_file():
            raise BackboneError(f"{setting}={checkpoint}: checkpoint directory not found or has no config.json")
        return
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # its retry warnings would print before the one line
    try:
        hf_hub_download(checkpoint, "config.json")
    except LocalEntryNotFoundError:
        flag = FLAGS.get(setting, f"--set {setting}=")
        raise BackboneError(
            f"{setting}={checkpoint} is a hub id that cannot be downloaded here (no network, or HF_HUB_OFFLINE=1) "
            f"and is not in the local hub cache: pass a local checkpoint directory instead ({flag} DIR, a folder "
            f"with config.json and the weights, as save_pretrained writes them)") from None
    except (HfHubHTTPError, ValueError, OSError) as err:  # no such repository, gated, a bad revision ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BackboneError(f"{setting}={checkpoint}: cannot fetch it from the hub: {first}") from None
    finally:
        hub_log.setLevel(level)
