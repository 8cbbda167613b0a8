"""Model weights as safetensors: header parsing without torch, tensors and checks with torch,
and the streaming combine that aggregation plans execute."""
