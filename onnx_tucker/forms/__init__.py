"""The low-rank forms, one module each; registered in :mod:`onnx_tucker.factorization`."""
