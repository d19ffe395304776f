"""Size limits every entry point checks before it allocates (plain constants: no torch, so configs import them).

MAX_IMAGE_SIDE    pixels on one side of an image a config, a CLI flag or a pipeline call may ask for. The release's
                  largest bucket (ASPECT_RATIO_1024, 4:1) is 2048 px long; twice that leaves room without letting a
                  typo (size: 100000) allocate gigabytes.
MAX_IMAGE_PIXELS  width x height an input image may declare in its header before it is decoded: PIL's own
                  decompression-bomb limit (about 9459 x 9459). Anything larger is refused from the header.
"""

MAX_IMAGE_SIDE = 4096
MAX_IMAGE_PIXELS = 89_478_485

__all__ = ["MAX_IMAGE_PIXELS", "MAX_IMAGE_SIDE"]
