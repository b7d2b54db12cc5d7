"""How the rank of a factored Linear sets its GEMM speed on the GPU (TF32, as the speed
benchmark): y = x W^T + b with x (65536, n). The two GEMMs of an AFM cross layer at the
MLPerf DLRMv2 shape are down (n = 3456 -> K) and up (K -> 3456).

usage: python3 bench/gemm_rank_sweep.py   (torch only)
"""
import torch

torch.backends.cuda.matmul.allow_tf32 = True
B, N = 65536, 3456


def ms(fn, reps=20):
    """Milliseconds per call of ``fn`` on the GPU (CUDA events, after 3 warm-up calls)."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    x_wide = torch.randn(B, N, device="cuda")
    print(torch.cuda.get_device_name(), torch.__version__)
    print("K     down_ms  down_TFLOPs  up_ms  up_TFLOPs")
    for k in (96, 100, 104, 108, 110, 111, 112, 120, 128, 144, 160, 192, 224, 256, 384, 512):
        down = torch.nn.Linear(N, k, device="cuda")
        up = torch.nn.Linear(k, N, device="cuda")
        x_narrow = torch.randn(B, k, device="cuda")
        flops = 2 * B * N * k
        d = ms(lambda: down(x_wide))
        u = ms(lambda: up(x_narrow))
        print(f"{k:<5} {d:7.3f}  {flops / d / 1e9:10.0f}  {u:6.3f}  {flops / u / 1e9:8.0f}")


if __name__ == "__main__":
    main()
