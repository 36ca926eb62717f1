"""FP8 training with fine-grained (1x128 activation, 128x128 weight) scaling: kernels, GEMM paths
and the module swaps that turn them on."""
