"""Pure-PyTorch kernels: any device PyTorch supports."""
