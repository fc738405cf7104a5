#!/usr/bin/env python3
"""PyTorch scaled_dot_product_attention timings, the baseline for `lasp bench kernels`' softmax
attention rows (same shapes, same GPU, same FLOP convention).

Causal, bf16, B=1, H=16, D=128 by default. Times the forward (inputs that require grad, as in
training) and forward + backward with CUDA events: median of --iters runs after --warmup runs.
TFLOP/s convention (the one bench_kernels.cc prints): forward 4 B H T^2 D / 2 (causal half),
forward + backward 3.5x that (the backward counted as 2.5 forwards).

Each row is one SDPA backend: 'default' is PyTorch's own choice, then every backend that accepts
the shape when forced (flash, cudnn, efficient). Prints a table and, with --csv, writes it.

    python3 scripts/bench_sdpa.py [--lengths 8192 32768 65536] [--iters 10] [--warmup 3] [--csv F]
"""
import argparse
import sys

import torch
import torch.nn.functional as F


def time_ms(fn, iters, warmup):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    times.sort()
    return times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 65536])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--csv", default="")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_sdpa: no CUDA device", file=sys.stderr)
        return 2
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, "
          f"cuDNN {torch.backends.cudnn.version()}")
    backends = [("default", None), ("flash", SDPBackend.FLASH_ATTENTION),
                ("cudnn", SDPBackend.CUDNN_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)]
    B, H, D = args.batch, args.heads, args.head_dim
    rows = []
    gen = torch.Generator(device=dev).manual_seed(0)
    for T in args.lengths:
        shape = (B, H, T, D)
        q, k, v, do = (torch.randn(shape, device=dev, dtype=torch.bfloat16, generator=gen) for _ in range(4))
        for t in (q, k, v):
            t.requires_grad_(True)
        fwd_flops = 2.0 * B * H * T * T * D  # causal: half of 4 B H T^2 D

        def fwd():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        def fwd_bwd():
            for t in (q, k, v):
                t.grad = None  # fresh gradients, as lasp's backward writes (not accumulates) them
            o = fwd()
            o.backward(do)

        for name, backend in backends:
            try:
                if backend is None:
                    f = time_ms(fwd, args.iters, args.warmup)
                    fb = time_ms(fwd_bwd, args.iters, args.warmup)
                else:
                    with sdpa_kernel([backend]):
                        f = time_ms(fwd, args.iters, args.warmup)
                        fb = time_ms(fwd_bwd, args.iters, args.warmup)
            except RuntimeError as e:  # the backend does not take this shape / build
                print(f"  T={T} {name}: not available ({str(e).splitlines()[0][:120]})")
                continue
            rows.append((name, T, f, fwd_flops / f / 1e9, fb, 3.5 * fwd_flops / fb / 1e9))
            print(f"  sdpa {name} causal B={B} T={T} H={H} D={D}: fwd {f:.3f} ms ({rows[-1][3]:.0f} TFLOP/s), "
                  f"fwd+bwd {fb:.3f} ms ({rows[-1][5]:.0f} TFLOP/s)", flush=True)
        del q, k, v, do
        torch.cuda.empty_cache()

    print("\nPyTorch SDPA (bf16, causal; TFLOP/s: fwd 2 B H T^2 D, fwd+bwd 3.5x)")
    print(f"{'backend':<10} {'T':>7} {'fwd_ms':>10} {'fwd_TF/s':>9} {'fwdbwd_ms':>10} {'fwdbwd_TF/s':>12}")
    for r in rows:
        print(f"{r[0]:<10} {r[1]:>7} {r[2]:>10.3f} {r[3]:>9.0f} {r[4]:>10.3f} {r[5]:>12.0f}")
    if args.csv:
        with open(args.csv, "w") as f:
            f.write("backend,T,fwd_ms,fwd_tflops,fwdbwd_ms,fwdbwd_tflops\n")
            for r in rows:
                f.write(",".join(str(x) for x in r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
