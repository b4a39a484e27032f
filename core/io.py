"""Image discovery, reading and atomic writing shared by every command.

All pixel data inside the toolkit is uint8, gray (H, W) or BGR (H, W, 3); 16-bit inputs are scaled down here,
once, so synthetic defects are always made in the same range as the images they are mixed with.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable

import cv2
import numpy as np

IMAGE_EXTS = {".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff"}


class InputError(Exception):
    """Bad input from the user: the message names the file and the problem."""


def find_images(root: str | Path, warn=None) -> list[Path]:
    """All image files below `root`, recursively, sorted; other files are reported through `warn`.

    Raises InputError when `root` is missing, not a folder, or holds no image.
    """
    root = Path(root)
    if not root.exists():
        raise InputError(f"{root}: folder does not exist")
    if not root.is_dir():
        raise InputError(f"{root}: not a folder")
    found = []
    for path in sorted(root.rglob("*")):
        if path.name.startswith("."):
            continue
        if path.is_symlink() and not path.exists():  # broken, or a loop (reading it would fail with ELOOP)
            if warn is not None:
                warn(f"{path}: a broken or looping symbolic link, skipped")
            continue
        if not path.is_file():
            continue
        if path.suffix.lower() in IMAGE_EXTS:
            found.append(path)
        elif warn is not None:
            warn(f"{path}: not an image file, skipped")
    if not found:
        raise InputError(f"{root}: no image files ({', '.join(sorted(IMAGE_EXTS))}) found")
    return found


def stem_of(path: Path, root: Path) -> str:
    """An image's name below `root` as one file stem (sub-folders joined by "__"): what prediction names its
    outputs, and what evaluation pairs them by."""
    return Path(path).relative_to(root).with_suffix("").as_posix().replace("/", "__")


def to_uint8(img: np.ndarray, path: str | Path = "") -> np.ndarray:
    """Scale 16-bit to 8-bit (divide by 257); pass uint8 through; anything else is an InputError."""
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        return np.round(img.astype(np.float32) / 257.0).astype(np.uint8)
    raise InputError(f"{path}: unsupported pixel type {img.dtype} (8- or 16-bit images only)")


def convert_channels(img: np.ndarray, channels: int, path: str | Path = "") -> np.ndarray:
    """Return gray (H, W) for channels=1, BGR (H, W, 3) for channels=3."""
    if img.ndim == 3 and img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if channels == 1:
        return img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    if channels == 3:
        return img if img.ndim == 3 else cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    raise InputError(f"{path}: channels must be 1 or 3, got {channels}")


def read_image(path: str | Path, channels: int = 1) -> np.ndarray:
    """Read an image as uint8 gray or BGR; raise InputError naming the file if it cannot be decoded."""
    path = Path(path)
    try:
        data = np.fromfile(str(path), dtype=np.uint8) if path.is_file() else None
    except OSError as e:  # no read permission, a device error, ...
        raise InputError(f"{path}: cannot be read ({e.strerror or e})") from None
    if data is None:
        raise InputError(f"{path}: file does not exist")
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if img is None:
        raise InputError(f"{path}: cannot be decoded as an image (empty or corrupt file?)")
    return convert_channels(to_uint8(img, path), channels, path)


def read_mask(path: str | Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read a mask PNG as uint8 {0, 1}; any non-zero pixel is foreground."""
    m = read_image(path, channels=1)
    if shape is not None and m.shape != tuple(shape):
        raise InputError(f"{path}: mask is {m.shape[1]}x{m.shape[0]}, image is {shape[1]}x{shape[0]}")
    return (m > 0).astype(np.uint8)


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc/self/status); elsewhere read by
    setting it and putting it straight back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def user_mode(path: str | Path) -> None:
    """Give a file made by `tempfile` (0600) the user's usual mode (0666 under their umask), so outputs are as
    readable by colleagues as the user's other files."""
    os.chmod(path, 0o666 & ~_umask())


TMP_SUFFIX = ".tmp"


def sweep_temps(folder: str | Path) -> int:
    """Remove the hidden temporary files (`.NAME.XXXX.tmp`) a killed writer left in `folder`; returns how many."""
    n = 0
    for p in Path(folder).glob(f".*{TMP_SUFFIX}") if Path(folder).is_dir() else ():
        p.unlink(missing_ok=True)
        n += 1
    return n


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file. The file gets
    the user's umask, like any other file they write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        user_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def encode_png(img: np.ndarray, compression: int = 1) -> bytes:
    ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, compression])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def write_png(path: str | Path, img: np.ndarray, compression: int = 1) -> None:
    atomic_write_bytes(path, encode_png(img, compression))


