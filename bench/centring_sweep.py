"""GPU time of the statistics update's centring pass (the centre's kernel and the pass that
centres, rounds to bfloat16 and sums) for each tiling, at the six width groups of
`afmrec bench speed`'s DLRM-DCNv2 (batch 8192), each call replayed as a CUDA graph.

    python3 bench/centring_sweep.py    # on a CUDA machine with Triton; needs only torch

Reads models/kernels/centring.py by path (no install needed). Latest output:
bench/centring_sweep_h100.txt.
"""
import importlib.util
import itertools
from pathlib import Path

import torch

spec = importlib.util.spec_from_file_location("centring",
                                              Path(__file__).parents[1] / "models" / "kernels" / "centring.py")
C = importlib.util.module_from_spec(spec)
spec.loader.exec_module(C)
dev = torch.device("cuda")
g = torch.Generator(device=dev).manual_seed(0)
B = 8192
fields = torch.randn((B, 26, 128), generator=g, device=dev)  # the sparse arch's (B, F, D)
mask = torch.rand((26, B), generator=g, device=dev) > 0.1
groups = {"tables": (C.RowGroups.of(fields.transpose(0, 1)), mask)}  # RowGroups hold their rows
for width, count in [(512, 5), (1024, 2), (256, 2), (128, 1), (1, 1)]:  # the Linear outputs
    groups[f"w{width}x{count}"] = (C.RowGroups.of(torch.randn((count, B, width), generator=g, device=dev)), None)


def graph_us(fn, iters=30):
    """Microseconds per replay of ``fn`` captured as a CUDA graph (best of 3 x ``iters``)."""
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(3):
        start.record()
        for _ in range(iters):
            graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / iters * 1000)
    return best


print(torch.cuda.get_device_name(), "| bytes read and written a batch:",
      sum(y.shape[0] * y.shape[1] * y.shape[2] * 6 for y, _ in groups.values()) / 1e6, "MB")
for C.BLOCK_R, C.MAX_BLOCK_M, C.NUM_WARPS, C.MIN_PROGRAMS in itertools.product((16, 32, 64), (64, 128), (4, 8), (1024, 4096)):
    per = {k: graph_us(lambda: C._fused(y, m, torch.bfloat16)) for k, (y, m) in groups.items()}
    print(f"BLOCK_R={C.BLOCK_R} MAX_BLOCK_M={C.MAX_BLOCK_M} warps={C.NUM_WARPS} "
          f"programs={C.MIN_PROGRAMS}: total {sum(per.values()):.1f} us",
          {k: round(v, 1) for k, v in per.items()}, flush=True)
