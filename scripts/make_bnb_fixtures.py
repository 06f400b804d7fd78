"""Write the small bitsandbytes reference fixtures that tests/quant compares fasttune.quant against.

    PYTHONPATH=/path/to/bitsandbytes-site python scripts/make_bnb_fixtures.py [--device cuda|cpu] [--out DIR]

bitsandbytes is needed only here, never by fasttune or its tests. Each source weight (seeded, stored in
the fixture) goes through bitsandbytes' own modules, and the fixture keeps what they save and what
bitsandbytes dequantizes:

  tests/fixtures/bnb/nf4_small.safetensors
      {name}.source                          the weight before quantization
      {name}.{variant}.weight[...]           what bnb.nn.Linear4bit.state_dict() holds (prefix "{name}.{variant}.")
      {name}.{variant}.dequant               bitsandbytes.functional.dequantize_4bit of it, in the source dtype
  tests/fixtures/bnb/int8_small.safetensors
      {name}.source, {name}.int8.{weight,SCB,weight_format} (bnb.nn.Linear8bitLt.state_dict()),
      {name}.int8.dequant                    bitsandbytes.functional.int8_vectorwise_dequant (fp32)

The safetensors metadata records the bitsandbytes and torch versions, the device that quantized, and
for every variant its settings. The Hub's checkpoints are made by bitsandbytes' CUDA kernels; its CPU
build (0.50.2) differs from them in two ways that the tests know about when the fixture's device is
"cpu": it picks the 8-bit code of a double-quantized absmax with an approximate search (now and then
the second-nearest entry), and for FP4 it may write -0 for +0 and the reverse.
"""

from __future__ import annotations

import argparse
import copy
import json
import os

import torch
from safetensors.torch import save_file

# name -> (shape, dtype, how to fill)
SOURCES = {
    "w64x96": ((64, 96), torch.bfloat16, "normal"),
    "w5x123": (
        (5, 123),
        torch.bfloat16,
        "normal",
    ),  # 615 elements: a short last block, an odd count
    "w7x33h": ((7, 33), torch.float16, "normal"),
    "edge": ((6, 64), torch.bfloat16, "edge"),  # zero, constant, spiked and tiny blocks
    "w48x188": (
        (48, 188),
        torch.bfloat16,
        "normal",
    ),  # 282 blocks of 32: two nested absmax groups
}
# variant -> (quant_type, blocksize, double quantization, which sources)
VARIANTS = {
    "nf4": ("nf4", 64, True, ["w64x96", "w5x123", "w7x33h", "edge"]),
    "nf4_plain": ("nf4", 64, False, ["w64x96", "w5x123", "w7x33h", "edge"]),
    "nf4_bs128": ("nf4", 128, True, ["w5x123"]),
    "nf4_bs32": ("nf4", 32, True, ["w48x188"]),
    "fp4": ("fp4", 64, True, ["w64x96", "w5x123"]),
}
INT8_SOURCES = {
    "w32x96h": ((32, 96), torch.float16, "normal"),
    "w5x123": ((5, 123), torch.bfloat16, "normal"),
    "edge": ((6, 64), torch.bfloat16, "edge"),
}


def make_source(shape, dtype, kind, gen):
    w = torch.randn(shape, generator=gen) * 0.02
    if kind == "edge":
        w[0] = 0.0
        w[1] = 0.5
        w[2] = -0.25
        w[3, 17] = 3.0  # one spike, the rest of the block small
        w[4] = w[4] * 1e-20
    return w.to(dtype)


def quantize_4bit_module(bnb, w, quant_type, blocksize, double_quant, device):
    out_features, in_features = w.shape
    module = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=False,
        compute_dtype=w.dtype,
        compress_statistics=double_quant,
        quant_type=quant_type,
    )
    module.weight = bnb.nn.Params4bit(
        w.clone(),
        requires_grad=False,
        compress_statistics=double_quant,
        quant_type=quant_type,
        blocksize=blocksize,
    )
    # bitsandbytes quantizes when the weight moves to its device
    module = module.to(device)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    # Dequantized as one flat row: bitsandbytes 0.50.2's CPU kernel for an even row length assumes
    # that no block straddles two rows and returns wrong values otherwise (a 64 x 96 weight with
    # 64-element blocks). The flat view gives every kernel the same, correct, blocks.
    flat = copy.copy(module.weight.quant_state)
    flat.shape = torch.Size([w.numel()])
    dequant = (
        bnb.functional.dequantize_4bit(module.weight.data, flat).reshape(w.shape).cpu()
    )
    return state, dequant


def quantize_int8_module(bnb, w, device):
    out_features, in_features = w.shape
    module = bnb.nn.Linear8bitLt(
        in_features, out_features, bias=False, has_fp16_weights=False
    )
    module.weight = bnb.nn.Int8Params(
        w.clone(), requires_grad=False, has_fp16_weights=False
    )
    module = module.to(device)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    dequant = bnb.functional.int8_vectorwise_dequant(
        state["weight"].to(device), state["SCB"].to(device)
    ).cpu()
    return state, dequant


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument(
        "--out",
        default=os.path.join(
            os.path.dirname(__file__), "..", "tests", "fixtures", "bnb"
        ),
    )
    args = parser.parse_args()

    import bitsandbytes as bnb

    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    meta = {
        "bitsandbytes": bnb.__version__,
        "torch": torch.__version__,
        "device": f"{device.type} ({where})",
        "generator": "scripts/make_bnb_fixtures.py",
    }
    os.makedirs(args.out, exist_ok=True)

    gen = torch.Generator().manual_seed(1234)
    sources = {name: make_source(*spec, gen) for name, spec in SOURCES.items()}
    tensors = {f"{name}.source": w for name, w in sources.items()}
    variants = {}
    for variant, (quant_type, blocksize, double_quant, names) in VARIANTS.items():
        variants[variant] = {
            "quant_type": quant_type,
            "blocksize": blocksize,
            "double_quant": double_quant,
            "sources": names,
        }
        for name in names:
            state, dequant = quantize_4bit_module(
                bnb, sources[name], quant_type, blocksize, double_quant, device
            )
            tensors.update({f"{name}.{variant}.{k}": v for k, v in state.items()})
            tensors[f"{name}.{variant}.dequant"] = dequant
    nf4_path = os.path.join(args.out, "nf4_small.safetensors")
    save_file(tensors, nf4_path, metadata={**meta, "variants": json.dumps(variants)})

    gen = torch.Generator().manual_seed(4321)
    tensors = {}
    for name, spec in INT8_SOURCES.items():
        w = make_source(*spec, gen)
        state, dequant = quantize_int8_module(bnb, w, device)
        tensors[f"{name}.source"] = w
        tensors.update({f"{name}.int8.{k}": v for k, v in state.items()})
        tensors[f"{name}.int8.dequant"] = dequant
    int8_path = os.path.join(args.out, "int8_small.safetensors")
    save_file(
        tensors, int8_path, metadata={**meta, "sources": json.dumps(list(INT8_SOURCES))}
    )

    for path in (nf4_path, int8_path):
        print(
            f"wrote {os.path.normpath(path)} ({os.path.getsize(path) / 1024:.1f} KiB)"
        )
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