def _plain(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=_plain) + "\n").encode())


def read_jsonl(path: str | Path, repair: bool = False) -> list[dict]:
    """Read a JSON-lines file. Only a torn last line (no newline after it, or not parseable), which an interrupted
    writer leaves, is dropped, and cut from the file only with `repair=True` (the resume path of `synth generate`);
    a bad line anywhere else is an error naming the file and the line, and nothing is changed."""
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    rows, good_end, pos = [], 0, 0
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        end = pos + len(line) + 1
        if line.strip():
            torn = end > len(raw)  # no trailing newline: the writer was interrupted
            try:
                row = None if torn else json.loads(line)
            except json.JSONDecodeError:
                row = None
            if row is None:
                if i != last:
                    raise InputError(f"{path}: line {i + 1} is not valid JSON (the file is damaged; later lines "
                                     "were left untouched)")
                break
            rows.append(row)
            good_end = end
        pos = end
    if repair and good_end < len(raw):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return rows


def append_jsonl(f, rows: Iterable[dict]) -> None:
    for row in rows:
        f.write(json.dumps(row, separators=(",", ":")) + "\n")
    f.flush()
    os.fsync(f.fileno())


def competition_dir(root: str | Path, part: int | None, kind: str) -> Path:
    """Resolve `OK_Images` / `TC_Images` for a part from a competition-layout root, or return `root` itself.

    Accepts `<root>/round_train/partN/OK_Images`, `<root>/partN/OK_Images` and `<root>` holding images directly.
    """
    root = Path(root)
    if part is None:
        return root / kind if (root / kind).is_dir() else root
    for cand in (root / f"round_train/part{part}/{kind}", root / f"round_test/part{part}/{kind}",
                 root / f"part{part}/{kind}", root / kind):
        if cand.is_dir():
            return cand
    raise InputError(f"{root}: no part{part}/{kind} folder (expected the competition layout, "
                     f"e.g. {root}/round_train/part{part}/OK_Images)")


def read_json_file(path: str | Path):
    """Read a JSON file; an unreadable one is an InputError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: cannot be read as JSON ({e})") from None


# ------------------------------------------------------------------------------------------ labelled folders
def mask_path_for(image: Path, image_dir: Path, mask_dir: Path | None) -> Path | None:
    if mask_dir is None:
        return None
    for ext in (".png", ".bmp", image.suffix):
        p = mask_dir / image.relative_to(image_dir).with_suffix(ext)
        if p.exists():
            return p
    return None


def find_mask_dir(image_dir: Path) -> Path | None:
    """Masks beside a competition `TC_Images` folder (`TC_Masks`), or a `masks` folder beside `images`."""
    for name in ("TC_Masks", "masks", "Masks"):
        cand = image_dir.parent / name
        if cand.is_dir():
            return cand
    return None


def labelled_defects(image_dir: str | Path) -> list[tuple[Path, Path]]:
    """(image, mask) of every crop of `image_dir` whose mask (same stem, in TC_Masks or masks beside: the lookup of
    `seg.data.LabelledFolder`) marks a defect, in sorted order."""
    image_dir = Path(image_dir)
    mask_dir = find_mask_dir(image_dir)
    if mask_dir is None:
        raise InputError(f"{image_dir}: no masks folder beside it (TC_Masks or masks)")
    out = []
    for p in find_images(image_dir):
        m = mask_path_for(p, image_dir, mask_dir)
        if m is not None and read_mask(m).any():
            out.append((p, m))
    return out


def half_of(pairs: list, half: str, seed: int = 0) -> list:
    """A fixed half of the labelled defects: `fit` (the first half of a seeded permutation of the sorted names,
    rounded up), `score` (the rest) or `all`; weights are fitted on one half and judged on the other."""
    if half == "all":
        return list(pairs)
    if half not in ("fit", "score"):
        raise InputError(f"half: expected all, fit or score, got {half!r}")
    order = np.random.default_rng(seed).permutation(len(pairs))
    k = (len(pairs) + 1) // 2
    chosen = set(order[:k] if half == "fit" else order[k:])
    return [p for i, p in enumerate(pairs) if i in chosen]
