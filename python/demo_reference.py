"""Demo of the reference SPViT model: tokens kept per stage, and its time next to the dense timm DeiT.

    python python/demo_reference.py [--model spvit_deit_small] [--batch 8] [--device cpu] [--repeats 3]

The reference model runs the official masked form: it keeps all 197 tokens and only masks attention, so it
is no faster than the dense DeiT (slightly slower: the selectors run on top). `spvit_kernels.accelerate`
is what turns the pruning into real savings. Weights are random (nothing is downloaded), so the kept
tokens say nothing about the images; the numbers of tokens per stage are what the config fixes.
"""

import argparse
import statistics
import time

import torch

from spvit_kernels.models import create_model, list_models


def median_ms(fn, device, repeats):
    """Median wall time of fn() in ms, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="spvit_deit_small", choices=list_models())
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    torch.manual_seed(0)
    model = create_model(args.model).to(device)
    images = torch.randn(args.batch, 3, 224, 224, device=device)
    print(f"{args.model}: {model.extra_repr()}")

    with torch.inference_mode():
        logits, info = model(images, return_info=True)
        print(f"logits {tuple(logits.shape)}; tokens per image (cls + kept patches + package tokens):")
        print(f"  before stage 1 (blocks 0..{model.config.selector_layers[0] - 1}): "
              f"{1 + model.vit.patch_embed.num_patches}")
        for s, layer in enumerate(info["selector_layers"]):
            counts = sorted(set(info["num_tokens"][s].tolist()))
            kept = info["kept_indices"][s][0][:8].tolist()
            print(f"  stage {s + 1} (from block {layer}): {counts} tokens, image 0 keeps patches {kept} ...")
        t_ref = median_ms(lambda: model(images), device, args.repeats)
        t_dense = median_ms(lambda: model.vit(images), device, args.repeats)
    print(f"batch {args.batch} on {device}: reference SPViT (masked) {t_ref:.1f} ms, "
          f"dense timm DeiT {t_dense:.1f} ms (median of {args.repeats})")


if __name__ == "__main__":
    main()
