"""`fasttune env` (what this machine has), `fasttune demo` (the embedded fine-tuning job) and `fasttune bench`."""

from __future__ import annotations

import argparse
import importlib.metadata as md
import platform
import sys


def env() -> dict:
    import torch

    info = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("fasttune", "torch", "transformers", "peft", "accelerate", "trl", "triton", "bitsandbytes"):
        try:
            info[package] = md.version(package)
        except md.PackageNotFoundError:
            info[package] = None
    info["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
    info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fasttune")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="print versions and accelerators")
    sub.add_parser("demo", add_help=False, help="fine-tune the embedded model on the demo task")
    sub.add_parser("bench", help="run benchmarks from a checkout's benchmarks/ (see python -m fasttune.bench -h)",
                   add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "env":
        for key, value in env().items():
            print(f"{key:>13}: {value}")
        return 0
    if args.command == "bench":
        from . import bench

        return bench.main(rest)
    from . import demo

    return demo.main(rest)


if __name__ == "__main__":
    sys.exit(main())
