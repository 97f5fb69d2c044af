"""Our Relax passes, one per module, in the order blockffn.compiler.compile runs them:

1. add_dense_twins.AddDenseTwins                - `<fn>_dense` copies of the functions about to be made sparse
2. lower_sparse_ffn.LowerBlockFFNSparse          - BlockFFN layers of the chosen functions -> union-sparse kernels
3. lower_dense_ffn.LowerBlockFFNDenseDecodeGPU   - GPUs: a single-token dense layer's down-projection through the
                                                   split-K kernel with every expert active
4. graph_safe_subroutines.InlineSubroutines      - `--cuda-graph` builds: every private subroutine inlined

(After fusion, `blockffn.schedules.low_batch.VerifyRowsGEMV` gives verification its own low-row matmul kernels.)
"""
