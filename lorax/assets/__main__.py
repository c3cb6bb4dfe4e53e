"""``python -m lorax.assets NAME ...`` fetches assets into the cache; ``python -m lorax.assets
bundle --out=DIR [--dtype=bfloat16] NAME ...`` writes an offline bundle (lorax.assets.bundle)."""

import argparse
import logging
import sys

from lorax import assets


def bundle_main(argv: list[str]) -> int:
    """Command line of ``bundle``: writes the bundle, prints each asset's size and the total."""
    from lorax.assets import bundle

    p = argparse.ArgumentParser(prog="python -m lorax.assets bundle", description=bundle.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--out", required=True, help="the bundle's directory (LORAX_CACHE there)")
    p.add_argument("--dtype", default="float32", choices=bundle.DTYPES,
                   help="cast float32 safetensors weights to this dtype")  # fmt: skip
    p.add_argument("names", nargs="+", help=f"of {sorted(assets.KNOWN)}")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sizes = bundle.write(args.out, args.names, args.dtype)
    for name, size in sizes["assets"].items():
        print(f"{name}: {size / 1e6:.1f} MB")
    print(f"bundle {args.out}: {sizes['total'] / 1e6:.1f} MB ({sizes['total']:,} bytes)")
    return 0


if __name__ == "__main__":
    argv = sys.argv[1:]
    sys.exit(bundle_main(argv[1:]) if argv[:1] == ["bundle"] else assets.main(argv))
