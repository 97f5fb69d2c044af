"""Our Relax passes, one per module, in the order blockffn.compiler.compile runs them:

1. add_dense_twins.AddDenseTwins       - `<fn>_dense` copies of the functions about to be made sparse
2. lower_sparse_ffn.LowerBlockFFNSparse - BlockFFN layers of the chosen functions -> union-sparse kernels
"""
