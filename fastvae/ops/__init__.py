"""The fused ops: each module holds the public function, its PyTorch reference and its autograd wiring."""
