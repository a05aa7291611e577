"""Reading user images: every mode becomes 3-channel 8-bit RGB; broken files are found early."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["IMAGE_EXTENSIONS", "find_broken", "load_rgb", "to_rgb"]

IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif",
)  # fmt: skip


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    Transparency (RGBA, LA, palette with a transparent index) is composited onto
    ``background``, as a viewer shows it, rather than dropped (dropping exposes whatever
    colour the invisible pixels happen to hold). 16- and 32-bit greyscale is rescaled to
    8 bits from its full range instead of being clipped at 255. CMYK, YCbCr, LAB and 1-bit
    images go through PIL's own conversions.
    """
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        if image.mode == "F":
            top = max(float(array.max()), 1.0)
        array = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        image = Image.fromarray(array, mode="L")
    if image.mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image file as 8-bit RGB (fully decoded)."""
    with Image.open(path) as image:
        image.load()
        return to_rgb(image)


def _check(path: Path) -> str | None:
    """None when ``path`` decodes; else the reason it does not."""
    try:
        if path.stat().st_size == 0:
            return "empty file"
        with Image.open(path) as image:
            if image.format == "JPEG":
                # Decoding at 1/8 scale still reads every byte: finds truncation cheaply.
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
        return None
    except UnidentifiedImageError:
        return "not an image"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return str(e) or type(e).__name__


def find_broken(paths: Sequence[Path], workers: int = 4) -> dict[Path, str]:
    """The files among ``paths`` that cannot be decoded, with the reason for each."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        reasons = list(pool.map(_check, paths))
    return {p: r for p, r in zip(paths, reasons, strict=True) if r is not None}


def warn_skipped(broken: dict[Path, str], root: Path | None = None) -> None:
    if not broken:
        return
    shown = []
    for path, reason in list(broken.items())[:10]:
        name = path.relative_to(root) if root is not None and path.is_relative_to(root) else path
        shown.append(f"{name} ({reason})")
    more = f", and {len(broken) - 10} more" if len(broken) > 10 else ""
    warnings.warn(
        f"skipped {len(broken)} unreadable image file(s): {', '.join(shown)}{more}",
        stacklevel=2,
    )


def is_image_file(path: Path, extensions: Iterable[str] = IMAGE_EXTENSIONS) -> bool:
    return path.suffix.lower() in tuple(extensions)
