"""ringserve.kernels: attention kernels that return (out, lse), the LSE merge, the 8-bit KV format."""
