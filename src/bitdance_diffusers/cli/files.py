"""Files the `bitdance` command and the dataset script write: one path per image, checked before any generation
starts, and every file written atomically (a temporary file beside it, renamed when complete)."""

import io
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from .arguments import UsageError


# Hidden temporary files are named ``.{name}.{pid}.partial``; a process killed while writing leaves one behind, which
# `remove_stale_partials` deletes once that process is gone.
PARTIAL_SUFFIX = ".partial"
COMMON_IMAGE_EXTENSIONS = ".png, .jpg, .webp, .bmp, .tiff"


def plan_outputs(output: Path, count: int, overwrite: bool) -> tuple[list[Path], str]:
    """The paths of ``count`` images named by ``--output`` (see `image_paths`) and their Pillow format, after every
    check that they can be written (`image_format`, `check_output_paths`)."""
    if output.is_dir():
        raise UsageError(f"--output {output} is a folder; name an image file inside it, e.g. {output / 'image.png'}.")
    format_name = image_format(output)
    paths = image_paths(output, count)
    check_output_paths(paths, overwrite)
    return paths, format_name


def image_format(path: Path) -> str:
    """The Pillow format that ``path``'s extension names, after checking that Pillow can write an RGB image in it.

    Raises:
        UsageError: no extension, an extension Pillow does not know, or a format it cannot write RGB images in.
    """
    from PIL import Image

    Image.init()
    extension = path.suffix.lower()
    if not extension:
        raise UsageError(f"--output {path} has no file extension; add the image type, e.g. {path}.png.")
    format_name = Image.registered_extensions().get(extension)
    if format_name is None:
        raise UsageError(
            f"--output {path}: Pillow knows no image type {extension!r}; use one it writes, e.g. "
            f"{COMMON_IMAGE_EXTENSIONS}."
        )
    try:  # some known types have no writer here, or none for RGB images (e.g. .xbm is black and white)
        Image.new("RGB", (8, 8)).save(io.BytesIO(), format=format_name)
    except (OSError, ValueError, KeyError) as error:
        raise UsageError(
            f"--output {path}: Pillow cannot write RGB images as {extension} ({error}); use e.g. "
            f"{COMMON_IMAGE_EXTENSIONS}."
        ) from None
    return format_name


def image_paths(output: Path, count: int) -> list[Path]:
    """``output`` for one image; for several, ``output`` with ``_0``, ``_1``, ... before the extension, zero-padded
    to the same width (``fox.jpg`` -> ``fox_00.jpg`` ... ``fox_11.jpg``). Only the file name changes, never a folder."""
    if count == 1:
        return [output]
    width = len(str(count - 1))
    return [output.with_name(f"{output.stem}_{index:0{width}d}{output.suffix}") for index in range(count)]


def check_output_paths(paths: list[Path], overwrite: bool) -> None:
    """Refuse, before any work, every path that the images could not be written to.

    The folder must exist and take a new file (tested by creating and removing one); a path must not be a folder; an
    existing file is replaced only with ``overwrite``.
    """
    folders = set()
    for path in paths:
        label = f"--output {path}" if len(paths) == 1 else f"{path} (one of the {len(paths)} images of --output)"
        if path.is_dir():
            raise UsageError(f"{label} is a folder; name an image file inside it, e.g. {path / 'image.png'}.")
        if os.path.lexists(path):
            if not overwrite:
                raise UsageError(f"{label} already exists; pass --overwrite to replace it, or choose another --output.")
            if not path.is_file():
                raise UsageError(f"{label} exists and is not a regular file; choose another --output.")
        folders.add(path.parent)
    for folder in folders:
        if not folder.exists():
            raise UsageError(f"The folder {folder} of --output does not exist; create it first (mkdir -p {folder}).")
        if not folder.is_dir():
            raise UsageError(f"{folder} in --output is a file, not a folder; choose another --output.")
        try:
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".bitdance-write-test-"):
                pass
        except OSError as error:
            raise UsageError(f"Cannot write into {folder} ({error.strerror}); choose another --output.") from None


def atomic_write(path: Path, write: Callable[[BinaryIO], None], overwrite: bool = True) -> None:
    """Write ``path`` through ``write(file)``: into a hidden temporary file in the same folder, flushed to disk, then
    renamed onto ``path``. Readers, and a later run after a kill, see the previous file or the complete new one.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false (the existing file is left as it was).
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}{PARTIAL_SUFFIX}")
    try:
        with open(temporary, "wb") as file:  # created with the user's umask, as any file they write
            write(file)
            file.flush()
            os.fsync(file.fileno())
        if not overwrite and os.path.lexists(path):
            raise FileExistsError(f"{path} already exists")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    _sync_folder(path.parent)


def save_image(image, path: Path, format_name: str, overwrite: bool = True) -> None:
    """`atomic_write` of a PIL ``image`` in the Pillow format ``format_name``."""
    atomic_write(path, lambda file: image.save(file, format=format_name), overwrite=overwrite)


def remove_stale_partials(folder: Path) -> list[Path]:
    """Delete the temporary files `atomic_write` left in ``folder`` when its process was killed; returns them.

    A temporary file whose process still runs (another command writing there now) is kept.
    """
    removed = []
    for candidate in Path(folder).glob(f".*{PARTIAL_SUFFIX}"):
        pid = candidate.name[: -len(PARTIAL_SUFFIX)].rpartition(".")[2]
        if pid.isdigit() and not _process_running(int(pid)):
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def _process_running(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process writes each file in one call: a leftover of its own is from a reused pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _sync_folder(folder: Path) -> None:
    """Flush ``folder``'s entries to disk so that a rename survives a power loss (POSIX; a no-op elsewhere)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
