"""Compare the rendition pipeline with plain Pillow thumbnails: time, memory and fidelity.

Run by hand from the repository root, never as a test:

    .venv/bin/python bench/thumbnails.py [--corpus DIR] [--repeat N]

The images are the JPEGs in the corpus folders mobile/ and cameras/, plus a generated
12 MP baseline JPEG and a generated 24 MP JPEG, which are written to a temporary folder.
Each image goes through four paths:

- ours, thumbnail: decode_to_fit for a 256 px box (the checks, a JPEG draft, orientation,
  sRGB) and one WebP, the same steps that make_renditions takes for its largest rendition.
- ours, all renditions: make_renditions, which makes the 1600 px display image, the 512 px
  and 256 px thumbnails and the placeholder.
- Pillow thumbnail(): Image.open, thumbnail((256, 256)) and a WebP save with Pillow's
  defaults. It neither checks the file nor applies orientation or colour profiles.
- full decode: Image.open, load() without a draft, resize() to fit 256 px with Pillow's
  default filter, and a WebP save with Pillow's defaults.

Time: this process runs the paths in turn, --repeat rounds after one untimed round, so that
load from other programs falls on every path alike. Images per second per core is 1000
divided by the median CPU time in ms, because each path runs in one thread.

Memory: each path runs once more on each image in a fresh child process, after a tiny JPEG
has loaded the codecs. Peak RSS is the child's VmHWM after the run, and growth is that
minus VmHWM before it. ru_maxrss would not do, because Linux reports the parent's peak as
ru_maxrss of a child started with fork and exec.

PSNR compares each 256 px output with a Lanczos resize of the fully decoded image, without
a reducing gap, to the same size. For our paths the reference is also turned upright and
converted to sRGB, as our output is. A higher PSNR is closer to that reference.
"""

import argparse
import io
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import PIL
from PIL import Image, ImageChops, ImageOps, ImageStat, features

from gallery.imaging import make_renditions
from gallery.imaging.colour import convert_to_srgb
from gallery.imaging.decoding import fit_size
from gallery.imaging.renditions import decode_to_fit, encode_webp
from gallery.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = REPO_ROOT.parent / "shared" / "corpus"
CORPUS_FOLDERS = ("mobile", "cameras")

THUMBNAIL_BOX = 256
MAX_PIXELS = Settings().max_pixels
QUALITY = Settings().rendition_quality

OURS_THUMBNAIL = "ours, thumbnail"
OURS_ALL = "ours, all renditions"
PILLOW_THUMBNAIL = "Pillow thumbnail()"
FULL_DECODE = "full decode"
OUR_PATHS = (OURS_THUMBNAIL, OURS_ALL)

MIB = 1024 * 1024


def make_ours_thumbnail(data: bytes) -> bytes:
    fitted = decode_to_fit(data, "image/jpeg", THUMBNAIL_BOX, max_pixels=MAX_PIXELS)
    return encode_webp(fitted.image, QUALITY)


def make_ours_all(data: bytes) -> bytes:
    return make_renditions(data, "image/jpeg", max_pixels=MAX_PIXELS).thumbnail


def make_pillow_thumbnail(data: bytes) -> bytes:
    image = Image.open(io.BytesIO(data))
    image.thumbnail((THUMBNAIL_BOX, THUMBNAIL_BOX))
    output = io.BytesIO()
    image.save(output, "WEBP")
    return output.getvalue()


def make_full_decode_thumbnail(data: bytes) -> bytes:
    image = Image.open(io.BytesIO(data))
    image.load()
    image = image.resize(fit_size(image.size, THUMBNAIL_BOX))
    output = io.BytesIO()
    image.save(output, "WEBP")
    return output.getvalue()


# Each path takes JPEG bytes and returns its 256 px WebP thumbnail.
PATHS: dict[str, Callable[[bytes], bytes]] = {
    OURS_THUMBNAIL: make_ours_thumbnail,
    OURS_ALL: make_ours_all,
    PILLOW_THUMBNAIL: make_pillow_thumbnail,
    FULL_DECODE: make_full_decode_thumbnail,
}


@dataclass
class Result:
    """One path on one image: timed runs, memory of one run, and PSNR of its thumbnail."""

    image_type: str
    image_name: str
    megapixels: float
    path_name: str
    wall_ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)
    thumbnail: bytes = b""
    peak_rss: int = 0
    rss_growth: int = 0
    psnr: float = 0.0

    @property
    def median_ms(self) -> float:
        return statistics.median(self.wall_ms)

    @property
    def median_cpu_ms(self) -> float:
        return statistics.median(self.cpu_ms)


