"""Size limits every entry point checks before it allocates (plain constants: no torch, so configs import them).

MAX_IMAGE_SIDE    pixels on one side of an image a config, a CLI flag or a pipeline call may ask for. The release's
                  largest bucket (ASPECT_RATIO_1024, 4:1) is 2048 px long; twice that leaves room without letting a
                  typo (size: 100000) allocate gigabytes.
MAX_IMAGE_PIXELS  width x height an input image may declare in its header before it is decoded: PIL's own
                  decompression-bomb limit (about 9459 x 9459). Anything larger is refused from the header.
BUCKET_MULTIPLE   a resolution other than the release's 256 / 512 / 1024 scales the 512 bucket table and rounds each
                  side to this: the VAE factor (8) x the patch size (2), a whole number of tokens for every tokenizer.
"""

MAX_IMAGE_SIDE = 4096
MAX_IMAGE_PIXELS = 89_478_485

BUCKET_MULTIPLE = 16
MIN_RESOLUTION, MAX_RESOLUTION = 64, 2048


def resolution_problem(resolution) -> str | None:
    """Why `resolution` has no bucket table (model.images.aspect_ratio_table), or None."""
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution % BUCKET_MULTIPLE or \
            not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION:
        return (f"resolution {resolution!r} has no aspect-ratio bucket table; use the release's 256, 512 or 1024, or "
                f"a multiple of {BUCKET_MULTIPLE} from {MIN_RESOLUTION} to {MAX_RESOLUTION}")
    return None


__all__ = ["BUCKET_MULTIPLE", "MAX_IMAGE_PIXELS", "MAX_IMAGE_SIDE", "MAX_RESOLUTION", "MIN_RESOLUTION",
           "resolution_problem"]
