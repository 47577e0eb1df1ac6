"""DATA as users type it: a bare path (``mnist/test``, ``rows.csv``) read by the source
that fits what the path holds.

The rule: a spec whose NAME (the text before the first ``:``) is a registered data source is
that source (``csv:rows.csv``); otherwise a path that exists is read by what it holds, and
the log says which source was chosen (``data mnist/test: a folder of class subfolders, read
as imagefolder:mnist/test``). Options follow the path after a comma
(``mnist/test,image_size=32``). A Windows path (``C:\\data``) is a path: no source is named
``C``.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from kdplug.errors import UsageError
from kdplug.spec import Spec, parse_spec, quote

log = logging.getLogger("kdplug")

SPLIT_NAMES = ("train", "test", "validation", "valid", "val", "dev", "eval")
_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")
_SCAN = 64  # entries looked at per folder: enough to tell, cheap on a folder of 1M images
_SAID: set[str] = set()


def data_spec(text: str | Spec) -> Spec:
    """The spec of DATA as written: as parsed when it names a registered source or is no
    path, else ``SOURCE:PATH[,options]`` for the existing path it names (said once)."""
    if isinstance(text, Spec):
        return text
    if not isinstance(text, str) or _named_source(text):
        return parse_spec(text)
    found = _existing_path(text)
    if found is None:
        return _not_found(text)
    path, options = found
    source, holds = path_source(Path(path).expanduser())
    if source is None:
        raise UsageError(
            f"data {_shown(text)}: {holds}; name its source: NAME:PATH with NAME one of "
            f"{', '.join(_sources())}"
        )
    spec = f"{source}:{quote(path)}{options}"
    if text not in _SAID:
        _SAID.add(text)
        log.info("data %s: %s, read as %s", _shown(text), holds, spec)
    return parse_spec(spec)


def path_source(path: Path) -> tuple[str | None, str]:
    """``(source, what the path holds)`` for a local file or folder; source None (and why)
    where no first-party source reads it."""
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".csv", ".parquet"):
            return suffix[1:], f"a {suffix[1:].upper() if suffix == '.csv' else 'Parquet'} file"
        return None, f"{path.name} is not a .csv or .parquet file"
    if not path.is_dir():
        return None, "not a file or folder"
    if (path / "dataset_dict.json").is_file():
        return "disk", "a saved DatasetDict (save_to_disk)"
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        return "disk", "a saved Dataset (save_to_disk)"
    files, folders = _entries(path)
    for suffix in (".parquet", ".csv"):
        if any(name.lower().endswith(suffix) for name in files):
            return suffix[1:], f"a folder of {suffix} files"
    if any(_is_image(name) for name in files):
        return "imagefolder", "a flat folder of images"
    with_images = [f for f in folders if any(_is_image(n) for n in _entries(path / f)[0])]
    if with_images:
        return "imagefolder", "a folder of class subfolders"
    for folder in folders:
        if any(_holds_images(path / folder / sub) for sub in _entries(path / folder)[1]):
            kind = "split" if folder.lower() in SPLIT_NAMES else "sub"
            return "imagefolder", f"a folder of {kind} folders of class subfolders"
    return None, "a folder with no images, saved dataset, .csv or .parquet files"


def _holds_images(folder: Path) -> bool:
    return any(_is_image(name) for name in _entries(folder)[0])


def _entries(folder: Path) -> tuple[list[str], list[str]]:
    """The names of the first files and folders of ``folder`` (hidden ones skipped)."""
    files, folders = [], []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                (folders if entry.is_dir() else files).append(entry.name)
                if len(files) + len(folders) >= _SCAN:
                    break
    except OSError:
        pass
    return sorted(files), sorted(folders)


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in _image_suffixes()


def _image_suffixes() -> set[str]:
    from PIL import Image

    Image.init()
    return {suffix.lower() for suffix in Image.registered_extensions()}


def _named_source(text: str) -> bool:
    """Whether ``text`` starts with a registered source's name followed by ``:``/``,``/end."""
    name = re.split(r"[:,]", text.strip(), maxsplit=1)[0]
    return name in _sources() and not _DRIVE.match(text.strip())


def _existing_path(text: str) -> tuple[str, str] | None:
    """``(path, ",options")`` for the existing path ``text`` is, or begins with before a
    comma; None where there is none."""
    text = text.strip()
    if os.path.exists(os.path.expanduser(text)):
        return text, ""
    head, comma, rest = text.partition(",")
    if comma and os.path.exists(os.path.expanduser(head)):
        return head, f",{rest}"
    return None


def _not_found(text: str) -> Spec:
    """A spec that is no existing path: parsed (an unknown NAME gets the registry's
    did-you-mean), or, where it can only be a path, "no such file or directory"."""
    stripped = text.strip()
    looks_like_path = _DRIVE.match(stripped) or re.match(r"^[~./\\]", stripped)
    if not looks_like_path:
        try:
            return parse_spec(text)
        except UsageError:
            pass
    raise UsageError(
        f"data {_shown(text)}: no such file or directory (a DATA spec is a path, or "
        f"NAME:REF with NAME one of {', '.join(_sources())})"
    )


def _sources() -> list[str]:
    from kdplug.plugins import get_manager

    return get_manager().registries["datasets"].names()


def _shown(text: str) -> str:
    return text if text.isprintable() else repr(text)
