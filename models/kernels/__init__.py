"""Our Triton kernels, each beside its PyTorch reference (the function it computes, run
where Triton does not: the CPU, no Triton): the fused cross network's update
(:mod:`.cross`), the pooled lookup of FBGEMM's packed rows (:mod:`.lookup`), and the
statistics update's centring pass (:mod:`.centring`). :mod:`.selfcheck` checks the first
two against their references (on CUDA, or on a CPU under Triton's interpreter). Needs only
torch (and Triton for the kernels); nothing is imported here, so that importing a model
does not import Triton's interpreter or FBGEMM."""
