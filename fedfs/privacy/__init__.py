"""Privacy for fedfs: secure aggregation over the bucket (SecAgg+), secure FFE, differential privacy."""