def read_peak_rss() -> int:
    """Return this process's peak resident set size in bytes, VmHWM in /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found in /proc/self/status; the benchmark needs Linux")


def measure_memory_here(path_name: str, image_path: Path) -> dict[str, int]:
    """Run one path once on one image and return the peak RSS and its growth, in bytes."""
    run = PATHS[path_name]
    data = image_path.read_bytes()
    warm_up = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 40, 40)).save(warm_up, "JPEG")
    run(warm_up.getvalue())
    baseline = read_peak_rss()

    run(data)

    peak = read_peak_rss()
    return {"peak_rss": peak, "rss_growth": peak - baseline}


def measure_memory_in_child(result: Result, image_path: Path) -> None:
    command = [sys.executable, __file__, "--measure-memory", result.path_name, str(image_path)]
    child = subprocess.run(command, capture_output=True, text=True, check=False, cwd=REPO_ROOT)
    if child.returncode != 0:
        raise RuntimeError(
            f"measuring the memory of {result.path_name!r} on {image_path} failed with exit"
            f" code {child.returncode}:\n{child.stderr}"
        )
    figures = json.loads(child.stdout)
    result.peak_rss = figures["peak_rss"]
    result.rss_growth = figures["rss_growth"]


def time_paths(data: bytes, results: dict[str, Result], repeat: int) -> None:
    """Run every path on `data` in turn, one untimed round and then `repeat` timed rounds."""
    for path_name, result in results.items():
        result.thumbnail = PATHS[path_name](data)

    path_names = list(results)
    for round_number in range(repeat):
        # Each round starts with the next path, so no path always follows the same one.
        shift = round_number % len(path_names)
        for path_name in path_names[shift:] + path_names[:shift]:
            wall_started, cpu_started = time.perf_counter(), time.process_time()
            PATHS[path_name](data)
            cpu_ms = (time.process_time() - cpu_started) * 1000
            wall_ms = (time.perf_counter() - wall_started) * 1000
            results[path_name].cpu_ms.append(cpu_ms)
            results[path_name].wall_ms.append(wall_ms)


def measure_image(image_type: str, image_path: Path, repeat: int) -> list[Result]:
    stored, upright = decode_references(image_path)
    megapixels = stored.width * stored.height / 1e6
    results = {
        path_name: Result(image_type, image_path.name, megapixels, path_name) for path_name in PATHS
    }

    time_paths(image_path.read_bytes(), results, repeat)
    for path_name, result in results.items():
        measure_memory_in_child(result, image_path)
        result.psnr = psnr(result.thumbnail, upright if path_name in OUR_PATHS else stored)
    return list(results.values())


def photo_like_image(width: int, height: int) -> Image.Image:
    """Build an image with smooth areas, sharp edges and sensor-like noise, the same each run.

    Saved at JPEG quality 90 it takes about 2.2 bits per pixel, close to a phone photo's.
    """
    scene = Image.effect_mandelbrot((width // 8, height // 8), (-2.2, -1.2, 1.0, 1.2), 60)
    horizontal = Image.linear_gradient("L").resize(scene.size)
    radial = Image.radial_gradient("L").resize(scene.size)
    red = ImageChops.add(scene, horizontal, scale=2)
    blue = ImageChops.multiply(scene, horizontal)
    small = Image.merge("RGB", (red, radial, blue))
    image = small.resize((width, height), Image.Resampling.BICUBIC)

    generator = random.Random(width * height)
    noise = Image.frombytes("L", (width, height), generator.randbytes(width * height))
    return Image.blend(image, noise.convert("RGB"), 0.08)


def write_generated_jpegs(folder: Path) -> list[tuple[str, Path]]:
    images = []
    sizes = (("generated 12 MP baseline", (4000, 3000)), ("generated 24 MP", (6000, 4000)))
    for label, (width, height) in sizes:
        path = folder / f"{width}x{height}.jpg"
        photo_like_image(width, height).save(path, "JPEG", quality=90, progressive=False)
        images.append((label, path))
    return images


def list_corpus_jpegs(corpus: Path) -> list[tuple[str, Path]]:
    images = []
    for folder in CORPUS_FOLDERS:
        paths = sorted((corpus / folder).glob("*.jpg"))
        if not paths:
            raise SystemExit(f"no JPEG files found in {corpus / folder}; check --corpus")
        images.extend((folder, path) for path in paths)
    return images


def decode_references(image_path: Path) -> tuple[Image.Image, Image.Image]:
    """Decode an image fully, as stored and as our pipeline shows it: upright, in sRGB."""
    stored = Image.open(image_path)
    stored.load()
    upright = ImageOps.exif_transpose(convert_to_srgb(stored.copy()))
    return stored.convert("RGB"), upright.convert("RGB")


def psnr(thumbnail: bytes, reference: Image.Image) -> float:
    """Return the PSNR in dB of a WebP against a Lanczos resize of `reference` to its size."""
    output = Image.open(io.BytesIO(thumbnail)).convert("RGB")
    expected = reference.resize(output.size, Image.Resampling.LANCZOS)
    difference = ImageChops.difference(output, expected)
    squared_errors = [rms**2 for rms in ImageStat.Stat(difference).rms]
    mean_squared_error = sum(squared_errors) / len(squared_errors)
    if mean_squared_error == 0:
        return math.inf
    return 10 * math.log10(255**2 / mean_squared_error)


def describe_machine() -> list[str]:
    cpu_model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    memory_kib = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal")
    )
    return [
        f"CPU: {cpu_model}, {os.cpu_count()} cores; RAM {memory_kib / MIB:.1f} GiB",
        f"Python {platform.python_version()}, Pillow {PIL.__version__}",
        f"libjpeg-turbo {features.version('libjpeg_turbo')}, libwebp {features.version('webp')}",
    ]


def format_row(cells: list[str], widths: list[int]) -> str:
    # The first column is text and aligns left, and the numbers align right.
    aligned = [cells[0].ljust(widths[0])]
    aligned += [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True)]
    return "  ".join(aligned)


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(row[index]) for row in [header, *rows]) for index in range(len(header))]
    print(format_row(header, widths))
    print(format_row(["-" * width for width in widths], widths))
    for row in rows:
        print(format_row(row, widths))
    print()


def print_per_image(results: list[Result]) -> None:
    print("Per image: medians of the timed runs")
    header = ["image", "MP", "path", "ms", "CPU ms", "img/s/core", "peak MiB", "growth MiB"]
    rows = []
    for result in results:
        rows.append(
            [
                f"{result.image_type}/{result.image_name}",
                f"{result.megapixels:.1f}",
                result.path_name,
                f"{result.median_ms:.1f}",
                f"{result.median_cpu_ms:.1f}",
                f"{1000 / result.median_cpu_ms:.1f}",
                f"{result.peak_rss / MIB:.1f}",
                f"{result.rss_growth / MIB:.1f}",
                f"{result.psnr:.1f}",
            ]
        )
    print_table([*header, "PSNR dB"], rows)


def print_per_type(results: list[Result]) -> None:
    print("Per image type: ms is the mean of the per-image medians, RSS the largest.")
    print("A speed-up divides the baseline's mean CPU ms by the path's.")
    groups: dict[tuple[str, str], list[Result]] = {}
    for result in results:
        groups.setdefault((result.image_type, result.path_name), []).append(result)
    mean_cpu_ms = {
        key: statistics.mean(result.median_cpu_ms for result in group)
        for key, group in groups.items()
    }

    rows = []
    for (image_type, path_name), group in groups.items():
        cpu_ms = mean_cpu_ms[image_type, path_name]
        thumbnail_speedup = mean_cpu_ms[image_type, PILLOW_THUMBNAIL] / cpu_ms
        full_decode_speedup = mean_cpu_ms[image_type, FULL_DECODE] / cpu_ms
        rows.append(
            [
                image_type,
                path_name,
                f"{statistics.mean(result.median_ms for result in group):.1f}",
                f"{1000 / cpu_ms:.1f}",
                f"{max(result.peak_rss for result in group) / MIB:.1f}",
                f"{max(result.rss_growth for result in group) / MIB:.1f}",
                f"{thumbnail_speedup:.2f}x",
                f"{full_decode_speedup:.2f}x",
            ]
        )
    header = ["type", "path", "ms", "img/s/core", "peak MiB", "growth MiB"]
    print_table([*header, "vs thumbnail()", "vs full decode"], rows)


def run_benchmark(corpus: Path, repeat: int) -> None:
    for line in describe_machine():
        print(line)
    print(f"load average at start: {os.getloadavg()[0]:.2f}; --repeat {repeat}\n")

    results = []
    with tempfile.TemporaryDirectory() as folder:
        images = list_corpus_jpegs(corpus) + write_generated_jpegs(Path(folder))
        for image_type, image_path in images:
            results.extend(measure_image(image_type, image_path, repeat))
            print(f"measured {image_path.name}", file=sys.stderr)

    print_per_image(results)
    print_per_type(results)
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--corpus",
        type=Path,
        default=DEFAULT_CORPUS,
        help="folder of the photo corpus, with mobile/ and cameras/ (default: %(default)s)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=15,
        help="timed rounds of every path on each image (default: %(default)s)",
    )
    parser.add_argument(
        "--measure-memory", nargs=2, metavar=("PATH", "IMAGE"), help=argparse.SUPPRESS
    )
    arguments = parser.parse_args()
    if arguments.repeat < 1:
        parser.error(f"--repeat is {arguments.repeat}, expected at least 1")

    if arguments.measure_memory:
        path_name, image_path = arguments.measure_memory
        print(json.dumps(measure_memory_here(path_name, Path(image_path))))
        return

    run_benchmark(arguments.corpus, arguments.repeat)


if __name__ == "__main__":
    main()
