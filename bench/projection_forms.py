"""Cost of the three forms of an AFM table projection on the GPU, at the speed benchmark's
inference shape (batch 65536, 26 features, K = 32 -> D = 128, TF32), pure torch:

  grouped:   what training runs (LowRankEmbeddingBagCollection.project): stack the codes
             and weights, one baddbmm with the masked bias, concatenate 26 pieces;
  blockdiag: one Linear (26*32 + 26 -> 26*128) with a block-diagonal weight;
  serving:   what `afmrec export` writes (fuse_projections_): the codes read in place as
             (B, F, K), the mask appended and padded to 40 columns, one bmm, one reshape.

usage: python3 bench/projection_forms.py
"""
import torch

from gemm_rank_sweep import ms  # the same timer (this folder is on sys.path)

torch.backends.cuda.matmul.allow_tf32 = True
B, F, K, D = 65536, 26, 32, 128
dev = "cuda"
codes = torch.randn(B, F * K, device=dev)
mask = torch.ones(B, F, device=dev)
w = [torch.randn(D, K, device=dev) for _ in range(F)]  # nn.Linear weights (D, K)
b = [torch.randn(D, device=dev) for _ in range(F)]
big = torch.randn(F * D, F * K + F, device=dev)
stacked = torch.randn(F, 40, D, device=dev)


def grouped():
    z = torch.stack(list(codes.split(K, dim=1)))  # (F, B, K)
    ws = torch.stack([x.T for x in w])
    bias = torch.stack(b).unsqueeze(1)
    y = torch.baddbmm(mask.T.unsqueeze(2) * bias, z, ws)
    return torch.cat(list(y), dim=1)


def blockdiag():
    return torch.nn.functional.linear(torch.cat([codes, mask], dim=1), big)


def serving():
    z = codes.view(B, F, K)
    zp = torch.cat([z, mask.unsqueeze(2), z.new_zeros(B, F, 7)], dim=2)
    y = torch.bmm(zp.transpose(0, 1), stacked)
    return y.transpose(0, 1).reshape(B, -1)


print(torch.cuda.get_device_name(), torch.__version__)
for name, fn in (("grouped", grouped), ("blockdiag", blockdiag), ("serving", serving)):
    print(f"{name:10s} {ms(fn):.3f} ms per batch of {B}")
