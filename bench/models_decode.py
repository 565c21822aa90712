"""Side-by-side timings for maskteacher.models (CPU or CUDA).

1. decode_points (one batched call over B images x P prompts) vs segment-anything's path
   (one model.mask_decoder call per image, repeat_interleave inside), vit_t decoder (256-dim).
2. Our TinyViT encoder vs MobileSAM's reference TinyViT at 1024 (if mobile_sam is installed).
Usage: python bench_models.py [--image-size 1024] [--images 4] [--prompts 32] [--repeats 3]
"""

import argparse
import time
import warnings

import torch

from maskteacher.models import build_sam, decode_points


def timed(fn, repeats):
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=32, help="per image")
    parser.add_argument("--chunk", type=int, default=32, help="prompts per decode_points call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = build_sam("vit_t", image_size=args.image_size).to(device)
    b, p, s = args.images, args.prompts, args.image_size
    emb = torch.randn(b, 256, s // 16, s // 16, device=device)
    points = torch.rand(b * p, 2, device=device) * s
    index = torch.arange(b, device=device).repeat_interleave(p)

    def per_image():
        out = []
        for i in range(b):
            pts = points[i * p : (i + 1) * p, None, :]
            labels = torch.ones(p, 1, dtype=torch.int64, device=device)
            sparse, dense = model.prompt_encoder(points=(pts, labels), boxes=None, masks=None)
            out.append(
                model.mask_decoder(
                    image_embeddings=emb[i : i + 1],
                    image_pe=model.prompt_encoder.get_dense_pe(),
                    sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense,
                    multimask_output=True,
                )[0]
            )
        return torch.cat(out)

    def batched():
        return decode_points(model, emb, points, image_index=index, multimask_output=True)

    def chunked():
        return torch.cat(
            [
                decode_points(
                    model,
                    emb,
                    points[c : c + args.chunk],
                    image_index=index[c : c + args.chunk],
                    multimask_output=True,
                ).low_res_logits
                for c in range(0, b * p, args.chunk)
            ]
        )

    with torch.no_grad():
        diff = (per_image() - batched().low_res_logits).abs().max().item()
        t_loop = timed(per_image, args.repeats)
        t_batch = timed(batched, args.repeats)
        t_chunk = timed(chunked, args.repeats)
    print(
        f"[{device}, {torch.get_num_threads()} threads] decode {b} images x {p} prompts at {s}: "
        f"per-image mask_decoder loop {t_loop * 1e3:.0f} ms; decode_points one call "
        f"{t_batch * 1e3:.0f} ms (loop/this {t_loop / t_batch:.2f}x); decode_points in chunks of "
        f"{args.chunk} {t_chunk * 1e3:.0f} ms (loop/this {t_loop / t_chunk:.2f}x); max|diff| {diff:.1e}"
    )

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from mobile_sam import sam_model_registry
    except ImportError:
        print("mobile_sam not installed: encoder comparison skipped")
        return
    if s != 1024:
        return
    reference = sam_model_registry["vit_t"]()
    reference.load_state_dict(model.state_dict())
    reference.to(device).eval()
    image = torch.randn(1, 3, 1024, 1024, device=device)
    with torch.no_grad():
        t_ours = timed(lambda: model.image_encoder(image), args.repeats)
        t_ref = timed(lambda: reference.image_encoder(image), args.repeats)
    print(
        f"[{device}] TinyViT encoder, 1 image at 1024: ours {t_ours * 1e3:.0f} ms, "
        f"MobileSAM reference {t_ref * 1e3:.0f} ms, ratio ours/ref {t_ours / t_ref:.2f}"
    )


if __name__ == "__main__":
    main()
